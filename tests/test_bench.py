"""bench/train_bench.py's CPU path: the table it prints from real train_gpt2.py runs, the `max` search,
a failed run, and the build-nanogpt edits refusing a script they do not fit (its GPU numbers are issue 5);
bench/memory_bench.py's table on a tiny shape."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bench.train_bench import parse_args
from conftest import REPO, ci_only

TINY = ("--n_layer 2 --n_head 2 --n_embd 32 --block_size 32 --seq_len 32 --total_batch_size 512 "
        "--compile 0 --device cpu")


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "train_bench.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def table(stdout):
    """The table's rows as lists of cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| train_gpt2.py") or line.startswith("| build-nanogpt")]


@pytest.mark.slow
@ci_only
def test_table_from_real_runs_with_max_search(tmp_path):
    proc = bench("--micro_batch_sizes", "4,max", "--train_flags", TINY, "--warmup", "1", "--steps", "2",
                 "--data_dir", str(tmp_path / "data"), "--synthetic_tokens", "20000", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path / "data")) == ["runs", "synthetic_train_000001.npy",
                                                     "synthetic_train_000002.npy", "synthetic_val_000000.npy"]
    assert os.listdir(tmp_path / "data" / "runs") == []  # each run's checkpoint is removed
    rows = table(proc.stdout)
    # 512 tokens per step / 32 per sequence: the search doubles 4 up to 16, one micro-batch per step.
    assert [r[1] for r in rows] == ["4", "8 (search)", "16 (search)"]
    for name, mb, ms, tok_s, mfu, peak_gb, loss, vs in rows:
        ms, tok_s = float(ms.replace(",", "")), float(tok_s.replace(",", ""))
        assert ms > 0 and abs(ms * tok_s / 1000 - 512) < 1  # ms/step and tokens/s describe the same step
        # MFU > 0 only: against a peak measured at another moment of a shared machine it can pass 100%
        assert float(mfu.rstrip("%")) > 0 and 0.05 < float(peak_gb) < 24
        assert 10 < float(loss) < 11.5  # random tokens: near ln(50304) after 3 steps
    assert re.search(r"measured float32 matmul peak [\d.]+ TFLOP/s", proc.stdout)


@pytest.mark.slow
@ci_only
def test_repeats_interleave_the_rows_and_report_the_median(tmp_path):
    proc = bench("--micro_batch_sizes", "4", "--train_flags", TINY, "--variants", ";--chunked_loss 0",
                 "--warmup", "1", "--steps", "2", "--repeats", "2", "--data_dir", str(tmp_path / "data"),
                 "--synthetic_tokens", "20000", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    order = re.findall(r"^  (train_gpt2.py[^:]*?) 4(?: \(repeat (\d)\))?:", proc.stderr, re.M)
    assert order == [("train_gpt2.py", ""), ("train_gpt2.py --chunked_loss 0", ""), ("train_gpt2.py", "2"),
                     ("train_gpt2.py --chunked_loss 0", "2")]
    assert "median of 2 interleaved runs" in proc.stdout
    rows = table(proc.stdout)
    assert [r[0] for r in rows] == ["train_gpt2.py", "train_gpt2.py --chunked_loss 0"]
    assert float(rows[0][6]) == pytest.approx(float(rows[1][6]), abs=1e-4)  # the same loss, chunked or not


@pytest.mark.slow
def test_failed_run_is_a_row_and_exit_1(tmp_path):
    proc = bench("--micro_batch_sizes", "4", "--train_flags", TINY, "--variants", "--max_lr 0",
                 "--warmup", "1", "--steps", "1", "--data_dir", str(tmp_path / "data"),
                 "--synthetic_tokens", "20000", "--device", "cpu")
    assert proc.returncode == 1
    [row] = table(proc.stdout)
    assert row[0] == "train_gpt2.py --max_lr 0" and "--max_lr 0.0: must be > 0" in row[2]


def test_reference_edits_refuse_another_script(tmp_path):
    (tmp_path / "train_gpt2.py").write_text("print('not build-nanogpt')\n")
    proc = bench("--micro_batch_sizes", "4", "--train_flags", TINY, "--reference", str(tmp_path),
                 "--warmup", "1", "--steps", "1", "--data_dir", str(tmp_path / "data"),
                 "--synthetic_tokens", "20000", "--device", "cpu")
    assert proc.returncode == 1
    assert "has 0 copies of 'data_root = \"edu_fineweb10B\"', expected 1" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--micro_batch_sizes", "max"], "--micro_batch_sizes max: expected positive integers"),
    (["--micro_batch_sizes", "16,max,64"], "expected positive integers, optionally ending in max"),
    (["--steps", "0"], "--warmup and --steps must be >= 1"),
    (["--reference", "/nonexistent"], "--reference /nonexistent: no train_gpt2.py there"),
    (["--train_flags", "--micro_batch_size x"], "not valid train_gpt2.py flags"),
])
def test_bad_flags_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) <= 2


@pytest.mark.slow
@ci_only
def test_memory_bench_table_from_real_runs(tmp_path):
    """bench/memory_bench.py on a tiny shape: a row per variant, FSDP's state per rank half the full state,
    each run stopped after its second step with nothing left behind."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "memory_bench.py"),
                           "--shapes", "2x2x32", "--seq_len", "32", "--micro_batch_size", "2",
                           "--data_dir", str(tmp_path / "data"), "--synthetic_tokens", "20000"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| 2x2x32 |")]
    assert [(r[1], r[2]) for r in rows] == [("full state", "1"),
                                            ("full state, activation checkpointing", "1"),
                                            ("FSDP", "2"), ("FSDP, activation checkpointing", "2")]
    state = [float(r[3].removesuffix(" MB")) for r in rows]
    # 2 layers of 32 wide and the 50304 x 32 embedding: ~1.67M parameters, 16 bytes each
    assert (state[0] == state[1] == pytest.approx(26.7, abs=0.1)
            and state[2] == state[3] == pytest.approx(13.3, abs=0.1))
    for r in rows:
        assert 50 < float(r[4].removesuffix(" MB")) < 4000 and int(r[5].replace(",", "")) > 0
    assert os.listdir(tmp_path / "data" / "runs") == []


@pytest.mark.slow
@ci_only
def test_memory_bench_startup_table_from_real_runs(tmp_path):
    """bench/memory_bench.py --table startup on a tiny shape: a row per way to start, each rank's private
    memory measured in each phase (the checkpoint's writing on rank 0 of the run from scratch), and no rank
    left running or run folder left behind once the table is printed."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "memory_bench.py"),
                           "--table", "startup", "--shapes", "2x2x32", "--ranks", "2", "--seq_len", "32",
                           "--data_dir", str(tmp_path / "data"), "--synthetic_tokens", "20000"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| 2x2x32 |")]
    assert [r[1] for r in rows] == ["FSDP, from scratch", "FSDP, resumed", "FSDP, Hugging Face folder",
                                    "DDP, resumed"]
    for r in rows:
        idle, start_0, first_0, start_1, first_1 = map(float, (r[4], r[5], r[6], r[8], r[9]))
        assert 0.05 < idle < 2
        assert all(idle / 2 < gb < idle * 2 for gb in (start_0, first_0, start_1, first_1))
    assert re.fullmatch(r"[\d.]+ \(0\.0\d\)", rows[0][7]) and rows[1][7] == "-"  # the checkpoint, ~27 MB
    assert os.listdir(tmp_path / "data" / "runs") == []
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True).stdout
    assert left == "", left


@pytest.mark.slow
@ci_only
def test_muon_bench_table_from_real_runs(shakespeare_shards, tmp_path):
    """bench/muon_bench.py on a tiny shape, one learning rate each and Muon's again on half the schedule:
    Tiny Shakespeare remapped to its 255 most frequent ids and one for the rest; the table's val losses are
    the runs' log.txt's, the tokens to reach the best AdamW run's final val loss are counted at the first
    eval at or below it; run again, it reuses the finished runs."""
    flags = "--n_layer 2 --n_head 2 --n_embd 32 --block_size 32 --seq_len 32 --micro_batch_size 4 " \
            "--total_batch_size 128 --max_steps 8 --warmup_steps 2 --eval_interval 2 --val_steps 2 " \
            "--device cpu --dtype float32 --compile 0"
    args = [sys.executable, os.path.join(REPO, "bench", "muon_bench.py"),
            "--data_dir", str(shakespeare_shards),
            "--vocab_size", "256", "--train_flags", flags, "--adamw_lrs", "3e-3", "--muon_lrs", "1e-2",
            "--short_schedule", "0.5", "--out_dir", str(tmp_path)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    remapped = np.load(f"{shakespeare_shards}_vocab256/shakespeare_train_000001.npy")
    assert remapped.max() == 255 and len(np.unique(remapped)) == 256
    assert re.search(r"^2L/2H/32d, vocab 256, [\d,]+ parameters \(\d+% in the blocks' matrices",
                     proc.stdout, re.M)
    rows = {(r[0], r[2]): r for r in ([c.strip() for c in line.strip("|").split("|")]
                                      for line in proc.stdout.splitlines()
                                      if re.match(r"\| (adamw|muon) ", line))}
    assert list(rows) == [("adamw", "8 steps"), ("muon", "8 steps"), ("muon", "4 steps")]

    def val(folder):
        lines = [ln.split() for ln in open(tmp_path / folder / "log.txt") if not ln.startswith("#")]
        return {int(step): float(v) for step, kind, v in lines if kind == "val"}

    adamw, muon, short = val("adamw_0.003"), val("muon_0.01"), val("muon_0.01_4steps")
    assert rows["adamw", "8 steps"][3:7] == [f"{adamw[s]:.4f}" for s in (2, 4, 6, 8)]
    assert rows["muon", "8 steps"][3:7] == [f"{muon[s]:.4f}" for s in (2, 4, 6, 8)]
    assert rows["muon", "4 steps"][3:7] == [f"{short[2]:.4f}", f"{short[4]:.4f}", "", ""]
    reach = next(s for s in (2, 4, 6, 8) if adamw[s] <= adamw[8])
    assert rows["adamw", "8 steps"][7:] == [f"{reach * 128 / 1e6:.3g}M", "1.00x"]
    for key, v in (("muon", "8 steps"), muon), (("muon", "4 steps"), short):
        needs = next((s for s in sorted(v) if v[s] <= adamw[8]), None)
        assert rows[key][8] == (f"{needs / reach:.2f}x" if needs is not None else "-")
    assert not any(f.endswith(".pt") for d in os.listdir(tmp_path) for f in os.listdir(tmp_path / d))
    written = {d: os.path.getmtime(tmp_path / d / "log.txt") for d in os.listdir(tmp_path)}
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout == proc.stdout
    assert {d: os.path.getmtime(tmp_path / d / "log.txt") for d in os.listdir(tmp_path)} == written
