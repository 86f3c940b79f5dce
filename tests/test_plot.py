"""plot.py: the PNG it draws from a log.txt (size, non-blank, changing with the data), logs with few lines,
one-line errors for bad or missing logs and for a missing matplotlib, and the atomic write; the step line's
time left on a fake clock; report.md, from a run stopped by SIGTERM and resumed, and from an older run."""
import ast
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from common import UserError
from plot import plot_log, read_log
from test_train import TINY

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

PANEL_WIDTH, HEIGHT = 600, 450  # plot_log's figsize (6 per panel, 4.5) at dpi 100


def write_log(path, steps=200, val_every=25, hella_every=50):
    """A fake run: losses falling from ~11 with noise, val and HellaSwag evals every few steps."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for step in range(steps):
            loss = 3 + 8 * math.exp(-step / 40)
            if val_every and step % val_every == 0:
                f.write(f"{step} val {loss + rng.uniform(0, 0.05):.4f}\n")
            if hella_every and step % hella_every == 0:
                f.write(f"{step} hella {0.25 + 0.05 * step / steps:.4f}\n")
            f.write(f"{step} train {loss + rng.uniform(0, 0.3):.6f}\n")
    return str(path)


def plot_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "plot.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


def check_png(path, panels=2):
    """The image as an (H, W, channels) array, after checking it is a non-blank PNG of the figure's size."""
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.shape[:2] == (HEIGHT, PANEL_WIDTH * panels)
    rgb = img[..., :3]
    assert (rgb < 0.9).any(axis=-1).mean() > 0.02  # lines, text and ticks, not a white page
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # the series' colours, antialiased
    return img


def test_read_log(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 val 10.9871\n0 train 10.95\n\n1 train 10.5\n250 hella 0.2512\n3 future 1\n")
    assert read_log(str(log)) == {"val": ([0], [10.9871]), "train": ([0, 1], [10.95, 10.5]),
                                  "hella": ([250], [0.2512]), "future": ([3], [1.0])}


def test_plot_log_draws_the_data(tmp_path):
    log = write_log(tmp_path / "log.txt")
    out = str(tmp_path / "loss.png")
    assert plot_log(log, out) == out
    full = check_png(out)
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "loss.png"]  # the temp file was renamed, none left

    assert plot_log(log, str(tmp_path / "no_refs.png"), references=False)
    assert not np.array_equal(full, check_png(tmp_path / "no_refs.png"))
    no_hella = write_log(tmp_path / "no_hella.txt", hella_every=0)
    plot_log(no_hella, str(tmp_path / "no_hella.png"))
    assert not np.array_equal(full, check_png(tmp_path / "no_hella.png", panels=1))
    plot_log(no_hella, out)  # overwrites the earlier loss.png in place
    assert np.array_equal(check_png(out, panels=1), check_png(tmp_path / "no_hella.png", panels=1))
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "loss.png", "no_hella.png", "no_hella.txt",
                                            "no_refs.png"]


@pytest.mark.parametrize("lines", ["0 val 10.9871\n", "0 val 10.9871\n250 val 6.1\n500 val 4.8\n",
                                   "17 train 6.123456\n"])
def test_few_lines_render(tmp_path, lines):
    (tmp_path / "log.txt").write_text(lines)
    check_png(plot_log(str(tmp_path / "log.txt"), str(tmp_path / "loss.png")), panels=1)


def test_hellaswag_panel_only_when_the_log_has_hellaswag_evals(tmp_path, monkeypatch):
    """A run without HellaSwag evals (the default off CUDA, as in the quick start) gets the loss panel alone,
    not an empty HellaSwag panel beside it."""
    from matplotlib.figure import Figure
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: (figures.append(fig),
                                                                         savefig(fig, *args, **kwargs))[1])
    for hella_every, titles in [(0, ["train and val loss"]), (50, ["train and val loss", "HellaSwag"])]:
        log = write_log(tmp_path / f"log_{hella_every}.txt", hella_every=hella_every)
        check_png(plot_log(log, str(tmp_path / f"loss_{hella_every}.png")), panels=len(titles))
        assert [ax.get_title() for ax in figures[-1].axes] == titles


def test_cli_writes_png_beside_the_log(tmp_path):
    log = write_log(tmp_path / "log.txt")
    proc = plot_cli("--log_file", log)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "loss.png")
    check_png(tmp_path / "loss.png")
    proc = plot_cli("--log_file", log, "--out", tmp_path / "plots" / "run.png", "--references", "0")
    assert proc.returncode == 0, proc.stderr
    check_png(tmp_path / "plots" / "run.png")


def test_cli_errors_are_one_line(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 val 10.9871\n1 train\n")
    proc = plot_cli("--log_file", log)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("plot.py: error: ")
    assert f"{log} line 2: expected STEP KIND VALUE" in proc.stderr
    (tmp_path / "empty.txt").write_text("\n")
    for path, says in [(tmp_path / "missing.txt", "not found; pass --log_file"),
                       (tmp_path / "empty.txt", "no log lines yet")]:
        proc = plot_cli("--log_file", path)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1
        assert str(path) in proc.stderr and says in proc.stderr
    log.write_text("x val 3\n")
    with pytest.raises(UserError, match="line 1: expected STEP KIND VALUE"):
        read_log(str(log))


def test_binary_log_and_folders_are_one_line_errors(tmp_path):
    (tmp_path / "log.bin").write_bytes(b"0 val 10.98\n\x80\x04\x95 pickled\n")
    (tmp_path / "out.png").mkdir()
    log = write_log(tmp_path / "log.txt")
    for args, says in [(["--log_file", tmp_path / "log.bin"], "not a text log (byte 0x80 at offset 12)"),
                       (["--log_file", tmp_path], "is a folder; pass --log_file its log.txt"),
                       (["--log_file", log, "--out", tmp_path / "out.png"],
                        "is a folder; pass --out a .png")]:
        proc = plot_cli(*args)
        assert (proc.returncode == 1 and proc.stderr.startswith("plot.py: error: ")
                and says in proc.stderr), proc.stderr
        assert proc.stderr.count("\n") == 1


def test_without_matplotlib(tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shim"))
    log = write_log(tmp_path / "log.txt", steps=10)
    proc = plot_cli("--log_file", log, env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "pip install matplotlib" in proc.stderr
    # What train_gpt2.py sees: importing plot works, plot_log raises ImportError, and nothing is written.
    code = (f"from plot import plot_log\ntry:\n    plot_log({log!r}, {str(tmp_path / 'loss.png')!r})\n"
            f"except ImportError:\n    print('ImportError')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "ImportError", proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "shim"]


# --- the time left, and report.md ------------------------------------------------------------------------


def fake_run(eta, start, max_steps, eval_interval, step_s=2.0, eval_s=30.0, compile_s=60.0, resumed=False):
    """train()'s loop on a fake clock: an eval of eval_s before every eval_interval-th step and the last (but
    a resume's first, which its checkpoint measured), steps of step_s, the first of them compiling for
    compile_s more. Returns {step: (eta.update's estimate after it, the true seconds left then)}."""
    clock, estimates = 0.0, {}
    for step in range(start, max_steps + 1):
        if (step % eval_interval == 0 or step == max_steps) and not (resumed and step == start):
            clock += eval_s
        if step == max_steps:
            break
        clock += step_s + (compile_s if step == start else 0)
        estimates[step] = eta.update(step, clock), clock
    return {step: (estimate, clock - at) for step, (estimate, at) in estimates.items()}


@pytest.mark.parametrize("start", [0, 130], ids=["new", "resumed"])
def test_eta_is_the_true_time_left_after_the_first_eval(start):
    """400 steps of 2 s, a 30 s eval every 50 (and at the end), the first step compiling for a minute; a
    resumed run (at 130) starts a new estimator. From the first eval the attempt has timed on, at every step
    (before, at and after each later eval, the last step too), the estimate is within 5% of the truth."""
    from plot import ETA
    estimates = fake_run(ETA(start, 400, (50, 5000, 0)), start, 400, 50, resumed=start > 0)
    first_eval = (start // 50 + 1) * 50
    assert estimates[start][0] is None  # nothing timed yet
    for step in range(first_eval, 400):
        estimate, left = estimates[step]
        assert estimate == pytest.approx(left, rel=0.05), step
    estimate, left = estimates[first_eval - 1]
    assert estimate < 0.9 * left  # before it, no eval's cost is known yet


def test_step_line_counts_compactly():
    from plot import format_count, format_duration, step_line
    assert [format_count(n) for n in (256, 1024, 524288, 12_582_912, 1_199_570_944)] == \
        ["256", "1.0k", "524k", "12.6M", "1.2B"]
    assert [format_duration(s) for s in (45.2, 725, 4980, 100_000)] == ["45s", "12m05s", "1h23m", "27h46m"]
    line = step_line(2287, 3.3, 6e-4, 0.3, 0.35, 524288, 40.0, None, False, 4980)
    assert line.endswith(" | mfu 40.0% | 1.2B tok | eta 1h23m")


STOPPED_RUN = [*map(str, TINY), "--vocab_size", "50304", "--max_steps", "8", "--sample_interval", "4",
               "--ckpt_interval", "100"]


@pytest.fixture(scope="module")
def stopped_and_resumed(shakespeare_shards, tmp_path_factory):
    """A tiny run on Tiny Shakespeare (GPT-2's vocabulary, so it samples), stopped by SIGTERM during step 4
    (it checkpoints step 5 and exits), then resumed to its end: (log_dir, each attempt's stdout)."""
    import signal
    from train_gpt2 import DataLoaderLite, main
    log_dir = tmp_path_factory.mktemp("stopped")
    reads, next_batch, outs = [], DataLoaderLite.next_batch, []

    def signalled(loader):
        if "train" in loader.paths[0]:
            reads.append(1)
            if len(reads) == 2 * 4 + 1:  # the first of step 4's 2 micro-batches
                os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(loader)
    commands = (["--data_dir", str(shakespeare_shards), "--log_dir", str(log_dir), *STOPPED_RUN],
                ["--log_dir", str(log_dir), "--init_from", "resume"])
    for i, argv in enumerate(commands):
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
            patch.setattr(sys, "argv", ["train_gpt2.py", *argv])  # the command line, as a user types it
            if i == 0:
                patch.setattr(DataLoaderLite, "next_batch", signalled)
            main(argv)
        outs.append(out.getvalue())
        if i == 0:
            assert sorted(p.name for p in log_dir.glob("model_*.pt")) == ["model_00005.pt"]
    return log_dir, outs


def test_report_of_a_stopped_and_resumed_run(stopped_and_resumed):
    """report.md holds what ran, the data, the result beside GPT-2 124M's, the cost (the wall time of both
    attempts), the last samples and loss.png, each with the value log.txt and the checkpoint hold; the
    resumed run's step line goes on counting tokens from its checkpoint."""
    from checkpoints import load_checkpoint
    from plot import format_bytes, format_duration, read_attempts
    log_dir, outs = stopped_and_resumed
    assert re.search(r"^step     5 \| .* \| 1.5k tok(?: \| eta \w+)?$", outs[1], re.M)  # 6 x 256 tokens
    report = (log_dir / "report.md").read_text(encoding="utf-8")
    ckpt = load_checkpoint(str(log_dir / "model_00008.pt"))
    attempts = read_attempts(str(log_dir / "log.txt"))
    assert len(attempts) == 2 and [record["step"] for record, _ in attempts] == [0, 5]
    walls = []
    for (record, lines), steps in zip(attempts, ("0-4", "5-7")):
        wall = max(v for _, kind, v in lines if kind == "time") - record["started"]
        walls.append(wall)
        argv = " ".join(record["argv"][1:])
        assert re.search(rf"^\| {steps} \| [-\d]+ [:\d]+ UTC \| {format_duration(wall)} \| "
                         rf"`python train_gpt2.py {re.escape(argv)}` \| 1 \| cpu \| "
                         rf"{re.escape(torch.__version__)} \| "
                         rf"{ckpt['provenance']['source_sha256']} \|$", report, re.M), steps
    assert f"wall time: {format_duration(sum(walls))} over 2 attempt(s)" in report
    flags = re.search(r"^Flags that differ from the defaults: (.*)$", report, re.M)[1]
    assert "`--sample_interval 4`" in flags and "`--n_embd 32`" in flags and "`--init_from resume`" in flags
    assert "--vocab_size" not in flags  # 50304, its default
    epoch = sum(n for _, n, _ in ckpt["data"]["train"])
    assert f"- folder: `{ckpt['data']['dir']}`" in report and f"- tokens per epoch: {epoch:,}" in report
    assert f"- epochs read: {8 * 256 / epoch:.2f} (2,048 tokens trained)" in report
    val = read_log(str(log_dir / "log.txt"))["val"]
    assert sorted(val[0]) == [0, 4, 8]
    assert (f"| val loss | {ckpt['val_loss']:.4f} on the val split of `{ckpt['config']['data_dir']}` "
            f"| 3.2924") in report
    best = min(zip(val[1], val[0]))
    assert f"| best val loss | {best[0]:.4f} at step {best[1]} (log.txt) | |" in report
    assert "| HellaSwag acc_norm | not measured | 0.2955 on 10,042 val examples |" in report
    assert f"- peak memory per rank: rank 0 {format_bytes(ckpt['peak_memory'][0])} " in report
    assert ckpt["peak_memory"][0] > 100e6  # a process with torch loaded: its peak RSS
    assert "- steps skipped for float16 overflow: 0" in report and "- mean tokens/s: " in report
    samples = [ln for ln in (log_dir / "samples.txt").read_text().splitlines() if ln.startswith("8 sample ")]
    assert len(samples) == 4 and "At step 8:" in report
    for line in samples:
        assert json.dumps(ast.literal_eval(line.split(": ", 1)[1]), ensure_ascii=False) in report
    assert "![train and val loss](loss.png)" in report and (log_dir / "loss.png").is_file()

    # plot.py --report: the same page again, from the folder alone
    (log_dir / "report.md").rename(log_dir / "written_by_the_run.md")
    proc = plot_cli("--report", log_dir)
    assert proc.returncode == 0 and proc.stdout.strip() == str(log_dir / "report.md"), proc.stderr
    assert (log_dir / "report.md").read_text(encoding="utf-8") == report


def test_report_of_an_older_run_says_what_it_did_not_record(stopped_and_resumed, tmp_path):
    """A folder from before report.md (log.txt's attempts record torch, device and source hash only, no step
    times; the checkpoint no peak memory) still gets its report, saying "not recorded" for the rest; a folder
    without log.txt or checkpoint is one line naming it and what to pass."""
    from plot import write_report
    old = tmp_path / "old"
    shutil.copytree(stopped_and_resumed[0], old)
    lines = []
    for line in (old / "log.txt").read_text().splitlines():
        if line.startswith("# "):
            step, record = line[2:].split(" ", 1)
            record = {k: v for k, v in json.loads(record).items()
                      if k in ("torch", "device", "source_sha256")}
            lines.append(f"# {step} {json.dumps(record)}")
        elif line.split()[1] in ("train", "val"):
            lines.append(line)
    (old / "log.txt").write_text("\n".join(lines) + "\n")
    ckpt = torch.load(old / "model_00008.pt", weights_only=True)
    del ckpt["peak_memory"]
    torch.save(ckpt, old / "model_00008.pt")
    report = open(write_report(str(old))).read()
    assert re.search(r"^\| 0-4 \| not recorded \| not recorded \| not recorded \| not recorded \| cpu \|",
                     report, re.M)
    for says in ("Flags that differ from the defaults: not recorded", "- wall time: not recorded",
                 "- mean tokens/s: not recorded", "- peak memory per rank: not recorded",
                 "- steps skipped for float16 overflow: not recorded", "| val loss | "):
        assert says in report, says
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_checkpoint").mkdir()
    shutil.copy(old / "log.txt", tmp_path / "no_checkpoint" / "log.txt")
    for folder, says in [("empty", "no log.txt there; pass the --log_dir of a train_gpt2.py run"),
                         ("no_checkpoint", "no model_NNNNN.pt checkpoint there")]:
        proc = plot_cli("--report", tmp_path / folder)
        assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"plot.py: error: --report {tmp_path / folder}: {says}"), proc.stderr
