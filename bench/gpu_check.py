"""Every CUDA path of train_gpt2.py checked and timed on one GPU, in one command, within a wall budget.

    python bench/gpu_check.py --out gpu_check              # on a CUDA machine: gpu_check/report.md,
                                                           # gpu_check/logs/
    python bench/gpu_check.py --out /tmp/rehearsal --dry-run   # the same code paths on CPU, tiny shapes
                                                               # (the tests)
    python bench/gpu_check.py --out gpu_check2 --stages 4,5    # what a first call skipped for time

The stages, in order of importance (bench/METHOD.md says how they time):
  1. the machine: GPU, driver, torch/CUDA/Triton versions, and the bfloat16 dense matmul rate measured here
     (train_bench.matmul_peak), which every MFU in the report is against; it always runs;
  2. the GPT-2 124M recipe (T=1024, bfloat16, compile, fused AdamW) at micro-batch 64, and build-nanogpt's
     train_gpt2.py on the same shards in the same run (bench/train_bench.py --reference), beside the targets;
  3. correctness: a few steps of a small model per path (float16 with one injected overflow, bfloat16,
     chunked loss, FSDP and activation checkpointing under torchrun --nproc_per_node=1, resume, recompiles),
     each compared with float32 on the same device within TOLERANCES; the runs go --jobs at a time;
  4. the levers, before/after in one bench/train_bench.py run: chunked loss, liger-kernel (if installed and
     train_gpt2.py has a flag for it), the compile mode max-autotune-no-cudagraphs (if train_gpt2.py has
     --compile_mode); then the largest micro-batch that fits (a second run: train_bench.py's `max` search);
  5. hellaswag.py on all 10,042 val tasks (wall seconds, and acc_norm against CPU's), generate.py compiled,
     and bench/generate_bench.py's KV cache vs recompute at 1 and 10 sequences x 500 tokens.
Every run is a subprocess of a script users run (train_gpt2.py through its flags, torchrun, hellaswag.py,
generate.py) or of a bench that runs them; its output is in --out/logs. A failing stage records its error
and the next one starts. At --budget_s the running subprocess is killed, the stages left are listed as
skipped for time, and report.md is written (it is rewritten after every stage; each section says how long
its stage took). Exit status 1 if a correctness check failed or a stage errored. On a fresh machine most
of the time is torch.compile's; `--check_flags "--compile 0"` runs stage 3 eager.

What this needs that is not in git, and where it comes from (a missing one is a "skipped" row, not a crash):
- bench/build-nanogpt (stage 2's side by side): git clone https://github.com/karpathy/build-nanogpt
  bench/build-nanogpt (it is git-ignored), or --reference DIR; its script needs tiktoken
  (pip install tiktoken).
- the full HellaSwag val file (stage 5): hellaswag_val.jsonl in --hellaswag_dir, by default the
  shared/data/hellaswag beside this checkout if there is one, else hellaswag.py's cache, which `python
  hellaswag.py --limit 1` fills from rowanz/hellaswag on GitHub (or copy the file into the git-ignored
  bench/data/hellaswag/ and pass that). The check itself never downloads.
- training shards: none. Synthetic ones (train_bench.write_synthetic_shards) and small learnable ones are
  written into --work_dir; --data_dir points the timed runs at FineWeb-edu shards instead.
- liger-kernel (optional, stage 4): pip install liger-kernel; used only if train_gpt2.py has a flag for it.
The GPU's settings (clocks, power limit, MIG, persistence mode) are read, never changed.
"""

import ast
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.train_bench import PEAK_PROBE, model_flops_per_token, write_synthetic_shards  # noqa: E402
from common import UserError, config_parser, option  # noqa: E402
from hellaswag import hellaswag_cache  # noqa: E402
from plot import read_log  # noqa: E402
from train_gpt2 import TrainConfig, parse_args as parse_train_args  # noqa: E402

SHARED_HELLASWAG = os.path.normpath(os.path.join(REPO, "../shared/data/hellaswag"))
HELLASWAG_EXCERPT = os.path.join(REPO, "tests", "data")  # the first 200 val tasks, in git
REFERENCE_CLONE = "git clone https://github.com/karpathy/build-nanogpt bench/build-nanogpt"
TARGETS = {"tok_s": 500_000, "mfu": 54.0, "vs_reference": 1.2}  # issue 24: one H200, the recipe
# Largest |difference| of any step's train loss from the float32 run's (log.txt keeps 6 decimals). float32
# variants differ by kernel choice and summation order only; on CUDA their matmuls are TF32 (train_gpt2.py
# sets matmul precision "high"). At the GPU check's shape on CPU, bfloat16 autocast was within 1.2e-3 of
# float32 over the 6 steps; FSDP's bfloat16 mixed precision also holds the weights in bfloat16 (in the dry
# run 7x further off than autocast). A resumed run should be bitwise equal; flash attention's backward
# accumulates with atomics on CUDA, so there it is within "resume" (losses and weights).
TOLERANCES = {"float16": 0.02, "bfloat16": 0.05, "float32": 1e-3, "resume": 1e-5}
OVERFLOW_STEP = 2  # the float16 step whose gradients are made inf
STEPS = 6  # optimizer steps of every correctness run; checkpoints at 3 and 6, the resume from 3

# The check's sizes, and the dry run's: tiny and on CPU, the same code paths in about a minute.
SIZES = {
    "gpu": dict(recipe_flags="", micro_batch=64, warmup=3, steps=6, synthetic_tokens=20_000_000,
                check_shape="--n_layer 2 --n_head 4 --n_embd 256 --seq_len 256 --micro_batch_size 8 "
                            "--total_batch_size 4096",
                hellaswag_limit=0, hellaswag_in_training=64,
                random_model="--micro_batch_size 1 --total_batch_size 1024",
                generate_sizes="1x500,10x500", generate_flags="",
                generate="--max_new_tokens 500 --num_return_sequences 10"),
    "dry": dict(recipe_flags="--n_layer 2 --n_head 2 --n_embd 32 --block_size 32 --seq_len 32 "
                             "--total_batch_size 512",
                micro_batch=8, warmup=1, steps=2, synthetic_tokens=20_000,
                check_shape="--n_layer 2 --n_head 2 --n_embd 32 --block_size 128 --seq_len 32 "
                            "--micro_batch_size 4 --total_batch_size 256",
                hellaswag_limit=16, hellaswag_in_training=8,
                random_model="--n_layer 2 --n_head 2 --n_embd 32 --block_size 128 --seq_len 32 "
                             "--micro_batch_size 1 --total_batch_size 32",
                generate_sizes="1x4,2x4", generate_flags="--shape 2x2x32 --sampling 0",
                generate="--max_new_tokens 8 --num_return_sequences 2"),
}

# Stage 1's measurements, in a process of its own: this one never holds a CUDA context (on a GPU in
# exclusive-process mode, it would lock the runs out).
MACHINE_PROBE = """
import json, sys, torch
from bench.train_bench import matmul_peak
device = sys.argv[1]
info = {"rate": matmul_peak(device, torch.bfloat16)}
if device.startswith("cuda"):
    p = torch.cuda.get_device_properties(device)
    info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
print("machine:", json.dumps(info))
"""

# Run before train_gpt2.py (prepended to train_bench's PEAK_PROBE, which runs it as __main__): the Nth
# scaled loss (GradScaler.scale) is multiplied by inf, so that micro-batch's float16 gradients overflow.
OVERFLOW_PATCH = """
import math, os, torch
_scale, _calls = torch.amp.GradScaler.scale, [0]
def _scale_with_overflow(self, outputs):
    _calls[0] += 1
    scaled = _scale(self, outputs)
    return scaled * math.inf if _calls[0] == int(os.environ["GPU_CHECK_OVERFLOW_AT"]) else scaled
torch.amp.GradScaler.scale = _scale_with_overflow
"""


@dataclass
class CheckConfig:
    out: str = option("gpu_check", "folder for report.md and logs/ (raw output of every run)")
    budget_s: int = option(480, "wall seconds for the whole check; at the limit it stops and writes "
                                "what it has")
    stages: str = option("1,2,3,4,5", "comma-separated stages to run (1, the machine, always runs)")
    dry_run: bool = option(False, "the rehearsal: tiny shapes on CPU, every stage's code path but "
                                  "CUDA-only calls (also --dry-run)")
    device: str = option("cuda", "cuda or cuda:N (the dry run uses cpu)")
    reference: str = option("bench/build-nanogpt",
                            "build-nanogpt checkout for stage 2 (" + REFERENCE_CLONE + ")")
    hellaswag_dir: str = option("", "folder holding the full hellaswag_val.jsonl ('' = shared/data/hellaswag "
                                    "beside the checkout, else hellaswag.py's cache)")
    hellaswag_cpu_tasks: int = option(100, "stage 5: tasks scored on CPU and on the GPU, both in float32, "
                                           "to compare acc_norm")
    data_dir: str = option("", "shards for the timed runs ('' = synthetic ones written into --work_dir)")
    work_dir: str = option("", "where the runs (removed at the end) and the synthetic shards (kept, reused) "
                               "go ('' = a temp folder, removed at the end)")
    jobs: int = option(4, "correctness runs at a time (stage 3; untimed)")
    check_flags: str = option("", "more train_gpt2.py flags for every correctness run, e.g. --compile 0")


def parse_args(argv=None):
    parser = config_parser(CheckConfig, "gpu_check.py", __doc__)
    parser.add_argument("--dry-run", dest="dry_run", action="store_const", const=True,
                        help="same as --dry_run 1")
    cfg = CheckConfig(**vars(parser.parse_args(argv)))
    stages = cfg.stages.split(",")
    if not all(s in "12345" and len(s) == 1 for s in stages):
        parser.error(f"--stages {cfg.stages}: expected comma-separated numbers from 1 to 5, e.g. 1,2,3")
    if cfg.jobs < 1 or cfg.budget_s < 1:
        parser.error("--jobs and --budget_s must be >= 1")
    if cfg.dry_run:
        cfg.device = "cpu"
    elif not torch.cuda.is_available():
        parser.error("no CUDA device here; --dry-run rehearses the check on CPU")
    return cfg


@dataclass
class Result:
    rc: object  # exit status, "timeout" (killed at the budget) or "skipped" (no budget left to start)
    out: str
    seconds: float
    log: str  # the log file, relative to --out
    log_dir: str = ""  # a train_gpt2.py run's

    def ok(self):
        return self.rc == 0

    def why(self):
        """One line for a failed run's report row: the budget, or the last lines of its output."""
        if self.rc in ("timeout", "skipped"):
            return (f"stopped: the --budget_s ran out ({self.log})" if self.rc == "timeout"
                    else "skipped for time")
        tail = [ln for ln in self.out.strip().splitlines() if ln.strip() and "Warning" not in ln][-3:]
        return f"exit {self.rc}: " + " / ".join(tail)[-300:].replace("|", "\\|") + f" ({self.log})"


class Check:
    def __init__(self, cfg):
        self.cfg, self.start = cfg, time.monotonic()
        self.size = SIZES["dry" if cfg.dry_run else "gpu"]
        # The dry run's processes share a few cores: one thread each is several times faster than each
        # spinning up a thread per core (as torchrun's workers already do).
        self.env = {"PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if cfg.dry_run else {})}
        self.work = os.path.abspath(cfg.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
        self.data = os.path.abspath(cfg.data_dir or os.path.join(self.work, "data"))
        os.makedirs(os.path.join(cfg.out, "logs"), exist_ok=True)
        self.sections, self.seconds, self.failures, self.rate, self.running = {}, {}, [], None, set()

    def left(self):
        return self.cfg.budget_s - (time.monotonic() - self.start)

    def run(self, name, cmd, env=None):
        """cmd (from the repository root) in a process group of its own, killed at the budget; its output
        goes to logs/NAME.log."""
        log = os.path.join("logs", f"{name}.log")
        cmd = [str(a) for a in cmd]
        if self.left() < 1:
            return Result("skipped", "", 0.0, log)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **self.env, **(env or {})}, start_new_session=True)
        self.running.add(proc)
        try:
            out, rc = proc.communicate(timeout=self.left())[0], proc.returncode
        except subprocess.TimeoutExpired:
            self.kill(proc)
            out, rc = proc.communicate()[0], "timeout"
        finally:
            self.running.discard(proc)
        seconds = time.monotonic() - t0
        with open(os.path.join(self.cfg.out, log), "w") as f:
            f.write(f"$ {shlex.join(cmd)}\n{''.join(f'{k}={v} ' for k, v in (env or {}).items())}\n{out}\n"
                    f"[exit {rc} after {seconds:.1f} s]\n")
        return Result(rc, out, seconds, log)

    def kill(self, proc):
        """SIGKILL to proc's whole group: torchrun's workers, compile workers, train_bench.py's runs."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def kill_all(self):
        for proc in list(self.running):
            self.kill(proc)

    def fail(self, what):
        self.failures.append(what)
        return "**FAIL**"

    def train(self, name, args, nproc=0, env=None, prefix=None):
        """train_gpt2.py with args (torchrun --nproc_per_node=nproc if nproc), log_dir work/runs/NAME."""
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}"] \
            if nproc else [sys.executable] + (["-c", prefix] if prefix else [])
        log_dir = os.path.join(self.work, "runs", name)
        result = self.run(name, launcher + [os.path.join(REPO, "train_gpt2.py"), "--log_dir", log_dir, *args],
                          env)
        return dataclasses.replace(result, log_dir=log_dir)


def read_losses(log_dir):
    """log.txt's train losses: {step: loss}."""
    try:
        return dict(zip(*read_log(os.path.join(log_dir, "log.txt")).get("train", ([], []))))
    except UserError:  # no log, or no line in it yet
        return {}


def bench_rows(out):
    """train_bench.py's rows, from the line it prints as each run ends (so a run killed at the budget
    loses only its own): [{name, mb, ms, tok_s, loss, peak_gb} or {name, mb, error}]."""
    rows = []
    for name, mb, values in re.findall(r"^  (train_gpt2\.py.*?|build-nanogpt train_gpt2\.py) ?(\d*): "
                                       r"(\{.*\})$", out, re.M):
        values = re.sub(r"(?<=: )nan(?=[,}])", "None", values)  # a run without a peak memory line
        rows.append({"name": name, "mb": int(mb) if mb else "", **ast.literal_eval(values)})
    return rows


def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def bench_table(c, rows, flops_per_token, baseline=None):
    """Rows of train_bench.py runs: tokens/s, MFU against stage 1's rate, peak memory, the last loss."""
    header = ["run", "micro-batch", "ms/step", "tokens/s", "MFU", "peak GB", "loss at last step"] \
        + (["vs the first row"] if baseline else [])
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["name"], r["mb"], r["error"]] + [""] * (len(header) - 3))
            continue
        mfu = f"{100 * r['tok_s'] * flops_per_token / c.rate:.1f}%" if c.rate else "n/a"
        peak = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        vs = [f"{r['tok_s'] / baseline['tok_s']:.2f}x" if "error" not in baseline else ""] if baseline else []
        out.append([r["name"], r["mb"], f"{r['ms']:,.1f}", f"{r['tok_s']:,.0f}", mfu, peak, r["loss"]] + vs)
    return table(header, out)


def bench_cmd(c, mb_sizes, more=()):
    """bench/train_bench.py at the recipe (the dry run: a tiny shape) on the check's shards."""
    return [sys.executable, os.path.join(REPO, "bench", "train_bench.py"), "--micro_batch_sizes", mb_sizes,
            "--warmup", c.size["warmup"], "--steps", c.size["steps"], "--data_dir", c.data,
            "--device", c.cfg.device, "--train_flags", c.size["recipe_flags"],
            "--timeout", max(1, int(c.left())), *more]


# -----------------------------------------------------------------------------
# The stages: each adds its section of the report


def stage_machine(c):
    cuda = c.cfg.device.startswith("cuda")
    versions = {k: (importlib.metadata.version(k) if importlib.util.find_spec(k) else "not installed")
                for k in ("torch", "triton")}
    probe = c.run("1_machine", [sys.executable, "-c", MACHINE_PROBE, c.cfg.device])
    found = re.search(r"^machine: (\{.*\})$", probe.out, re.M)
    if not found:
        c.sections[1] = f"the machine probe: {probe.why()}"
        c.failures.append("stage 1: the machine probe")
        return
    info = json.loads(found[1])
    c.rate = info["rate"]
    if cuda:
        query = "driver_version,clocks.sm,clocks.max.sm,power.limit,persistence_mode,mig.mode.current"
        # read-only; one line per GPU
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        driver = (smi.stdout.strip().replace("\n", "; ") if smi and smi.returncode == 0
                  else "nvidia-smi failed")
    gpu = info.get("gpu", f"none: the dry run, on CPU ({os.cpu_count()} cores, {platform.machine()})")
    c.sections[1] = table(["GPU", f"nvidia-smi: {query.replace(',', ', ')}" if cuda else "driver", "torch",
                           "CUDA", "Triton", "bfloat16 dense matmul (measured)"],
                          [[gpu, driver if cuda else "n/a", versions["torch"],
                            torch.version.cuda or "none (CPU build)", versions["triton"],
                            f"{c.rate / 1e12:.1f} TFLOP/s"]])


def reference_args(c):
    """train_bench.py's --reference flags for build-nanogpt, or (None, why it is skipped)."""
    if not os.path.isfile(os.path.join(REPO, c.cfg.reference, "train_gpt2.py")):
        return None, f"skipped: {c.cfg.reference}/train_gpt2.py not present ({REFERENCE_CLONE})"
    return ["--reference", os.path.join(REPO, c.cfg.reference), "--reference_micro_batch_size",
            c.size["micro_batch"]], None


def stage_recipe(c):
    ref_args, skipped = reference_args(c)
    result = c.run("2_recipe", bench_cmd(c, c.size["micro_batch"], ref_args or []))
    rows = bench_rows(result.out)
    flops = model_flops_per_token(parse_train_args(shlex.split(c.size["recipe_flags"]))[0])
    ours = next((r for r in rows if r["name"] == "train_gpt2.py" and "error" not in r), None)
    for r in rows:
        r["mb"] = r["mb"] or c.size["micro_batch"]  # build-nanogpt's, --reference_micro_batch_size
    ref = next((r for r in rows if r["name"].startswith("build-nanogpt") and "error" not in r), None)
    if skipped:
        rows.append({"name": "build-nanogpt train_gpt2.py", "mb": c.size["micro_batch"], "error": skipped})
    lines = [bench_table(c, rows, flops)]
    if not ours:
        lines.append(f"\ntrain_gpt2.py: {result.why()}")
        c.failures.append("stage 2: the recipe run")
    mfu = 100 * ours["tok_s"] * flops / c.rate if ours and c.rate else None
    measured = [f"{ours['tok_s']:,.0f}" if ours else "n/a", f"{mfu:.1f}%" if mfu else "n/a",
                f"{ours['tok_s'] / ref['tok_s']:.2f}x" if ours and ref else "n/a"]
    met = [TARGETS["tok_s"] <= (ours or {}).get("tok_s", 0), TARGETS["mfu"] <= (mfu or 0),
           bool(ours and ref and ours["tok_s"] / ref["tok_s"] >= TARGETS["vs_reference"])]
    names = ["tokens/s", "MFU against the measured bfloat16 rate", "tokens/s vs build-nanogpt, same run"]
    wanted = [f">= {TARGETS['tok_s']:,}", f">= {TARGETS['mfu']:.0f}%", f">= {TARGETS['vs_reference']}x"]
    lines += ["", table(["target (one H200, the recipe)", "measured", "target", "met"],
                        [[n, m, w, "yes" if ok else "no"]
                         for n, m, w, ok in zip(names, measured, wanted, met)]),
              f"\nmedian of {c.size['steps']} steps after {c.size['warmup']} warm-up steps; `{result.log}`"]
    c.sections[2] = "\n".join(lines)


def learnable_shards(folder):
    """A random 97-token motif repeated, 10% of tokens noise (ids < 512): a loss that falls within a few
    steps, so that paths which train differently show."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    motif = rng.integers(0, 512, 97)
    for name, n in (("motif_val_000000.npy", 100_000), ("motif_train_000001.npy", 400_000)):
        tokens = np.resize(motif, n)
        noise = rng.random(n) < 0.1
        tokens[noise] = rng.integers(0, 512, noise.sum())
        np.save(os.path.join(folder, name), tokens.astype(np.uint16))
    return folder


def stage_correctness(c):
    data = learnable_shards(os.path.join(c.work, "motif"))
    shape = shlex.split(c.size["check_shape"])
    base = ["--data_dir", data, "--device", c.cfg.device, *shape, "--max_steps", STEPS, "--warmup_steps", 2,
            "--max_lr", 1e-3, "--min_lr", 1e-4, "--eval_interval", 3, "--val_steps", 2, "--ckpt_interval", 3,
            "--keep_last", 0, "--hellaswag", 0, "--sample_interval", 0, "--plot", 0, "--chunked_loss", 0,
            *shlex.split(c.cfg.check_flags)]
    check_cfg = parse_train_args([str(a) for a in shape])[0]
    accum = check_cfg.total_batch_size // (check_cfg.micro_batch_size * check_cfg.seq_len)
    cuda = c.cfg.device.startswith("cuda")
    nccl = {"NCCL_DEBUG": "INFO"} if cuda else {}
    hella = ["--hellaswag", 1, "--hellaswag_dir", HELLASWAG_EXCERPT, "--hellaswag_limit",
             c.size["hellaswag_in_training"], "--sample_interval", 2, "--eval_interval", 2]
    # name: (the row's text, dtype (its tolerance), torchrun's nproc (0: none), flags, env, code run first,
    # what its start-up line must say); how None: rows of their own below
    variants = {
        "float16": ("`--dtype float16`: GradScaler, fused AdamW", "float16", 0, ["--dtype", "float16"],
                    {}, None, "| float16 |"),
        "bfloat16": ("`--dtype bfloat16`, with an eval every 2 steps: val, HellaSwag "
                     f"({c.size['hellaswag_in_training']} tasks), samples (the recompiles' run, below)",
                     "bfloat16", 0, ["--dtype", "bfloat16", *hella], {"TORCH_LOGS": "recompiles"}, None,
                     "| bfloat16 |"),
        "chunked_loss": ("`--chunked_loss 1` (float32; the reference has 0)", "float32", 0,
                         ["--dtype", "float32", "--chunked_loss", 1], {}, None, "chunked loss on"),
        "fsdp_ac": ("`--fsdp 1 --activation_checkpointing 1`, torchrun --nproc_per_node=1 (float32)",
                    "float32", 1, ["--dtype", "float32", "--fsdp", 1, "--activation_checkpointing", 1], nccl,
                    None, "sharded over"),
        "fsdp_bfloat16": ("`--fsdp 1 --dtype bfloat16`, torchrun --nproc_per_node=1: FSDP2's mixed precision",
                          "bfloat16", 1, ["--dtype", "bfloat16", "--fsdp", 1], nccl, None, "| bfloat16 |"),
        "float16_overflow": (None, None, 0, ["--dtype", "float16"],
                             {"GPU_CHECK_OVERFLOW_AT": str(OVERFLOW_STEP * accum + 1)},
                             OVERFLOW_PATCH + PEAK_PROBE, "| float16 |"),
    }

    def float32_then_resume():
        ref = c.train("3_float32", base + ["--dtype", "float32"])
        resume_dir = os.path.join(c.work, "runs", "3_resume")
        if ref.ok():
            os.makedirs(resume_dir, exist_ok=True)
            shutil.copy(os.path.join(ref.log_dir, "model_00003.pt"), resume_dir)
        resumed = c.train("3_resume", ["--init_from", "resume"]) if ref.ok() else Result("skipped", "", 0, "")
        return ref, resumed

    with concurrent.futures.ThreadPoolExecutor(c.cfg.jobs) as pool:
        first = pool.submit(float32_then_resume)
        futures = {name: pool.submit(c.train, f"3_{name}", base + v[3], v[2], v[4], v[5])
                   for name, v in variants.items()}
        ref, resumed = first.result()
        runs = {name: f.result() for name, f in futures.items()}

    rows = []
    ref_losses = read_losses(ref.log_dir)
    ref_ok = ref.ok() and len(ref_losses) == STEPS
    for name, (how, dtype, nproc, _, env, _, expect) in variants.items():
        run = runs[name]
        if how is None:
            continue
        tol = TOLERANCES[dtype]
        if not run.ok() or not ref_ok:
            rows.append([how, "float32", f"{tol:g}",
                         run.why() if not run.ok() else "the float32 run: " + ref.why(), c.fail(name)])
            continue
        losses = read_losses(run.log_dir)
        diff = max((abs(losses.get(s, math.inf) - v) for s, v in ref_losses.items()), default=math.inf)
        header_ok = expect in run.out
        measured = f"{diff:.2g}" + ("" if header_ok else f"; its start-up line lacks `{expect}`")
        # NCCL_DEBUG=INFO: NCCL's lines show that it ran (its first collective initialises it)
        if nproc and cuda:
            measured += "; NCCL ran" if "NCCL INFO" in run.out else "; no NCCL INFO lines"
        rows.append([how, "float32", f"{tol:g}", measured,
                     "PASS" if diff <= tol and header_ok else c.fail(name)])

    run = runs["float16_overflow"]
    steps = re.findall(r"^step +(\d+) \| loss (.*)$", run.out, re.M)
    skipped = [int(s) for s, line in steps if "skipped: float16 gradients overflowed" in line]
    scales = re.findall(r"\| loss scale (\d+)", run.out)
    ok = run.ok() and skipped == [OVERFLOW_STEP] and len(steps) == STEPS and \
        scales[:OVERFLOW_STEP + 1] == ["65536"] * (OVERFLOW_STEP + 1) and \
        scales[OVERFLOW_STEP + 1:] == ["32768"] * (STEPS - OVERFLOW_STEP - 1)
    rows.append([f"float16: step {OVERFLOW_STEP}'s first micro-batch's gradients made inf "
                 f"(GradScaler.scale patched)",
                 "itself",
                 f"step {OVERFLOW_STEP} skipped, no other; loss scale 65536 then 32768; all {STEPS} steps",
                 f"skipped {skipped}, scales {'/'.join(sorted(set(scales), key=scales.index))}, "
                 f"{len(steps)} steps" if run.ok() else run.why(),
                 "PASS" if ok else c.fail("float16 overflow")])

    if resumed.ok() and ref_ok:
        resumed_losses = read_losses(resumed.log_dir)
        diff = max((abs(resumed_losses.get(s, math.inf) - ref_losses[s]) for s in range(3, STEPS)),
                   default=math.inf)
        a, b = (torch.load(os.path.join(d, f"model_{STEPS:05d}.pt"), map_location="cpu",
                           weights_only=True)["model"]
                for d in (ref.log_dir, resumed.log_dir))
        bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        wdiff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else math.inf
        ok = diff <= TOLERANCES["resume"] and wdiff <= TOLERANCES["resume"]
        measured = "bitwise equal weights" if bitwise else f"losses {diff:.2g}, weights {wdiff:.2g}"
    else:
        ok, measured = False, resumed.why() if ref_ok else "the float32 run: " + ref.why()
    rows.append([f"`--init_from resume` from step 3's checkpoint to step {STEPS}",
                 "the uninterrupted float32 run",
                 f"bitwise, else {TOLERANCES['resume']:g} (losses of steps 3-{STEPS - 1}, weights)", measured,
                 "PASS" if ok else c.fail("resume")])

    run = runs["bfloat16"]
    first_step = run.out.find("\nstep     0 | loss")
    after = run.out[first_step:].count("Recompiling function") if first_step >= 0 else None
    before = run.out[:max(first_step, 0)].count("Recompiling function")
    compiled = "compile on" in run.out
    rows.append(["`TORCH_LOGS=recompiles` in the bfloat16 run, evals every 2 steps", "itself",
                 "no `Recompiling` after the first training step",
                 (f"{after} after, {before} before" + ("" if compiled else " (compile off: the dry run)"))
                 if run.ok() and after is not None else run.why(),
                 "PASS" if run.ok() and after == 0 else c.fail("recompiles")])
    c.sections[3] = table(["check", "compared with",
                           "tolerance (max abs train-loss difference over the steps)", "measured", "result"],
                          rows) + \
        f"\n\n{STEPS} steps each, {accum} micro-batches a step: `{c.size['check_shape']}`, learnable " \
        f"synthetic tokens; the float32 run `logs/3_float32.log`, the others `logs/3_*.log`." + \
        ("" if cuda else " The dry run's torchrun rows use gloo (train_gpt2.py's backend off CUDA).")


def stage_levers(c):
    flags = {f.name for f in dataclasses.fields(TrainConfig)}
    liger_flag = next((f for f in flags if "liger" in f), None)
    variants, notes = ["", "--chunked_loss 1"], []
    if not importlib.util.find_spec("liger_kernel"):
        notes.append(["liger-kernel fused linear cross-entropy",
                      "skipped: not installed (pip install liger-kernel)"])
    elif not liger_flag:
        notes.append(["liger-kernel fused linear cross-entropy",
                      "skipped: installed, but train_gpt2.py has no flag to use it"])
    else:
        variants.append(f"--{liger_flag} 1")
    if "compile_mode" in flags:
        variants.append("--compile_mode max-autotune-no-cudagraphs")
    else:
        notes.append(["compile mode max-autotune-no-cudagraphs",
                      "needs a --compile_mode flag in train_gpt2.py (it has none)"])
    mb = c.size["micro_batch"]
    flops = model_flops_per_token(parse_train_args(shlex.split(c.size["recipe_flags"]))[0])
    result = c.run("4_levers", bench_cmd(c, mb, ["--variants", ";".join(variants)]))
    rows = bench_rows(result.out)
    biggest = c.run("4_max_micro_batch", bench_cmd(c, f"{2 * mb},max"))
    search = bench_rows(biggest.out)
    fits = [r for r in search if "error" not in r]
    baseline = next((r for r in rows if r["name"] == "train_gpt2.py"), None)
    lines = [bench_table(c, rows + search, flops, baseline)]
    lines.append("\n" + table(["lever", "result"], notes + [
        ["largest micro-batch that fits", f"{max(r['mb'] for r in fits)}" if fits else
         f"{mb} (the first row; {search[0]['error'] if search else biggest.why()} at {2 * mb})"]]))
    for r in (result, biggest):
        if not r.ok() and not bench_rows(r.out):
            lines.append(f"\n{r.why()}")
    lines.append(f"\n`{result.log}`, `{biggest.log}`: before/after in one train_bench.py run; the search "
                 f"doubles from {2 * mb} until out of memory (that last row is expected).")
    c.sections[4] = "\n".join(lines)


def stage_eval(c):
    hella_dir = HELLASWAG_EXCERPT if c.cfg.dry_run else c.cfg.hellaswag_dir or (
        SHARED_HELLASWAG if os.path.isdir(SHARED_HELLASWAG) else "")
    hella_dir = hella_dir or hellaswag_cache()
    rows = []
    # A random GPT-2 124M (the dry run: tiny) to score and sample: one step of train_gpt2.py, eager.
    model = c.train("5_random_model", ["--data_dir", c.data, "--device", c.cfg.device, "--max_steps", 1,
                                       "--eval_interval", 1, "--val_steps", 1, "--compile", 0,
                                       "--hellaswag", 0, "--sample_interval", 0, "--plot", 0,
                                       *shlex.split(c.size["random_model"])])
    ckpt = os.path.join(model.log_dir, "model_00001.pt")
    if not model.ok():
        c.sections[5] = f"the random model: {model.why()}"
        c.failures.append("stage 5: the random model")
        return

    def score(name, *args):
        r = c.run(name, [sys.executable, os.path.join(REPO, "hellaswag.py"), "--model", ckpt,
                         "--data_dir", hella_dir, *args])
        m = re.search(r"^acc: ([\d.]+) acc_norm: ([\d.]+) n: (\d+)$", r.out, re.M)
        return r, m

    if not os.path.isfile(os.path.join(hella_dir, "hellaswag_val.jsonl")):
        rows.append(["hellaswag.py, all val tasks", f"skipped: {hella_dir}/hellaswag_val.jsonl not present "
                     f"(`python hellaswag.py --limit 1` downloads it; or --hellaswag_dir)", "", ""])
    else:
        r, m = score("5_hellaswag", "--device", c.cfg.device, "--limit", c.size["hellaswag_limit"])
        rows.append([f"hellaswag.py, {m[3] if m else 'all'} val tasks, dtype and compile auto "
                     f"(`{hella_dir}`)",
                     f"{r.seconds:.0f} s wall" if m else r.why(), f"acc_norm {m[2]}" if m else "",
                     "ran" if m else c.fail("hellaswag.py")])
        k = c.cfg.hellaswag_cpu_tasks if not c.cfg.dry_run else 8
        # the dry run: one, on CPU
        runs = {d: score(f"5_hellaswag_float32_{d}", "--device", d, "--dtype", "float32", "--compile", 0,
                         "--limit", k) for d in dict.fromkeys(["cpu", c.cfg.device])}
        (r_cpu, m_cpu), (r_dev, m_dev) = runs["cpu"], runs[c.cfg.device]
        ok = m_cpu and m_dev and abs(float(m_cpu[2]) - float(m_dev[2])) <= 1.01 / k and m_cpu[3] == m_dev[3]
        rows.append([f"acc_norm on the first {k} tasks: {c.cfg.device} vs CPU, both float32 and eager",
                     f"{m_dev[2]} vs {m_cpu[2]}" if m_cpu and m_dev else
                     (r_dev if not m_dev else r_cpu).why(),
                     "equal, or one task apart (a near-tie of a random model)",
                     "PASS" if ok else c.fail("hellaswag vs CPU")])

    r = c.run("5_generate", [sys.executable, os.path.join(REPO, "generate.py"), "--init_from", ckpt,
                             "--device", c.cfg.device, *shlex.split(c.size["generate"])])
    n = int(shlex.split(c.size["generate"])[-1])
    samples = sum(ln.startswith("> ") for ln in r.out.splitlines())
    rows.append([f"generate.py `{c.size['generate']}`, dtype and compile auto",
                 f"{r.seconds:.0f} s wall, start-up and compile included" if r.ok() else r.why(),
                 f"{samples} samples", "ran" if r.ok() and samples == n else c.fail("generate.py")])
    r = c.run("5_generate_bench", [sys.executable, os.path.join(REPO, "bench", "generate_bench.py"),
                                   "--sizes", c.size["generate_sizes"], "--device", c.cfg.device,
                                   *shlex.split(c.size["generate_flags"])])
    bench = "\n".join(ln for ln in r.out.splitlines() if ln.startswith("|"))
    rows.append(["bench/generate_bench.py: greedy tokens, KV cache vs recompute (table below)",
                 f"{r.seconds:.0f} s wall",
                 "same tokens", "PASS" if r.ok() else c.fail("generate KV cache vs recompute")])
    c.sections[5] = table(["run", "time", "result", "check"], rows) + \
        f"\n\n{bench or r.why()}\n\nlogs: `logs/5_*.log`; the model: one step of train_gpt2.py from a " \
        f"random init."


STAGES = {1: ("The machine", stage_machine), 2: ("The GPT-2 124M recipe", stage_recipe),
          3: ("Correctness on the device", stage_correctness), 4: ("The levers", stage_levers),
          5: ("HellaSwag and generation", stage_eval)}


def write_report(c, skipped_for_time, argv):
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# GPU check"
             f"{' (dry run on CPU: tiny shapes, the numbers mean nothing)' if c.cfg.dry_run else ''}",
             "", f"{now:%Y-%m-%d %H:%M} UTC | {time.monotonic() - c.start:.0f} s of the {c.cfg.budget_s} s "
             f"budget | `{shlex.join(['python', 'bench/gpu_check.py'] + argv)}`", ""]
    if skipped_for_time:
        lines += [f"Skipped for time: stages {', '.join(map(str, skipped_for_time))} "
                  f"(rerun them with --stages).", ""]
    lines += [f"Correctness failures or errors: {', '.join(c.failures)}" if c.failures else
              "No correctness check failed, no stage errored.", ""]
    for n, (title, _) in STAGES.items():
        took = f" ({c.seconds[n]:.0f} s)" if n in c.seconds else ""
        lines += [f"## {n}. {title}{took}", "", c.sections.get(n, "not run"), ""]
    with open(os.path.join(c.cfg.out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    c = Check(cfg)
    selected = {1} | {int(s) for s in cfg.stages.split(",")}
    skipped_for_time = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # stopped from outside: leave no run behind on the GPU
        signal.signal(sig, lambda signum, frame: (c.kill_all(), sys.exit(128 + signum)))
    try:
        if not cfg.data_dir:
            write_synthetic_shards(c.data, c.size["synthetic_tokens"])
        for n, (title, stage) in STAGES.items():
            if n not in selected:
                c.sections[n] = "not selected (--stages)"
            elif c.left() < 10:
                c.sections[n] = "skipped: the --budget_s ran out before this stage"
                skipped_for_time.append(n)
            else:
                print(f"gpu_check: stage {n}, {title} ({c.left():.0f} s left)", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                try:
                    stage(c)
                except Exception:
                    c.sections[n] = "error:\n\n```\n" + traceback.format_exc()[-2000:] + "```"
                    c.failures.append(f"stage {n} errored")
                c.seconds[n] = time.monotonic() - t0
            write_report(c, skipped_for_time, argv)
    finally:
        c.kill_all()
        shutil.rmtree(os.path.join(c.work, "runs") if cfg.work_dir else c.work, ignore_errors=True)
    print(open(os.path.join(cfg.out, "report.md")).read())
    sys.exit(1 if c.failures else 0)


if __name__ == "__main__":
    main()
