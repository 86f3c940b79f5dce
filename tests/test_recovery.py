"""Where recovery meets recovery: resumes from another folder, restarts under --auto_resume, stops at awkward
moments, dead ranks, bad lock files and timeouts, each met as a user running long jobs meets it: a run that
continues exactly, or one line saying what to do and a non-zero exit, with nothing lost."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, read_log, run_train
from test_train import TINY, data, resume, run_main, train  # noqa: F401 (data: the fixture)


def test_a_lock_file_that_is_a_folder_is_named_with_what_to_do(capsys, data, tmp_path):  # noqa: F811
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path / "run", *TINY, "--max_steps", 1)
    assert code == 1 and err == (f"train_gpt2.py: error: --log_dir {tmp_path}/run: cannot open its lock file "
                                 f"{tmp_path}/run/.lock (Is a directory); remove it (the run makes a new one) "
                                 f"and run again\n")


def test_resume_with_a_mistyped_log_dir_leaves_nothing_behind(capsys, tmp_path):
    code, err = run_main(capsys, "--log_dir", tmp_path / "lgo", "--init_from", "resume")
    assert code == 1 and err == (f"train_gpt2.py: error: --log_dir {tmp_path}/lgo: no such folder, so nothing "
                                 f"to resume there; check the path\n")
    assert os.listdir(tmp_path) == []


def test_a_dist_timeout_past_a_year_is_one_line_on_every_rank(data, tmp_path):  # noqa: F811
    """Before: an OverflowError traceback from timedelta on every rank."""
    proc = train(data, tmp_path, "--max_steps", 1, "--dist_timeout", 10**14, nproc=2, check=False)
    # torchrun adds its own report of the failed ranks, but no rank has a traceback of train_gpt2.py's
    assert proc.returncode != 0 and 'train_gpt2.py", line' not in proc.stderr
    assert proc.stderr.count("train_gpt2.py: error: --dist_timeout 100000000000000: must be at most a year, "
                             "31536000\n") == 1
