"""plot.py: the PNG it draws from a log.txt (size, non-blank, changing with the data), logs with few lines,
one-line errors for bad or missing logs and for a missing matplotlib, and the atomic write."""
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from common import UserError
from plot import plot_log, read_log

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
