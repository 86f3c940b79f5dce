"""Peak memory of one training step per rank: full state (one process) vs --fsdp 1 vs \
--activation_checkpointing 1.

    python bench/memory_bench.py                                  # 124M and gpt2-medium, T=256,
                                                                  # micro-batch 1, CPU
    python bench/memory_bench.py --device cuda --seq_len 1024 --micro_batch_size 8

Each row is one run of the real train_gpt2.py in a process of its own (torchrun for the FSDP rows), on
synthetic shards (bench/train_bench.py's), stopped once its second step is printed. Its peak is what
train_gpt2.py prints after the first step (forward, backward and AdamW's step, whose two moments are
allocated then), on rank 0: the process's peak RSS on CPU (everything: Python, torch, the model as built
before sharding, the activations), torch.cuda.max_memory_allocated on CUDA. "state per rank" is its
start-up line: weights, gradients and AdamW state, 16 bytes per parameter, halved per rank on 2 ranks.
A DDP rank holds the full state too, plus DDP's gradient buckets (about as much again as the gradients).
ms is the second step's time, for what recomputing the blocks costs; on 2 CPU cores, 2 ranks share them.
"""

import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.train_bench import write_synthetic_shards  # noqa: E402
from common import config_parser, option  # noqa: E402

SHAPES = {"124M": (12, 12, 768), "gpt2-medium": (24, 16, 1024)}  # n_layer, n_head, n_embd
VARIANTS = (("full state", 1, []),  # name, ranks, flags
            ("full state, activation checkpointing", 1, ["--activation_checkpointing", 1]),
            ("FSDP", 2, ["--fsdp", 1]),
            ("FSDP, activation checkpointing", 2, ["--fsdp", 1, "--activation_checkpointing", 1]))
PEAK_LINE = re.compile(r"^peak memory after the first step: ([\d.]+ \w+)", re.M)
STATE_LINE = re.compile(r"^memory per rank: .* = ([\d.]+ \w+),", re.M)
STEP_1 = re.compile(r"^step +1 \| loss .*\| dt (\d+)ms", re.M)


@dataclass
class MemoryBenchConfig:
    shapes: str = option("124M,gpt2-medium", "comma-separated model shapes: 124M, gpt2-medium, or LxHxD "
                                             "(e.g. 2x2x32)")
    seq_len: int = option(256, "tokens per sequence")
    micro_batch_size: int = option(1, "sequences per forward pass per rank")
    train_flags: str = option("", "more train_gpt2.py flags for every run")
    data_dir: str = option("bench/data", "shards to train on; synthetic ones are written here if it has none")
    synthetic_tokens: int = option(2_000_000, "tokens per synthetic train shard")
    device: str = option("cpu", "cpu or cuda")
    timeout: int = option(900, "seconds allowed for one run")


def parse_args(argv=None):
    parser = config_parser(MemoryBenchConfig, "memory_bench.py", __doc__)
    cfg = MemoryBenchConfig(**vars(parser.parse_args(argv)))
    for shape in cfg.shapes.split(","):
        if shape not in SHAPES and not re.fullmatch(r"\d+x\d+x\d+", shape):
            parser.error(f"--shapes {cfg.shapes}: {shape!r} is not 124M, gpt2-medium or LxHxD")
    return cfg


def shape_flags(shape):
    n_layer, n_head, n_embd = SHAPES.get(shape) or map(int, shape.split("x"))
    return ["--n_layer", n_layer, "--n_head", n_head, "--n_embd", n_embd]


def run(flags, nproc, cfg, log_dir):
    """One run until its step 1 line: {'state', 'peak', 'ms'}, or {'error': why}. Stopped there, or after
    --timeout, by a SIGKILL to its process group (a SIGTERM would make it write a checkpoint)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    tokens = cfg.micro_batch_size * cfg.seq_len * nproc
    args = ["--data_dir", os.path.abspath(cfg.data_dir), "--log_dir", log_dir, "--device", cfg.device,
            "--seq_len", cfg.seq_len, "--micro_batch_size", cfg.micro_batch_size,
            "--total_batch_size", tokens, "--max_steps", 3, "--val_steps", 1, "--hellaswag", 0,
            "--sample_interval", 0, "--plot", 0, *flags, *shlex.split(cfg.train_flags)]
    proc = subprocess.Popen(launcher + [os.path.join(REPO, "train_gpt2.py"), *map(str, args)], cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    timer = threading.Timer(cfg.timeout, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    out = ""
    for line in proc.stdout:
        out += line
        if STEP_1.search(out):
            break
    timed_out = not timer.is_alive()
    timer.cancel()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shutil.rmtree(log_dir, ignore_errors=True)
    peak, state, ms = PEAK_LINE.search(out), STATE_LINE.search(out), STEP_1.search(out)
    if not (peak and state and ms):
        tail = [ln for ln in out.strip().splitlines() if "Warning" not in ln][-1:] or ["no output"]
        return {"error": f"timed out after {cfg.timeout} s (--timeout)" if timed_out else tail[0][:200]}
    return {"state": state[1], "peak": peak[1], "ms": int(ms[1])}


def main(argv=None):
    cfg = parse_args(argv)
    wrote = write_synthetic_shards(cfg.data_dir, cfg.synthetic_tokens)
    print(f"{'wrote synthetic shards to' if wrote else 'using the shards in'} {cfg.data_dir}",
          file=sys.stderr)
    rows = []
    for shape in cfg.shapes.split(","):
        for name, nproc, flags in VARIANTS:
            log_dir = os.path.abspath(os.path.join(cfg.data_dir, "runs", f"run{len(rows)}"))
            rows.append({"shape": shape, "name": name, "nproc": nproc,
                         **run(shape_flags(shape) + flags, nproc, cfg, log_dir)})
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    measure = "torch.cuda.max_memory_allocated" if cfg.device.startswith("cuda") else "peak RSS"
    print(f"### Peak memory of one training step per rank, T={cfg.seq_len}, "
          f"micro-batch {cfg.micro_batch_size}\n\n"
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {where} "
          f"({platform.machine()}) | "
          f"torch {torch.__version__} | peak: {measure} of rank 0 after its first step\n\n"
          f"`{shlex.join(['python', 'bench/memory_bench.py'] + (sys.argv[1:] if argv is None else argv))}`"
          f"\n\n| shape | run | ranks | state per rank | peak per rank | ms (step 1) |\n"
          f"| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['name']} | {r['nproc']} | {r['error']} | | |")
        else:
            print(f"| {r['shape']} | {r['name']} | {r['nproc']} | {r['state']} | {r['peak']} | {r['ms']:,} |")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
