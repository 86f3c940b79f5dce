"""Benchmark GPT.generate()'s KV cache against the loop it replaces, which recomputes the whole \
sequence per token.

    python bench/generate_bench.py                                      # 5 x 200 new tokens,
                                                                        # greedy and sampled
    python bench/generate_bench.py --sizes 1x500,10x500 --device cuda   # the GPU sizes
    python bench/generate_bench.py --repeats 3 --sampling 0

The model is GPT-2 124M's shape (GPTConfig() defaults, GPT-2's 50257-token vocabulary; --shape another) with
random weights: none are reachable offline, and the time per token does not depend on their values. Each size
starts from the default prompt ("Hello, I'm a language model,", 8 tokens) and is run greedy (temperature
0), then sampled (generate()'s defaults: temperature 1, top_k 50, seed 42). The cached and recompute runs
alternate, A B A B ..., --repeats times each, so that load from other processes hits both alike; the
table shows the median. tokens/s = sequences x new tokens / wall time of the generate() call, the
prompt's prefill included. Greedy outputs must be equal token for token, else the script exits 1; sampled
outputs are compared too (a near-tie in float32 could send one row elsewhere) and reported. Before
each size's timings, both loops run once untimed with 8 new tokens (first-call allocations, kernel
setup). Torch's default thread count is kept.
"""

import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common import config_parser, option  # noqa: E402
from train_gpt2 import GPT, GPTConfig, resolve_system  # noqa: E402

PROMPT = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # "Hello, I'm a language model," in GPT-2 tokens
TARGET = 5.0  # the KV cache's speedup we aim for at 5 x 200 on CPU


@dataclass
class BenchConfig:
    sizes: str = option("5x200", "comma-separated SEQUENCESxNEW_TOKENS, e.g. 1x500,10x500")
    repeats: int = option(1, "timed runs of each loop per size and decoding, interleaved; the table shows "
                             "the median")
    sampling: bool = option(True, "also time sampled decoding (top_k 50), not only greedy")
    device: str = option("cpu", "cpu, cuda, cuda:N or mps")
    dtype: str = option("float32", "float32, or bfloat16 or float16 (autocast)")
    shape: str = option("124M", "the model: 124M (GPT-2's) or LAYERSxHEADSxWIDTH, "
                                "e.g. 2x2x32 for a quick check")


def parse_args(argv=None):
    parser = config_parser(BenchConfig, "generate_bench.py", __doc__)
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    try:
        sizes = [tuple(int(n) for n in size.split("x")) for size in cfg.sizes.split(",")]
        assert all(len(s) == 2 and s[0] > 0 and s[1] > 0 for s in sizes)
    except (ValueError, AssertionError):
        parser.error(f"--sizes {cfg.sizes}: expected SEQUENCESxNEW_TOKENS[,...], e.g. 5x200 or 1x500,10x500")
    if cfg.repeats < 1 or cfg.dtype not in ("float32", "bfloat16", "float16"):
        parser.error("--repeats must be >= 1 and --dtype float32, bfloat16 or float16")
    if cfg.shape != "124M" and not re.fullmatch(r"\d+x\d+x\d+", cfg.shape):
        parser.error(f"--shape {cfg.shape}: expected 124M or LAYERSxHEADSxWIDTH, e.g. 2x2x32")
    return cfg, sizes


def timed(model, n_seq, n_new, temperature, recompute, device, autocast):
    """(tokens/s, output) of one generate() call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(PROMPT, n_seq, n_new, temperature=temperature, autocast=autocast,
                         recompute=recompute)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n_seq * n_new / (time.perf_counter() - t0), out


def bench_size(model, n_seq, n_new, decoding, cfg, autocast):
    """One table row: the median tokens/s of each loop, and whether their tokens agree."""
    temperature = 0.0 if decoding == "greedy" else 1.0
    for recompute in (False, True):  # untimed: first-call allocations and kernel setup for this batch size
        model.generate(PROMPT, n_seq, 8, autocast=autocast, recompute=recompute)
    rates, outs = {False: [], True: []}, {}
    for _ in range(cfg.repeats):
        for recompute in (False, True):  # interleaved, so that a burst of load hits both alike
            rate, outs[recompute] = timed(model, n_seq, n_new, temperature, recompute, cfg.device, autocast)
            rates[recompute].append(rate)
            print(f"  {n_seq}x{n_new} {decoding:7s} {'recompute' if recompute else 'KV cache':9s} "
                  f"{rate:9.1f} tok/s",
                  file=sys.stderr, flush=True)
    same_rows = sum(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))
    kv, full = statistics.median(rates[False]), statistics.median(rates[True])
    return dict(size=f"{n_seq} x {n_new}", decoding=decoding, kv=kv, full=full, speedup=kv / full,
                same_rows=same_rows, n_seq=n_seq)


def main(argv=None):
    cfg, sizes = parse_args(argv)
    torch.manual_seed(0)
    shape = {} if cfg.shape == "124M" else dict(zip(("n_layer", "n_head", "n_embd"),
                                                    map(int, cfg.shape.split("x"))))
    model = GPT(GPTConfig(**shape)).to(cfg.device).eval()
    device_type = "cuda" if cfg.device.startswith("cuda") else cfg.device
    autocast = resolve_system(cfg.device, cfg.dtype, False)[3]
    rows = [bench_size(model, n_seq, n_new, decoding, cfg, autocast) for n_seq, n_new in sizes
            for decoding in ("greedy", "sampled") if decoding == "greedy" or cfg.sampling]

    device = torch.cuda.get_device_name(cfg.device) if device_type == "cuda" else cfg.device
    print(f"### generate(): KV cache vs recompute, {cfg.shape.replace('124M', 'GPT-2 124M')} shape, "
          f"random weights\n\n"
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {platform.machine()}, "
          f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads | torch {torch.__version__} "
          f"| {device}, {cfg.dtype}\n\n"
          f"`{shlex.join(['python', 'bench/generate_bench.py'] + (argv or sys.argv[1:]))}`\n\n"
          f"| sequences x new tokens | decoding | KV cache tok/s | recompute tok/s | speedup "
          f"| same tokens |\n"
          f"| --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['size']} | {r['decoding']} | {r['kv']:,.1f} | {r['full']:,.1f} | {r['speedup']:.1f}x "
              f"| {r['same_rows']}/{r['n_seq']} rows |")
    print(f"\nmedian of {cfg.repeats} run(s) each.")
    for r in rows:
        if r["size"] == "5 x 200" and r["decoding"] == "greedy":
            print(f"Target >= {TARGET:.0f}x at 5 x 200 greedy: "
                  f"{'PASS' if r['speedup'] >= TARGET else 'FAIL'} ({r['speedup']:.1f}x)")
    if any(r["same_rows"] < r["n_seq"] for r in rows if r["decoding"] == "greedy"):
        print("FAIL: greedy tokens differ between the KV cache and the recompute loop")
        sys.exit(1)


if __name__ == "__main__":
    main()
