"""Peak memory per rank: of one training step (full state vs --fsdp 1 vs --activation_checkpointing 1),
and of a run's start (from scratch, from a Hugging Face GPT-2 folder, resumed) and checkpoint writing.

    python bench/memory_bench.py                                  # step table: 124M and gpt2-medium, T=256,
                                                                  # micro-batch 1, CPU
    python bench/memory_bench.py --device cuda --seq_len 1024 --micro_batch_size 8
    python bench/memory_bench.py --table startup --shapes gpt2-medium,gpt2-large --ranks 2,4 --seq_len 64
    python bench/memory_bench.py --table startup --repo ../older_checkout     # the same rows, another version

Each row is one run of the real train_gpt2.py in a process of its own (torchrun for the FSDP rows), on
synthetic shards (bench/train_bench.py's), stopped once its second step is printed.

Step table: its peak is what train_gpt2.py prints after the first step (forward, backward and AdamW's
step, whose two moments are allocated then), on rank 0: the process's peak RSS on CPU (everything: Python,
torch, the model as built before sharding, the activations), torch.cuda.max_memory_allocated on CUDA.
"state per rank" is its start-up line: weights, gradients and AdamW state, 16 bytes per parameter, halved
per rank on 2 ranks. A DDP rank holds the full state too, plus DDP's gradient buckets (about as much again
as the gradients). ms is the second step's time, for what recomputing the blocks costs; on 2 CPU cores, 2
ranks share them.

Startup table (Linux, CPU): each rank's private memory (RssAnon in /proc/PID/status: not the pages of a
memory-mapped checkpoint, which the page cache shares between processes), sampled every 10 ms, at its
peak in each phase: start-up (launch to the "memory per rank" line), the first step, and for a start from
scratch the writing of the checkpoint at step 1 (which the resume rows then start from). "idle" is what a
rank of the same run holds with a negligible model (1 layer, 8 wide); "bound" is 1.3 x (state per rank +
idle). A run whose ranks together pass --max_gb is stopped, and its row says so.
"""

import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.train_bench import write_synthetic_shards  # noqa: E402
from common import config_parser, option  # noqa: E402

SHAPES = {"124M": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
          "gpt2-xl": (48, 25, 1600)}  # n_layer, n_head, n_embd
VARIANTS = (("full state", 1, []),  # name, ranks, flags
            ("full state, activation checkpointing", 1, ["--activation_checkpointing", 1]),
            ("FSDP", 2, ["--fsdp", 1]),
            ("FSDP, activation checkpointing", 2, ["--fsdp", 1, "--activation_checkpointing", 1]))
PEAK_LINE = re.compile(r"^peak memory after the first step: ([\d.]+ \w+)", re.M)
STATE_LINE = re.compile(r"^memory per rank: .* = ([\d.]+ \w+),", re.M)
STEP_1 = re.compile(r"^step +1 \| loss .*\| dt (\d+)ms", re.M)
STEP_0 = re.compile(r"^step +0 \| loss ", re.M)
STARTED = re.compile(r"^memory per rank: ", re.M)
WROTE = re.compile(r"^wrote (\S+)", re.M)


@dataclass
class MemoryBenchConfig:
    table: str = option("step", "step: one training step's peak per rank, for each way to hold the state; "
                                "startup: each rank's private memory through a run's start, first step and "
                                "checkpoint")
    shapes: str = option("124M,gpt2-medium", "comma-separated model shapes: 124M, gpt2-medium, gpt2-large, "
                                             "gpt2-xl, or LxHxD (e.g. 2x2x32)")
    ranks: str = option("2,4", "startup table: comma-separated rank counts")
    seq_len: int = option(256, "tokens per sequence")
    micro_batch_size: int = option(1, "sequences per forward pass per rank")
    train_flags: str = option("", "more train_gpt2.py flags for every run")
    repo: str = option(REPO, "the checkout whose train_gpt2.py runs (an older one: the rows before a change)")
    data_dir: str = option("bench/data", "shards to train on; synthetic ones are written here if it has none")
    synthetic_tokens: int = option(2_000_000, "tokens per synthetic train shard")
    device: str = option("cpu", "cpu or cuda")
    timeout: int = option(900, "seconds allowed for one run")
    max_gb: float = option(0.0, "startup table: stop a run whose ranks together hold more private memory "
                                "(GB); 0: 90%% of the memory available at the start")


def parse_args(argv=None):
    parser = config_parser(MemoryBenchConfig, "memory_bench.py", __doc__)
    cfg = MemoryBenchConfig(**vars(parser.parse_args(argv)))
    if cfg.table not in ("step", "startup"):
        parser.error(f"--table {cfg.table}: expected step or startup")
    for shape in cfg.shapes.split(","):
        if shape not in SHAPES and not re.fullmatch(r"\d+x\d+x\d+", shape):
            parser.error(f"--shapes {cfg.shapes}: {shape!r} is not 124M, gpt2-medium, gpt2-large, gpt2-xl or "
                         f"LxHxD")
    if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", cfg.ranks):
        parser.error(f"--ranks {cfg.ranks}: expected comma-separated counts, e.g. 2,4")
    if not os.path.isfile(os.path.join(cfg.repo, "train_gpt2.py")):
        parser.error(f"--repo {cfg.repo}: no train_gpt2.py there")
    return cfg


def shape_of(shape):
    return SHAPES.get(shape) or tuple(map(int, shape.split("x")))


def shape_flags(shape):
    n_layer, n_head, n_embd = shape_of(shape)
    return ["--n_layer", n_layer, "--n_head", n_head, "--n_embd", n_embd]


def parameters(shape, vocab_size=50304, block_size=1024):
    """GPT's parameter count for a shape (the tied embedding once)."""
    n_layer, _, d = shape_of(shape)
    return vocab_size * d + block_size * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def rss_anon(pid):
    """A process's private resident memory in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def find_ranks(launcher):
    """{RANK: pid} of the processes torchrun (pid launcher) started as ranks: its children, each in a session
    of its own (so a SIGKILL to the launcher's process group misses them)."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(pid)
    return ranks


def kill_run(launcher, ranks):
    for pid in ranks.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(launcher, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Sampler(threading.Thread):
    """Every 10 ms, each rank's RssAnon: its peak per phase in `peaks` ({phase: {rank: bytes}}); the caller
    sets `phase`. All ranks together over max_bytes: the run is killed, `over` set."""

    def __init__(self, launcher, nproc, max_bytes):
        super().__init__(daemon=True)
        self.launcher, self.nproc, self.max_bytes = launcher, nproc, max_bytes
        self.phase, self.peaks, self.ranks, self.over, self.done = None, {}, {}, False, False

    def run(self):
        while not self.done:
            if len(self.ranks) < self.nproc:
                self.ranks = find_ranks(self.launcher)
            now = {rank: rss_anon(pid) for rank, pid in self.ranks.items()}
            peaks = self.peaks.setdefault(self.phase, {}) if self.phase else {}  # None: past the last phase
            for rank, used in now.items():
                peaks[rank] = max(peaks.get(rank, 0), used)
            if sum(now.values()) > self.max_bytes:
                self.over = True
                kill_run(self.launcher, self.ranks)
                return
            time.sleep(0.01)


def launch(args, nproc, cfg, phases, max_bytes=float("inf")):
    """One run of train_gpt2.py (torchrun for nproc > 1) until the last of phases [(name, regex ending it)]
    is printed: (its output, {phase: {rank: peak RssAnon}}, why it failed or None). Then, or after --timeout,
    its process group gets a SIGKILL (a SIGTERM would make it write a checkpoint)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.Popen(launcher + [os.path.join(cfg.repo, "train_gpt2.py"), *map(str, args)],
                            cwd=cfg.repo, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    sampler = Sampler(proc.pid, nproc, max_bytes)
    sampler.phase = phases[0][0]
    if nproc > 1 and sys.platform == "linux":
        sampler.start()
    timer = threading.Timer(cfg.timeout, lambda: kill_run(proc.pid, sampler.ranks or find_ranks(proc.pid)))
    timer.start()
    out, ended = "", 0
    for line in proc.stdout:
        out += line
        while ended < len(phases) and phases[ended][1].search(out):
            ended += 1
            sampler.phase = phases[ended][0] if ended < len(phases) else None
        if ended == len(phases):
            break
    timed_out = not timer.is_alive()
    timer.cancel()
    sampler.done = True
    kill_run(proc.pid, find_ranks(proc.pid) if nproc > 1 else {})
    proc.wait()
    why = None
    if sampler.over:
        why = f"stopped: its ranks together passed {max_bytes / 1e9:.1f} GB (--max_gb)"
    elif timed_out:
        why = f"timed out after {cfg.timeout} s (--timeout)"
    elif ended < len(phases):
        error = re.search(r"^train_gpt2\.py: error: .*", out, re.M)
        tail = [ln for ln in out.strip().splitlines() if "Warning" not in ln][-1:] or ["no output"]
        why = (error[0] if error else tail[0])[:200]
    return out, sampler.peaks, why


def common_flags(cfg, tokens, log_dir):
    return ["--data_dir", os.path.abspath(cfg.data_dir), "--log_dir", log_dir, "--device", cfg.device,
            "--seq_len", cfg.seq_len, "--micro_batch_size", cfg.micro_batch_size,
            "--total_batch_size", tokens, "--val_steps", 1, "--hellaswag", 0, "--sample_interval", 0,
            "--plot", 0,
            *shlex.split(cfg.train_flags)]


def run(flags, nproc, cfg, log_dir):
    """A step-table run until its step 1 line: {'state', 'peak', 'ms'}, or {'error': why}."""
    args = common_flags(cfg, cfg.micro_batch_size * cfg.seq_len * nproc, log_dir) + ["--max_steps", 3, *flags]
    out, _, why = launch(args, nproc, cfg, [("run", STEP_1)])
    shutil.rmtree(log_dir, ignore_errors=True)
    peak, state, ms = PEAK_LINE.search(out), STATE_LINE.search(out), STEP_1.search(out)
    if why or not (peak and state):
        return {"error": why or "no peak memory line"}
    return {"state": state[1], "peak": peak[1], "ms": int(ms[1])}


def hf_folder(shape, cfg):
    """A random GPT-2 of the shape saved as a Hugging Face folder in data_dir (made once, in a process of its
    own, which frees its memory when it exits)."""
    folder = os.path.abspath(os.path.join(cfg.data_dir, f"hf_{shape}"))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        n_layer, n_head, n_embd = shape_of(shape)
        make = ("import sys; from transformers import GPT2Config, GPT2LMHeadModel; "
                f"GPT2LMHeadModel(GPT2Config(n_layer={n_layer}, n_head={n_head}, n_embd={n_embd}))"
                f".save_pretrained(sys.argv[1])")
        subprocess.run([sys.executable, "-c", make, folder], check=True)
    return folder


def startup_rows(shape, nproc, cfg, max_bytes):
    """The startup table's rows for one shape and rank count: FSDP from scratch (writing the checkpoint the
    resumes start from), FSDP resumed, FSDP from a Hugging Face folder, and with 2 ranks DDP resumed; each
    with the idle peak per rank of a run of a negligible model."""
    log_dir = os.path.abspath(os.path.join(cfg.data_dir, "runs", f"startup_{shape}_{nproc}"))
    shutil.rmtree(log_dir, ignore_errors=True)
    flags = common_flags(cfg, cfg.micro_batch_size * cfg.seq_len * nproc, log_dir)
    started = [("start-up", STARTED), ("first step", STEP_0)]
    resumed = [("start-up", STARTED), ("first step", STEP_1)]
    fsdp = ["--fsdp", 1, "--max_steps", 1]
    # (start, its flags, its phases, parameters, ranks holding the state between them)
    runs = [("idle", shape_flags("1x1x8") + fsdp, started, 0, nproc),
            ("FSDP, from scratch", shape_flags(shape) + fsdp, started + [("checkpoint", WROTE)],
             parameters(shape), nproc),
            ("FSDP, resumed", ["--init_from", "resume", "--fsdp", 1, "--max_steps", 2], resumed,
             parameters(shape), nproc),
            ("FSDP, Hugging Face folder", ["--init_from", "hf"] + fsdp, started, parameters(shape, 50257),
             nproc)]
    if nproc == 2:
        runs.append(("DDP, resumed", ["--init_from", "resume", "--fsdp", 0, "--max_steps", 2], resumed,
                     parameters(shape), 1))
    rows, idle = [], {}
    for name, run_flags, phases, n, shared_by in runs:
        row = {"shape": shape, "name": name, "nproc": nproc, "state": 16 * n / shared_by, "idle": idle}
        if nproc * 1.3 * row["state"] > max_bytes:
            rows.append({**row, "error": f"not run: {nproc} ranks need ~{nproc * row['state'] / 1e9:.0f} GB"})
            continue
        if "hf" in run_flags:
            run_flags = ["--init_from", hf_folder(shape, cfg)] + fsdp
        if "resume" in run_flags and not glob.glob(os.path.join(log_dir, "model_*.pt")):
            # The FSDP run could write none (--max_gb): one process writes it, holding no second copy (its
            # state dict is its own tensors)
            shutil.rmtree(log_dir, ignore_errors=True)
            launch(flags + shape_flags(shape) + ["--max_steps", 1], 1, cfg, [("checkpoint", WROTE)])
            row["name"] += " (from one process's checkpoint)"
        own = "resumed" not in name and "scratch" not in name  # the resumes continue the run from scratch
        shutil.rmtree(f"{log_dir}_{len(rows)}", ignore_errors=True)  # what a killed benchmark left there
        out, peaks, why = launch(flags + run_flags + (["--log_dir", f"{log_dir}_{len(rows)}"] if own else []),
                                 nproc, cfg, phases, max_bytes)
        shutil.rmtree(f"{log_dir}_{len(rows)}", ignore_errors=True)
        wrote = WROTE.search(out)
        rows.append({**row, "peaks": peaks, "error": why,
                     "checkpoint": os.path.getsize(wrote[1]) if wrote and os.path.isfile(wrote[1]) else None})
        print(f"  {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        if name == "idle":
            idle.update({rank: max(p.get(rank, 0) for p in peaks.values()) for rank in range(nproc)})
    shutil.rmtree(log_dir, ignore_errors=True)
    return rows[1:]


def gb(n):
    return f"{n / 1e9:.2f}" if n else "-"


def others(peaks):
    """The highest of a phase's peaks on the ranks other than 0 (those that read nothing), or None."""
    return max((peak for rank, peak in peaks.items() if rank != 0), default=None)


def print_startup_table(rows, cfg, argv):
    print(f"### Private memory per rank (RssAnon) as a run starts, T={cfg.seq_len}, micro-batch "
          f"{cfg.micro_batch_size}\n\n{header(cfg, argv)}\n\n"
          f"GB (10^9 bytes). state: the weights, gradients and AdamW moments a rank holds in training (16 "
          f"bytes per parameter, over the ranks under FSDP); idle: a rank of a negligible model; other "
          f"ranks: the highest of ranks 1 to N-1; bound: 1.3 x (state + idle); ratios: the other ranks' "
          f"peak / (state + idle).\n\n"
          f"| shape | start | ranks | state | idle | rank 0: start-up | first step | writing the checkpoint "
          f"(file) | other ranks: start-up | first step | bound | start-up ratio | first-step ratio |\n"
          f"| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        peaks, idle = r.get("peaks", {}), others(r["idle"]) or 0
        start, first, writing = (peaks.get(p, {}) for p in ("start-up", "first step", "checkpoint"))
        file = f" ({gb(r['checkpoint'])})" if r.get("checkpoint") else ""
        ratios = [f"{peak / (r['state'] + idle):.2f}" if peak else "-"
                  for peak in (others(start), others(first))]
        note = f" ({r['error']})" if r.get("error") else ""
        print(f"| {r['shape']} | {r['name']}{note} | "
              f"{r['nproc']} | {gb(r['state'])} | {gb(idle)} | {gb(start.get(0))} | {gb(first.get(0))} | "
              f"{gb(writing.get(0))}{file} | {gb(others(start))} | {gb(others(first))} | "
              f"{gb(1.3 * (r['state'] + idle))} | {' | '.join(ratios)} |")


def header(cfg, argv):
    where = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    command = shlex.join(["python", "bench/memory_bench.py"] + (sys.argv[1:] if argv is None else argv))
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {where} "
            f"({platform.machine()}) | torch {torch.__version__}\n\n`{command}`")


def main(argv=None):
    cfg = parse_args(argv)
    wrote = write_synthetic_shards(cfg.data_dir, cfg.synthetic_tokens)
    print(f"{'wrote synthetic shards to' if wrote else 'using the shards in'} {cfg.data_dir}",
          file=sys.stderr)
    rows = []
    if cfg.table == "startup":
        with open("/proc/meminfo") as f:
            available = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
        max_bytes = cfg.max_gb * 1e9 or 0.9 * available
        for shape in cfg.shapes.split(","):
            for nproc in map(int, cfg.ranks.split(",")):
                rows += startup_rows(shape, nproc, cfg, max_bytes)
        print_startup_table(rows, cfg, argv)
        return
    for shape in cfg.shapes.split(","):
        for name, nproc, flags in VARIANTS:
            log_dir = os.path.abspath(os.path.join(cfg.data_dir, "runs", f"run{len(rows)}"))
            rows.append({"shape": shape, "name": name, "nproc": nproc,
                         **run(shape_flags(shape) + flags, nproc, cfg, log_dir)})
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    measure = "torch.cuda.max_memory_allocated" if cfg.device.startswith("cuda") else "peak RSS"
    print(f"### Peak memory of one training step per rank, T={cfg.seq_len}, "
          f"micro-batch {cfg.micro_batch_size}\n\n{header(cfg, argv)}\n\npeak: {measure} of rank 0 after its "
          f"first step\n\n| shape | run | ranks | state per rank | peak per rank | ms (step 1) |\n"
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
