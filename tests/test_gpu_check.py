"""bench/gpu_check.py's CPU rehearsal (--dry-run): every stage's code path, so that the first GPU call cannot
die on a typo, a missing file or a changed flag; its wall budget; its refusals."""
import os
import re
import subprocess
import sys

import pytest
import torch

from bench.gpu_check import parse_args
from conftest import REPO, ci_only

STAGES = ["1. The machine", "2. The GPT-2 124M recipe", "3. Correctness on the device", "4. The levers",
          "5. HellaSwag and generation"]


def gpu_check(*args, timeout=1200):
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def sections(report):
    """{stage title: its text}, from report.md's `## N. Title (S s)` headers."""
    parts = re.split(r"^## (\d\. [^\n(]+?)(?: \(\d+ s\))?$", report, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def rows(text):
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]


@pytest.mark.slow
@ci_only
def test_dry_run_rehearses_every_stage(tmp_path):
    proc = gpu_check("--out", tmp_path / "out", "--dry-run", "--work_dir", tmp_path / "work",
                     "--reference", tmp_path / "no-build-nanogpt")  # a developer's checkout may have one
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    assert proc.stdout.startswith(report[:200])  # printed too
    assert "No correctness check failed, no stage errored." in report and "Skipped for time" not in report
    got = sections(report)
    assert list(got) == STAGES, report

    machine = rows(got["1. The machine"])
    assert (machine[1][0].startswith("none: the dry run, on CPU")
            and re.fullmatch(r"[\d.]+ TFLOP/s", machine[1][5]))

    recipe = rows(got["2. The GPT-2 124M recipe"])
    assert recipe[1][:2] == ["train_gpt2.py", "8"] and float(recipe[1][3].replace(",", "")) > 0  # tokens/s
    assert recipe[2][0] == "build-nanogpt train_gpt2.py" and "no-build-nanogpt/train_gpt2.py not present" in \
        recipe[2][2] and "git clone https://github.com/karpathy/build-nanogpt" in recipe[2][2]
    # the targets, beside the numbers
    assert [r[0] for r in recipe[4:]] == ["tokens/s", "MFU against the measured bfloat16 rate",
                                          "tokens/s vs build-nanogpt, same run"]

    checks = rows(got["3. Correctness on the device"])[1:]
    assert len(checks) == 8 and all(r[-1] == "PASS" for r in checks), got["3. Correctness on the device"]
    measured = {r[0].split("`")[1] if "`" in r[0] else r[0]: r[3] for r in checks}
    assert measured["--init_from resume"] == "bitwise equal weights"  # on CPU, as the golden resume test
    assert any(m == "skipped [2], scales 65536/32768, 6 steps" for m in measured.values())

    levers = got["4. The levers"]
    assert [r[0] for r in rows(levers)[1:4]] == ["train_gpt2.py", "train_gpt2.py --chunked_loss 1",
                                                 "train_gpt2.py"]
    assert "| largest micro-batch that fits | 16 |" in levers  # 512 tokens a step / 32: one micro-batch of 16
    assert "max-autotune-no-cudagraphs" in levers and "liger-kernel" in levers

    evals = rows(got["5. HellaSwag and generation"])
    assert [r[-1] for r in evals[1:5]] == ["ran", "PASS", "ran", "PASS"], got["5. HellaSwag and generation"]
    assert "| 2 x 4 | greedy |" in got["5. HellaSwag and generation"]  # generate_bench.py's table

    logs = os.listdir(tmp_path / "out" / "logs")
    assert {"2_recipe.log", "3_float32.log", "3_resume.log", "3_fsdp_ac.log", "4_levers.log",
            "5_hellaswag.log", "5_generate_bench.log"} <= set(logs)
    # the runs and their checkpoints are removed
    assert sorted(os.listdir(tmp_path / "work")) == ["data", "motif"]


@pytest.mark.slow
@ci_only
def test_budget_stops_the_check_and_still_writes_the_report(tmp_path):
    """At --budget_s the running stage's processes are killed; the stages left are listed as skipped
    for time."""
    proc = gpu_check("--out", tmp_path, "--dry-run", "--budget_s", 12, "--stages", "2,5")
    report = (tmp_path / "report.md").read_text()
    assert list(sections(report)) == STAGES, report
    assert re.search(r"^Skipped for time: stages (2, )?5 \(rerun them with --stages\)\.$", report,
                     re.M), report
    assert "not selected (--stages)" in sections(report)["3. Correctness on the device"]
    if "stopped: the --budget_s ran out" in report:  # stage 2 started and was killed: a failure, exit 1
        assert proc.returncode == 1


@pytest.mark.parametrize("args, message", [
    (["--stages", "1,7"], "--stages 1,7: expected comma-separated numbers from 1 to 5"),
    (["--jobs", "0"], "--jobs and --budget_s must be >= 1"),
    pytest.param([], "no CUDA device here; --dry-run rehearses the check on CPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_flags_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) <= 2


def test_dry_run_flag_spellings():
    assert parse_args(["--dry-run"]).dry_run and parse_args(["--dry_run", "1"]).device == "cpu"
