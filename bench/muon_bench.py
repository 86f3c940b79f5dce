"""Muon against AdamW: the same model on the same tokens, several learning rates each, interleaved.

    python bench/muon_bench.py      # CPU: Tiny Shakespeare in an 8K vocabulary, 6 layers x 192 wide
    python bench/muon_bench.py --data_dir edu_fineweb10B --vocab_size 0 \\
        --train_flags "--max_steps 2000 --warmup_steps 100 --eval_interval 100" \\
        --adamw_lrs 6e-4,1.2e-3,2.4e-3 --muon_lrs 1.2e-3,2.4e-3,4.8e-3    # one GPU, GPT-2 124M,
                                                                          # 1B tokens a run

Each run is the real train_gpt2.py: --optimizer adamw or muon at --max_lr LR with --min_lr LR/10 (the
recipe's warmup then cosine, which in a muon run drives both optimizers), on --train_flags (the scale:
model shape, batch, steps; train_gpt2.py's defaults, GPT-2 124M on 524,288 tokens a step, for any flag
not given). The runs alternate AdamW, Muon, AdamW, ... so that a drifting machine hits both alike. The val
loss is read from each run's log.txt at every eval. The table has, per run, the val loss at a quarter,
half, three quarters and all of the tokens, and the tokens it needs to first reach the target, the best
AdamW run's final val loss, as a multiple of those the best AdamW run needs (the goal: Muon in <= 0.6x).
A run's loss mid-schedule is above what the same tokens reach with the learning rate annealed by then, so
each Muon lr runs again with its schedule ending at --short_schedule (0.6) of the steps: the goal, measured
directly. A finished run in --out_dir is reused, so a stopped sweep continues where it stopped.

--vocab_size N > 0 is a benchmark-only transform: the shards are rewritten (beside them, once) with the
N-1 most frequent train token ids as 0..N-2 and N-1 for every other id, so that the blocks' matrices, the
part Muon steps, hold most of a small model's parameters instead of a 50K-row embedding. The default
--data_dir is Tiny Shakespeare, made with fineweb.py --preset shakespeare when missing.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common import config_parser, option  # noqa: E402
from plot import read_log  # noqa: E402
from train_gpt2 import parse_args as parse_train_args  # noqa: E402

CPU_SCALE = ("--n_layer 6 --n_head 6 --n_embd 192 --seq_len 128 --micro_batch_size 4 --total_batch_size 512 "
             "--max_steps 400 --warmup_steps 32 --eval_interval 20 --val_steps 8 --device cpu "
             "--dtype float32 --compile 0")


@dataclass
class BenchConfig:
    data_dir: str = option("bench/data/shakespeare", "token shards (the default is made if missing)")
    vocab_size: int = option(8192, "remap the shards to this many ids (0 = as they are, GPT-2's vocabulary)")
    train_flags: str = option(CPU_SCALE, "train_gpt2.py flags of every run: the scale")
    adamw_lrs: str = option("6e-4,1.2e-3,2.4e-3", "comma-separated --max_lr values of the AdamW runs")
    muon_lrs: str = option("2.4e-3,4.8e-3,9.6e-3", "comma-separated --max_lr values of the Muon runs")
    short_schedule: float = option(0.6, "each Muon lr again with its schedule ending at this fraction of the "
                                        "steps (0 = none): the goal's tokens with the lr annealed there, as "
                                        "a run still mid-schedule has not")
    out_dir: str = option("bench/data/muon_runs", "the runs' log folders (a finished run there is reused)")
    timeout: int = option(36000, "seconds allowed for one run")


def remap_vocab(data_dir, n):
    """data_dir's shards with the n-1 most frequent train ids as 0..n-2 and every other id as n-1, in a
    folder beside it (written once)."""
    out = f"{data_dir.rstrip('/')}_vocab{n}"
    if os.path.isdir(out):
        return out
    names = sorted(f for f in os.listdir(data_dir) if f.endswith(".npy"))
    counts = sum(np.bincount(np.load(os.path.join(data_dir, f)), minlength=2**16)
                 for f in names if "train" in f)
    table = np.full(2**16, n - 1, dtype=np.uint16)
    table[np.argsort(-counts, kind="stable")[:n - 1]] = np.arange(n - 1)
    os.makedirs(out + ".tmp", exist_ok=True)
    for f in names:
        np.save(os.path.join(out + ".tmp", f), table[np.load(os.path.join(data_dir, f))])
    os.replace(out + ".tmp", out)
    return out


def run(optimizer, lr, steps, data_dir, cfg, log_dir):
    """One train_gpt2.py run of `steps` steps: ({step: val loss}, its output). A log_dir already holding a
    finished run (its val loss at its last step) is read instead: a stopped sweep continues there."""
    log_file, out_file = os.path.join(log_dir, "log.txt"), os.path.join(log_dir, "output.txt")
    if os.path.isfile(out_file) and re.search(rf"^{steps} val ", open(log_file).read(), re.M):
        output = open(out_file).read()
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
        args = [sys.executable, os.path.join(REPO, "train_gpt2.py"), *shlex.split(cfg.train_flags),
                "--max_steps", str(steps), "--data_dir", data_dir, "--log_dir", log_dir,
                "--optimizer", optimizer, "--max_lr", str(lr), "--min_lr", str(lr / 10),
                "--hellaswag", "0", "--sample_interval", "0", "--plot", "0",
                "--ckpt_interval", "10000000"]
        args += ["--vocab_size", str(cfg.vocab_size)] if cfg.vocab_size else []
        proc = subprocess.run(args, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=cfg.timeout)
        output = proc.stdout
        if proc.returncode != 0:
            sys.exit(f"muon_bench.py: error: {shlex.join(args[1:])} failed:\n{output[-2000:]}")
        for f in os.listdir(log_dir):  # the checkpoint (1.5 GB at 124M); log.txt stays
            if f.endswith(".pt"):
                os.remove(os.path.join(log_dir, f))
        with open(out_file, "w") as f:
            f.write(output)
    return dict(zip(*read_log(log_file).get("val", ([], [])))), output


def first_reaching(val, target):
    return next((step for step in sorted(val) if val[step] <= target), None)


def main(argv=None):
    parser = config_parser(BenchConfig, "muon_bench.py", __doc__)
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    train_cfg, _ = parse_train_args(shlex.split(cfg.train_flags))
    lrs = {name: [float(x) for x in getattr(cfg, f"{name}_lrs").split(",")] for name in ("adamw", "muon")}
    if cfg.data_dir == BenchConfig.data_dir and not os.path.isdir(cfg.data_dir):
        subprocess.run([sys.executable, os.path.join(REPO, "fineweb.py"), "--preset", "shakespeare",
                        "--out_dir", cfg.data_dir], check=True, stdout=subprocess.DEVNULL)
    data_dir = remap_vocab(cfg.data_dir, cfg.vocab_size) if cfg.vocab_size else cfg.data_dir

    steps, tokens = train_cfg.max_steps, train_cfg.total_batch_size
    short = round(steps * cfg.short_schedule)
    order = [(name, lr, steps) for i in range(max(map(len, lrs.values())))
             for name in ("adamw", "muon") for lr in lrs[name][i:i + 1]]
    order += [("muon", lr, short) for lr in lrs["muon"]] if 0 < short < steps else []
    runs, split = {}, None
    for name, lr, n in order:
        folder = os.path.join(cfg.out_dir, f"{name}_{lr:g}" + (f"_{n}steps" if n != steps else ""))
        runs[name, lr, n], out = run(name, lr, n, data_dir, cfg, folder)
        split = re.search(r"^muon: \d+ block matrices \(([\d,]+) parameters\)", out, re.M) or split
        total = re.search(r"^([\d,]+) parameters \|", out, re.M)[1]
        print(f"{name} max_lr {lr:g}, {n} steps: final val {runs[name, lr, n][n]:.4f}",
              file=sys.stderr, flush=True)

    best = min((key for key in runs if key[0] == "adamw"), key=lambda key: runs[key][steps])
    target = runs[best][steps]
    best_needs = first_reaching(runs[best], target)
    marks = [min(runs[best], key=lambda s: abs(s - steps * q)) for q in (0.25, 0.5, 0.75, 1)]
    muon_share = int(split[1].replace(",", "")) / int(total.replace(",", ""))
    print(f"{train_cfg.n_layer}L/{train_cfg.n_head}H/{train_cfg.n_embd}d, vocab {cfg.vocab_size or 'GPT-2'}, "
          f"{total} parameters ({100 * muon_share:.0f}% in the blocks' matrices, which Muon steps), "
          f"T={train_cfg.seq_len}, {tokens:,} tokens per step, warmup {train_cfg.warmup_steps} steps\n")
    print(f"| optimizer | max_lr | schedule | "
          + " | ".join(f"val @ {s * tokens / 1e6:.3g}M tok" for s in marks)
          + f" | tokens to val {target:.4f} | vs best AdamW |\n|---|---:|---:|" + "---:|" * (len(marks) + 2))
    for name, lr, n in sorted(runs, key=lambda key: (key[0], -key[2], key[1])):
        val = runs[name, lr, n]
        needs = first_reaching(val, target)
        reach = f"{needs * tokens / 1e6:.3g}M" if needs is not None else "not reached"
        ratio = f"{needs / best_needs:.2f}x" if needs is not None else "-"
        print(f"| {name} | {lr:g} | {n} steps | "
              + " | ".join(f"{val[s]:.4f}" if s in val else "" for s in marks)
              + f" | {reach} | {ratio} |")


if __name__ == "__main__":
    main()
