"""Benchmark train_gpt2.py's training step: ms/step, tokens/s, MFU against a measured matmul peak, \
peak memory.

    python bench/train_bench.py                                   # micro-batches 16, 32, 64
                                                                  # and the largest that fits
    python bench/train_bench.py --micro_batch_sizes 64 --reference bench/build-nanogpt   # side by side
    python bench/train_bench.py --micro_batch_sizes 64 --variants ";--compile 0"        # a lever,
                                                                                        # before/after

Each row is one run of the real train_gpt2.py in a process of its own: loader, gradient accumulation,
clipping, AdamW, autocast and torch.compile as a user runs it, at the GPT-2 recipe (T=1024, 524,288 tokens
per step) unless --train_flags say otherwise. The data are synthetic shards in the project's format (uint16
.npy, named *_train_* and *_val_*) of uniformly random GPT-2 token ids, written once into --data_dir, or any
real shards already there. The first --warmup steps (compilation, allocator growth) are not timed; ms/step
is the median of the next --steps steps, from the tok/sec that the step line prints. MFU = tokens/s x FLOPs
per token (GPT.flops_per_token: 6N + 12LTd) / the matmul rate this script measures on the same device once
the runs are done, in the runs' dtype (bfloat16 on CUDA by default). Peak memory is
torch.cuda.max_memory_allocated on CUDA and the process's peak RSS on CPU, read when the run exits. A
micro-batch size of `max` doubles the one before it until a run is out of memory (or one micro-batch is the
whole batch): the largest that fits.

--variants adds rows: each `;`-separated string of train_gpt2.py flags is one more run per micro-batch
size ('' is the baseline). The loss at the last timed step is in the table, so a lever that changes the
numbers shows; compare losses on real shards (--data_dir) before keeping one.

The build-nanogpt side by side: bring a copy of karpathy/build-nanogpt into the git-ignored
bench/build-nanogpt/ (never commit it), e.g. `git clone https://github.com/karpathy/build-nanogpt
bench/build-nanogpt`, and pass --reference bench/build-nanogpt. Its train_gpt2.py has no flags, so this
script writes a copy, bench_train_gpt2.py, beside it with the edits listed in REFERENCE_EDITS (data path,
batch, step count, compile on, one val micro-batch per eval, HellaSwag and sampling off), prints them, and
runs it in that folder on the same shards, at micro-batch --reference_micro_batch_size, with the model shape
of --train_flags and autocast in the runs' dtype (build-nanogpt autocasts to bfloat16 even on CPU). Its step 0
and last step also time a val eval; both fall outside the timed steps.
"""

import datetime
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common import GPT2_VOCAB_SIZE, config_parser, option  # noqa: E402
from train_gpt2 import (GPT, MODEL_FLAGS, GPTConfig, parse_args as parse_train_args,  # noqa: E402
                        resolve_system)

# Runs a script as __main__ and, when it exits, prints its peak memory: the same probe for both scripts.
PEAK_PROBE = """
import atexit, os, resource, runpy, sys, torch
def report():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is in KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"bench: peak memory {peak} bytes", flush=True)
atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Both scripts' step lines: ours "step 5 | loss 10.9 | ... | tok/sec 512,345", build-nanogpt's
# "loss: ... tok/sec: ...".
STEP_LINE = re.compile(r"^step\s+(\d+) \| loss:? (\S+) \|.*\| tok/sec:? ([\d,.]+)", re.MULTILINE)


@dataclass
class BenchConfig:
    micro_batch_sizes: str = option("16,32,64,max", "comma-separated micro-batch sizes; max = double until "
                                                    "out of memory")
    variants: str = option("", "';'-separated train_gpt2.py flag strings, each one more row per micro-batch "
                               "('' = baseline)")
    train_flags: str = option("", "train_gpt2.py flags for every run, e.g. a smaller model for a CPU check")
    warmup: int = option(5, "untimed steps first (compilation, allocator growth)")
    steps: int = option(20, "timed steps after the warm-up")
    data_dir: str = option("bench/data", "shards to train on; synthetic ones are written here if it has none")
    synthetic_tokens: int = option(20_000_000, "tokens per synthetic train shard "
                                               "(two are written, and one val shard)")
    reference: str = option("", "a build-nanogpt checkout to run side by side ('' = none)")
    reference_micro_batch_size: int = option(64, "build-nanogpt's micro-batch B (its default is 64)")
    device: str = option("auto", "auto (cuda, else cpu), cpu or cuda: where the matmul peak is measured")
    timeout: int = option(900, "seconds allowed for one run")
    repeats: int = option(1, "run every row this many times, interleaved (all rows, then all rows again, "
                             "...), so that the machine's drift hits them alike; "
                             "each row reports the median")


def parse_args(argv=None):
    parser = config_parser(BenchConfig, "train_bench.py", __doc__)
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    sizes = cfg.micro_batch_sizes.split(",")
    numbers = sizes[:-1] if sizes[-1] == "max" else sizes
    if not numbers or not all(s.isdigit() and int(s) > 0 for s in numbers):
        parser.error(f"--micro_batch_sizes {cfg.micro_batch_sizes}: expected positive integers, optionally "
                     f"ending in max, e.g. 16,32,64,max")
    if cfg.repeats < 1:
        parser.error(f"--repeats {cfg.repeats}: must be >= 1")
    if cfg.warmup < 1 or cfg.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (step 0 compiles and is never timed)")
    if cfg.reference and not os.path.isfile(os.path.join(cfg.reference, "train_gpt2.py")):
        parser.error(f"--reference {cfg.reference}: no train_gpt2.py there; "
                     f"clone karpathy/build-nanogpt into it")
    try:
        train_cfg, _ = parse_train_args(shlex.split(cfg.train_flags))
    except SystemExit:
        parser.error(f"--train_flags {cfg.train_flags!r}: not valid train_gpt2.py flags (see above)")
    return cfg, train_cfg


def write_synthetic_shards(data_dir, n_tokens):
    """Uniformly random GPT-2 token ids as uint16 .npy shards, unless data_dir already holds shards."""
    if os.path.isdir(data_dir) and any(re.search(r"(train|val).*\.(npy|bin)$", f)
                                       for f in os.listdir(data_dir)):
        return False
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("val_000000", n_tokens // 10), ("train_000001", n_tokens), ("train_000002", n_tokens)):
        np.save(os.path.join(data_dir, f"synthetic_{name}.npy"),
                rng.integers(0, GPT2_VOCAB_SIZE, n, dtype=np.uint16))
    return True


def run(script, args, cwd, cfg, tokens_per_step):
    """One training run: {'ms', 'tok_s', 'loss', 'peak_gb'}, or {'error': why}."""
    try:
        proc = subprocess.run([sys.executable, "-c", PEAK_PROBE, script, *map(str, args)], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=cfg.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {cfg.timeout} s (--timeout)"}
    steps = {int(s): (loss, float(tok.replace(",", ""))) for s, loss, tok in STEP_LINE.findall(proc.stdout)}
    timed = [steps[s] for s in range(cfg.warmup, cfg.warmup + cfg.steps) if s in steps]
    if proc.returncode != 0 or len(timed) < cfg.steps:
        tail = [line for line in proc.stdout.strip().splitlines()
                if not line.startswith("bench: ")][-1:] or ["no output"]
        if "out of memory" in proc.stdout.lower():
            return {"error": "out of memory"}
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    tok_s = statistics.median(tok for _, tok in timed)
    peak = re.search(r"^bench: peak memory (\d+) bytes", proc.stdout, re.MULTILINE)
    return {"ms": 1000 * tokens_per_step / tok_s, "tok_s": tok_s, "loss": timed[-1][0],
            "peak_gb": int(peak.group(1)) / 1e9 if peak else float("nan")}


def ours(mb, variant, cfg, run_dir):
    """train_gpt2.py at micro-batch mb: evals, HellaSwag, samples, plots and checkpoints outside
    the timed steps."""
    n = cfg.warmup + cfg.steps
    flags = shlex.split(cfg.train_flags) + shlex.split(variant) + ["--micro_batch_size", str(mb)]
    args = ["--data_dir", os.path.abspath(cfg.data_dir), "--log_dir", run_dir, "--max_steps", n,
            "--eval_interval", n, "--val_steps", 1, "--ckpt_interval", n, "--keep_last", 1, "--hellaswag", 0,
            "--sample_interval", 0, "--plot", 0, *flags]
    try:
        return run(os.path.join(REPO, "train_gpt2.py"), args, REPO, cfg,
                   parse_train_args(flags)[0].total_batch_size)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoint: 1.5 GB at 124M


def reference_edits(cfg, train_cfg, device):
    """(original line, edited line) pairs for build-nanogpt's train_gpt2.py; each must occur exactly once."""
    return [('data_root = "edu_fineweb10B"', f"data_root = {os.path.abspath(cfg.data_dir)!r}"),
            ("total_batch_size = 524288", f"total_batch_size = {train_cfg.total_batch_size}"),
            ("B = 64 # micro batch size", f"B = {cfg.reference_micro_batch_size} # micro batch size"),
            ("T = 1024 # sequence length", f"T = {train_cfg.seq_len} # sequence length"),
            ("use_compile = False",
             f"use_compile = {resolve_system(device, 'float32', train_cfg.compile)[2]}"),
            ("max_steps = 19073", f"max_steps = {cfg.warmup + cfg.steps + 1}"),
            ("val_loss_steps = 20", "val_loss_steps = 1"),
            ("model = GPT(GPTConfig(vocab_size=50304))",
             "model = GPT(GPTConfig(" + ", ".join(f"{k}={getattr(train_cfg, k)}" for k in MODEL_FLAGS)
             + "))"),
            # the training step's autocast (the evals' are indented deeper): in the runs' dtype, as ours
            ("        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):\n"
             "            logits, loss",
             f"        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled="
             f"{resolve_system(device, train_cfg.dtype, False)[1] == torch.bfloat16}):\n"
             f"            logits, loss"),
            # HellaSwag and sampling: off, as they already are with compile on (no download, no tokenizer).
            ("if (step % 250 == 0 or last_step) and (not use_compile):", "if False:"),
            ("if ((step > 0 and step % 250 == 0) or last_step) and (not use_compile):", "if False:"),
            ('enc = tiktoken.get_encoding("gpt2")', "enc = None"),
            ("from hellaswag import render_example, iterate_examples", "pass")]


def write_reference(cfg, train_cfg, device):
    """bench_train_gpt2.py: build-nanogpt's train_gpt2.py with reference_edits, beside it;
    returns the edits."""
    src = open(os.path.join(cfg.reference, "train_gpt2.py")).read()
    edits = reference_edits(cfg, train_cfg, device)
    for old, new in edits:
        if src.count(old) != 1:
            sys.exit(f"train_bench.py: error: --reference {cfg.reference}: train_gpt2.py has "
                     f"{src.count(old)} copies of {old!r}, expected 1; "
                     f"this script knows build-nanogpt's version of 2024-07")
        src = src.replace(old, new)
    with open(os.path.join(cfg.reference, "bench_train_gpt2.py"), "w") as f:
        f.write(src)
    return edits


def model_flops_per_token(train_cfg):
    """FLOPs per trained token of the model train_gpt2.py's flags describe
    (GPT.flops_per_token: 6N + 12LTd)."""
    with torch.device("meta"):
        return GPT(GPTConfig(**{k: getattr(train_cfg, k) for k in MODEL_FLAGS})).flops_per_token(
            train_cfg.seq_len)


def matmul_peak(device, dtype):
    """Measured dense matmul FLOP/s in dtype: the rate the runs' matmuls could reach at best."""
    cuda = device.startswith("cuda")
    n, iters = (8192, 50) if cuda else (1024, 20)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def main(argv=None):
    cfg, train_cfg = parse_args(argv)
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if train_cfg.device == "auto":
        cfg.train_flags += f" --device {device}"
    edits = write_reference(cfg, train_cfg, device) if cfg.reference else []  # before any run: fail fast
    wrote = write_synthetic_shards(cfg.data_dir, cfg.synthetic_tokens)
    print(f"{'wrote synthetic shards to' if wrote else 'using the shards in'} {cfg.data_dir}",
          file=sys.stderr)
    flops_per_token = model_flops_per_token(train_cfg)

    rows = []
    run_root = os.path.abspath(os.path.join(cfg.data_dir, "runs"))
    sizes = cfg.micro_batch_sizes.split(",")
    explicit = [int(s) for s in sizes if s != "max"]
    biggest = train_cfg.total_batch_size // train_cfg.seq_len

    def add_row(mb, variant, searching):
        rows.append({"name": f"train_gpt2.py {variant.strip()}".strip(), "mb": mb, "searching": searching,
                     "variant": variant,
                     "runs": [ours(mb, variant, cfg, os.path.join(run_root, f"run{len(rows)}"))]})
        print(f"  {rows[-1]['name']} {mb}: {rows[-1]['runs'][-1]}", file=sys.stderr, flush=True)

    def reference_run():
        return run("bench_train_gpt2.py", [], os.path.abspath(cfg.reference), cfg, train_cfg.total_batch_size)

    for variant in cfg.variants.split(";"):
        for mb in explicit:
            add_row(mb, variant, False)
        # `max`: double until a run is out of memory or one micro-batch is the whole batch
        mb = explicit[-1] * 2
        while (sizes[-1] == "max" and mb <= biggest
               and train_cfg.total_batch_size % (mb * train_cfg.seq_len) == 0):
            add_row(mb, variant, True)
            if "error" in rows[-1]["runs"][0]:
                break
            mb *= 2
    if cfg.reference:
        rows.append({"name": "build-nanogpt train_gpt2.py", "mb": cfg.reference_micro_batch_size,
                     "searching": False, "variant": None, "runs": [reference_run()]})
        print(f"  {rows[-1]['name']}: {rows[-1]['runs'][-1]}", file=sys.stderr, flush=True)
    for repeat in range(1, cfg.repeats):  # every row again, in the same order
        for i, r in enumerate(rows):
            if "error" not in r["runs"][0]:
                r["runs"].append(reference_run() if r["variant"] is None else
                                 ours(r["mb"], r["variant"], cfg, os.path.join(run_root, f"run{i}")))
                print(f"  {r['name']} {r['mb']} (repeat {repeat + 1}): {r['runs'][-1]}",
                      file=sys.stderr, flush=True)
    for r in rows:
        runs = r.pop("runs")
        failed = [x for x in runs if "error" in x]
        if failed:
            r.update(failed[0])
            continue
        r.update(tok_s=statistics.median(x["tok_s"] for x in runs),
                 ms=statistics.median(x["ms"] for x in runs),
                 peak_gb=max(x["peak_gb"] for x in runs), loss=runs[0]["loss"])

    dtype = resolve_system(device, train_cfg.dtype, False)[1] or torch.float32
    kind = str(dtype).removeprefix("torch.")
    peak = matmul_peak(device, dtype)
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    ref = rows[-1] if cfg.reference and "error" not in rows[-1] else None
    print(f"### train_gpt2.py training step, {train_cfg.n_layer}L/{train_cfg.n_head}H/{train_cfg.n_embd}d, "
          f"T={train_cfg.seq_len}, {train_cfg.total_batch_size:,} tokens per step\n\n"
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {gpu} ({platform.machine()}) "
          f"| torch {torch.__version__} | measured {kind} matmul peak {peak / 1e12:.1f} TFLOP/s | "
          f"{flops_per_token / 1e9:.3f} GFLOP per token | "
          f"median of {cfg.steps} steps after {cfg.warmup} warm-up"
          f"{f', median of {cfg.repeats} interleaved runs' if cfg.repeats > 1 else ''}\n\n"
          f"`{shlex.join(['python', 'bench/train_bench.py'] + (sys.argv[1:] if argv is None else argv))}`\n\n"
          f"| run | micro-batch | ms/step | tokens/s | MFU | peak GB | loss at last step "
          f"| vs build-nanogpt |\n"
          f"| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | {r['mb']} | {r['error']} | | | | | |")
            continue
        vs = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else ""
        print(f"| {r['name']} | {r['mb']}{' (search)' if r['searching'] else ''} | {r['ms']:,.1f} | "
              f"{r['tok_s']:,.0f} | {100 * r['tok_s'] * flops_per_token / peak:.1f}% | {r['peak_gb']:.1f} | "
              f"{r['loss']} | {vs} |")
    if edits:
        print("\nbuild-nanogpt edits (bench_train_gpt2.py beside its train_gpt2.py):")
        for old, new in edits:
            print(f"- `{old}` -> `{new}`")
    if any("error" in r and not (r["searching"] and r["error"] == "out of memory") for r in rows):
        sys.exit(1)  # a failed run, other than the `max` search's last probe


if __name__ == "__main__":
    main()
