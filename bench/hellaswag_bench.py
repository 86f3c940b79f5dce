"""Benchmark hellaswag.py's batched scoring against one task per forward pass, side by side in one run.

    python bench/hellaswag_bench.py                                   # 124M shape, 200 val tasks, CPU
    python bench/hellaswag_bench.py --n_layer 4 --n_embd 256 --n_head 4 --limit 100
    python bench/hellaswag_bench.py --limit 0 --device cuda           # all 10,042 val tasks on a GPU

The model is a GPT of the given shape with random weights (speed does not depend on their values);
its token embedding, tied to the output layer, is drawn with std 0.3 instead of 0.02 so that the
endings' losses differ by more than rounding noise and "same predictions" is a meaningful check.
Run A scores one task (4 rows) per forward, eager, in file order: build-nanogpt's loop. Run B is what
hellaswag.score() does: --batch_size tasks per forward, shortest first when eager, or, compiled,
every forward padded to the longest task (one shape, compiled once; compile time reported apart).
Each run gets one untimed warm-up forward. Rendering (tokenizing) is done once, untimed. Prints a
markdown table, and whether both runs chose the same ending for every task (acc and acc_norm).
"""

import argparse
import datetime
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED_HELLASWAG = os.path.normpath(os.path.join(REPO, "../shared/data/hellaswag"))

from common import SHARED_FLAGS_HELP, auto_or_bool, gpt2_tokenizer  # noqa: E402
from hellaswag import iterate_examples, iterate_losses, render_example  # noqa: E402
from train_gpt2 import GPT, GPTConfig, resolve_system  # noqa: E402

FLAGS = dict(  # name: (default, help)
    limit=(200, "val tasks to score (0 = all 10,042)"),
    batch_size=(16, "tasks per forward in run B"),
    n_layer=(12, "model shape (the defaults are GPT-2 124M's)"),
    n_head=(12, "attention heads"),
    n_embd=(768, "model width"),
    device=("auto", SHARED_FLAGS_HELP["device"]),
    dtype=("auto", SHARED_FLAGS_HELP["dtype"]),
    compile=("auto", "run B: " + SHARED_FLAGS_HELP["compile"] + ", with pad_to"),
    threads=(0, "torch CPU threads (0 = torch's default)"),
    data_dir=(SHARED_HELLASWAG if os.path.isdir(SHARED_HELLASWAG) else "",
              "folder holding hellaswag_val.jsonl ('' = the download cache)"),
    seed=(1337, "seed for the random weights"),
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, (default, help) in FLAGS.items():
        kind = auto_or_bool if name == "compile" else type(default)
        parser.add_argument(f"--{name}", type=kind, default=default, help=help)
    return parser.parse_args()


def timed_run(model, rendered, device, batch_size, autocast, pad_to, order):
    """(seconds, forwards, {index: (sums, means)}): score rendered[order] batch_size tasks per forward."""
    tasks = [rendered[i] for i in order]
    list(iterate_losses(model, tasks[:batch_size], device, batch_size, autocast, pad_to))  # warm-up
    t0 = time.perf_counter()
    losses = list(iterate_losses(model, tasks, device, batch_size, autocast, pad_to))  # .cpu() syncs
    return time.perf_counter() - t0, -(-len(tasks) // batch_size), dict(zip(order, losses))


def accuracy(losses, rendered):
    n = len(rendered)
    acc = sum(int(losses[i][0].argmin()) == rendered[i][2] for i in range(n)) / n
    acc_norm = sum(int(losses[i][1].argmin()) == rendered[i][2] for i in range(n)) / n
    return acc, acc_norm


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, use_compile, autocast = resolve_system(args.device, args.dtype, args.compile)
    device_type = device.split(":")[0]

    enc = gpt2_tokenizer()
    examples = iterate_examples("val", args.data_dir)
    rendered = [render_example(ex, enc) for i, ex in zip(range(args.limit or 10**9), examples)]
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).to(device).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(std=0.3)
    n_params = sum(p.numel() for p in model.parameters())

    a = timed_run(model, rendered, device, 1, autocast, None, list(range(len(rendered))))
    compile_s, pad_to, model_b = 0.0, None, model
    if use_compile:
        pad_to = max(t.size(1) for t, _, _ in rendered)
        model_b = torch.compile(model, dynamic=False)
        t0 = time.perf_counter()
        list(iterate_losses(model_b, rendered[:1], device, args.batch_size, autocast, pad_to))
        compile_s = time.perf_counter() - t0
    order_b = (list(range(len(rendered))) if pad_to
               else sorted(range(len(rendered)), key=lambda i: rendered[i][0].size(1)))
    b = timed_run(model_b, rendered, device, args.batch_size, autocast, pad_to, order_b)

    n = len(rendered)
    same = sum(int(a[2][i][0].argmin()) == int(b[2][i][0].argmin()) and
               int(a[2][i][1].argmin()) == int(b[2][i][1].argmin()) for i in range(n))
    max_diff = max(float((a[2][i][k] - b[2][i][k]).abs().max()) for i in range(n) for k in (0, 1))
    max_loss = max(float(a[2][i][0].max()) for i in range(n))

    where = (torch.cuda.get_device_name(device) if device_type == "cuda"
             else platform.processor() or platform.machine())
    print(f"\n{datetime.date.today()} | {where}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads | "
          f"torch {torch.__version__} | Python {platform.python_version()}")
    print(f"model: {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, "
          f"{n_params / 1e6:.0f}M parameters, random weights | {device}, "
          f"{str(dtype).removeprefix('torch.') + ' autocast' if dtype else 'float32'} | {n} val tasks")
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| run | tasks per forward | forwards | compiled | seconds | tasks/s | speedup | acc | acc_norm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (seconds, forwards, losses), per, compiled in (
            ("A one task per forward", a, 1, "no"),
            ("B hellaswag.score()", b, args.batch_size,
             f"yes, pad_to {pad_to} ({compile_s:.0f} s to compile)" if pad_to else "no")):
        acc, acc_norm = accuracy(losses, rendered)
        print(f"| {name} | {per} | {forwards} | {compiled} | {seconds:.1f} | {n / seconds:.2f} | "
              f"{a[0] / seconds:.2f}x | {acc:.4f} | {acc_norm:.4f} |")
    print(f"\nsame predictions (acc and acc_norm choice) on {same}/{n} tasks; "
          f"max |loss difference| {max_diff:.2e} (summed losses up to {max_loss:.0f})")
    if same != n and dtype is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
