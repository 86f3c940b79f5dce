"""Where recovery meets recovery: resumes from another folder, restarts under --auto_resume, stops at awkward
moments, dead ranks, bad lock files and timeouts, each met as a user running long jobs meets it: a run that
continues exactly, or one line saying what to do and a non-zero exit, with nothing lost."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoints import checkpoint_paths
from conftest import REPO, ci_only, read_log
from test_train import TINY, data, hurt_rank_1, resume, run_main, train  # noqa: F401 (data: the fixture)
from train_gpt2 import main


def test_a_lock_file_that_is_a_folder_is_named_with_what_to_do(capsys, data, tmp_path):  # noqa: F811
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path / "run", *TINY, "--max_steps", 1)
    assert code == 1 and err == (f"train_gpt2.py: error: --log_dir {tmp_path}/run: cannot open its lock "
                                 f"file {tmp_path}/run/.lock (Is a directory); remove it (the run makes a "
                                 f"new one) and run again\n")


def test_resume_with_a_mistyped_log_dir_leaves_nothing_behind(capsys, tmp_path):
    code, err = run_main(capsys, "--log_dir", tmp_path / "lgo", "--init_from", "resume")
    assert code == 1 and err == (f"train_gpt2.py: error: --log_dir {tmp_path}/lgo: no such folder, so "
                                 f"nothing to resume there; check the path\n")
    assert os.listdir(tmp_path) == []


def test_a_dist_timeout_past_a_year_is_one_line_on_every_rank(data, tmp_path):  # noqa: F811
    """Before: an OverflowError traceback from timedelta on every rank."""
    proc = train(data, tmp_path, "--max_steps", 1, "--dist_timeout", 10**14, nproc=2, check=False)
    # torchrun adds its own report of the failed ranks, but no rank has a traceback of train_gpt2.py's
    assert proc.returncode != 0 and 'train_gpt2.py", line' not in proc.stderr
    assert proc.stderr.count("train_gpt2.py: error: --dist_timeout 100000000000000: must be at most a year, "
                             "31536000\n") == 1


def test_a_resume_started_elsewhere_reads_the_checkpoints_data(data, tmp_path, monkeypatch,  # noqa: F811
                                                               capsys):
    """A run made with a relative --data_dir, resumed from a folder holding another corpus of that name:
    the resume continues on the data the checkpoint recorded (as the uninterrupted run does); once that
    folder is gone, it is one line saying to pass --data_dir."""
    import shutil
    for place in ("here", "elsewhere"):
        shutil.copytree(data, tmp_path / place / "corpus")
    for shard in (tmp_path / "elsewhere" / "corpus").glob("*train*"):  # another corpus, the same name
        np.save(shard, np.load(shard)[::-1].copy())
    monkeypatch.chdir(tmp_path / "here")
    main([str(a) for a in ["--data_dir", "corpus", "--log_dir", tmp_path / "whole", *TINY, "--max_steps", 4,
                           "--plot", 0]])
    main([str(a) for a in ["--data_dir", "corpus", "--log_dir", tmp_path / "cut", *TINY, "--max_steps", 2,
                           "--plot", 0]])
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    main([str(a) for a in ["--log_dir", tmp_path / "cut", "--init_from", "resume", "--max_steps", 4]])
    assert "note: --data_dir" not in capsys.readouterr().out
    assert read_log(tmp_path / "cut")["train"] == read_log(tmp_path / "whole")["train"]
    os.rename(tmp_path / "here" / "corpus", tmp_path / "here" / "moved")
    code, err = run_main(capsys, "--log_dir", tmp_path / "cut", "--init_from", "resume", "--max_steps", 6)
    assert code == 1 and err == (f"train_gpt2.py: error: {tmp_path}/cut/model_00004.pt: its data folder "
                                 f"{tmp_path}/here/corpus is gone (moved or deleted); pass --data_dir the "
                                 f"folder that holds those shards now\n")


def test_auto_resume_keeps_another_runs_log_and_samples(data, tmp_path, capsys):
    """A folder whose checkpoints were moved away: a plain start is refused; an --auto_resume start (a
    restart, or another run) begins its own log and keeps the earlier ones beside it, whole."""
    log = tmp_path / "log"
    main([str(a) for a in ["--data_dir", data, "--log_dir", log, *TINY, "--max_steps", 4, "--plot", 0]])
    (log / "samples.txt").write_text("4 sample 0: 'an earlier run's sample'\n")
    for p in log.glob("model_*.pt"):
        p.unlink()
    before = {n: (log / n).read_text() for n in ("log.txt", "samples.txt")}
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", log, *TINY, "--max_steps", 2)
    assert code == 1 and "already holds the log.txt of an earlier run" in err
    main([str(a) for a in ["--data_dir", data, "--log_dir", log, *TINY, "--max_steps", 2, "--plot", 0,
                           "--auto_resume", 1]])
    out = capsys.readouterr().out
    assert f"the log.txt there is kept as {log}/log.1.txt" in out and f"{log}/samples.1.txt" in out
    assert {n: (log / n.replace(".txt", ".1.txt")).read_text() for n in before} == before
    assert sorted(read_log(log)["train"]) == [0, 1]


def test_auto_resume_moves_an_unreadable_newest_checkpoint_aside_and_resumes_the_one_before(data, tmp_path,
                                                                                            capsys):
    """Every restart failed the same way on a corrupt newest checkpoint; now it is kept aside, the resume
    starts from the one before, and the run ends as an uninterrupted one."""
    log, flags = tmp_path / "log", [*TINY, "--ckpt_interval", 2, "--plot", 0, "--auto_resume", 1]
    main([str(a) for a in ["--data_dir", data, "--log_dir", tmp_path / "whole", *flags, "--max_steps", 6]])
    main([str(a) for a in ["--data_dir", data, "--log_dir", log, *flags, "--max_steps", 4]])
    with open(log / "model_00004.pt", "r+b") as f:
        f.truncate(1000)  # cut short, as by a full disk outside our control
    capsys.readouterr()
    main([str(a) for a in ["--data_dir", data, "--log_dir", log, *flags, "--max_steps", 6]])
    out = capsys.readouterr().out
    assert f"note: --auto_resume: {log}/model_00004.pt cannot be read, so it is moved aside (kept) to " \
           f"{log}/model_00004.pt.unreadable" in out
    assert f"resuming from {log}/model_00002.pt at step 2" in out
    assert (log / "model_00004.pt.unreadable").stat().st_size == 1000
    assert read_log(log)["train"] == read_log(tmp_path / "whole")["train"]


def test_a_half_written_checkpoint_is_removed_by_the_run_holding_the_folder(data, tmp_path, capsys):
    main([str(a) for a in ["--data_dir", data, "--log_dir", tmp_path, *TINY, "--max_steps", 2, "--plot", 0]])
    (tmp_path / "model_00003.pt.tmp").write_bytes(b"a checkpoint cut short by a crash")
    main([str(a) for a in ["--log_dir", tmp_path, "--init_from", "resume", "--max_steps", 3]])
    assert f"note: removed {tmp_path}/model_00003.pt.tmp, a checkpoint a crash left half-written" in \
        capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("model_*")) == ["model_00002.pt", "model_00003.pt"]


# Ctrl-C as the run writes its second checkpoint, then Ctrl-C again while torch.save is writing its
# records (a few writes in: torch's zip writer then raises a RuntimeError over the KeyboardInterrupt)
CTRL_C_IN_TORCH_SAVE = """
import os, signal, sys, torch, train_gpt2
save, calls = torch.save, []


class Interrupted:
    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def interrupted_save(obj, f):
    calls.append(obj["step"])
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
        f = Interrupted(f)
    save(obj, f)


torch.save = interrupted_save
train_gpt2.main(sys.argv[1:])
"""


def test_a_second_ctrl_c_inside_torch_save_is_one_line_and_exit_130(data, tmp_path):  # noqa: F811
    """Before: two tracebacks (KeyboardInterrupt, then torch's `enforce fail at inline_container.cc`) and
    exit 1. Nothing is lost either way: no .tmp left, the checkpoint before loads."""
    args = ["--data_dir", data, "--log_dir", tmp_path, *TINY, "--max_steps", 10, "--ckpt_interval", 2,
            "--plot", 0]
    proc = subprocess.run([sys.executable, "-c", CTRL_C_IN_TORCH_SAVE, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr) == (130, f"train_gpt2.py: aborted by Ctrl-C; the last good "
                                                   f"checkpoint is {tmp_path / 'model_00002.pt'}\n")
    assert sorted(os.listdir(tmp_path)) == [".lock", "log.txt", "model_00002.pt"]
    assert torch.load(tmp_path / "model_00002.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_a_dead_rank_is_one_line_on_the_surviving_rank(data, tmp_path):  # noqa: F811
    """Rank 1 SIGKILLed mid-run: rank 0's next collective loses its peer (gloo: "Connection reset by peer")
    and it exits 1 with one line naming the last checkpoint, which loads. Before: a full traceback. The
    ranks are started with the variables torchrun sets, without torchrun, which would stop rank 0 itself."""
    ranks, err = hurt_rank_1(data, tmp_path, lambda rank: rank.kill())
    last = checkpoint_paths(tmp_path)[-1]
    assert ranks[0].returncode == 1 and err == f"train_gpt2.py: error: rank 0: another rank closed its " \
                                               f"connection: it died; the last checkpoint is {last}\n", err
    assert torch.load(last, weights_only=True)["step"] % 10 == 0


@pytest.mark.slow
@ci_only
def test_fsdp_in_float16_computes_the_chunked_loss_in_float32_as_one_process(data, tmp_path):  # noqa: F811
    """FSDP's float16 parameter policy handed the chunked loss (on by default on CPU) a float16 head and
    input: every loss quantised to float16 (10.5430 against one process's 10.5176 at step 7 in the audit).
    The chunked loss runs in float32 under FSDP too, so 2 FSDP ranks train as one process does."""
    flags = ["--max_steps", 6, "--micro_batch_size", 2, "--total_batch_size", 256, "--dtype", "float16",
             "--plot", 0, "--chunked_loss", 1]
    train(data, tmp_path / "fsdp", *flags, "--fsdp", 1, nproc=2)
    train(data, tmp_path / "single", *flags)
    fsdp, single = read_log(tmp_path / "fsdp")["train"], read_log(tmp_path / "single")["train"]
    assert sorted(fsdp) == list(range(6))
    for step in fsdp:
        assert fsdp[step] == pytest.approx(single[step], abs=2e-4), step


@pytest.mark.parametrize("stop_in, steps", [(3, 8), (7, 8)], ids=["before-an-eval-step", "in-the-last-step"])
def test_a_stop_on_an_eval_step_loses_no_val_loss(data, tmp_path, monkeypatch, stop_in, steps):  # noqa: F811
    """SIGTERM during step stop_in: the run checkpoints the next step without evaluating it (a stop is
    quick); the resume measures that val loss, so log.txt and the final checkpoint hold every one an
    uninterrupted run holds (before: that val loss was never measured, and a run stopped in its last step
    had no final val loss, its model card saying "not measured")."""
    import signal
    from train_gpt2 import DataLoaderLite
    flags = [*TINY, "--max_steps", steps, "--ckpt_interval", 100, "--plot", 0]
    main([str(a) for a in ["--data_dir", data, "--log_dir", tmp_path / "whole", *flags]])
    reads, next_batch = [], DataLoaderLite.next_batch

    def signalled(loader):
        if "train" in loader.paths[0]:
            reads.append(1)
            if len(reads) == 2 * stop_in + 1:  # the first of step stop_in's 2 micro-batches
                os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(loader)
    monkeypatch.setattr(DataLoaderLite, "next_batch", signalled)
    main([str(a) for a in ["--data_dir", data, "--log_dir", tmp_path / "cut", *flags]])
    monkeypatch.setattr(DataLoaderLite, "next_batch", next_batch)
    assert [p.name for p in (tmp_path / "cut").glob("model_*.pt")] == [f"model_0000{stop_in + 1}.pt"]
    if stop_in + 1 < steps:
        main([str(a) for a in ["--log_dir", tmp_path / "cut", "--init_from", "resume"]])
    else:  # the run had ended: its resume only measures the final val loss
        main([str(a) for a in ["--log_dir", tmp_path / "cut", "--init_from", "resume", "--max_steps", steps]])
    cut, whole = read_log(tmp_path / "cut"), read_log(tmp_path / "whole")
    assert sorted(cut["val"]) == sorted(whole["val"]) == [0, 4, 8]
    assert cut["val"] == pytest.approx(whole["val"], abs=1e-6) and cut["train"] == whole["train"]
    final = [torch.load(tmp_path / run / "model_00008.pt", weights_only=True) for run in ("cut", "whole")]
    assert final[0]["val_loss"] == pytest.approx(final[1]["val_loss"], abs=1e-6)


@pytest.mark.slow
@ci_only
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_val_loss_is_the_same_tokens_whatever_the_rank_count_and_micro_batch(data, tmp_path,  # noqa: F811
                                                                             sharding):
    """7 sequences of 32 val tokens: 1 process in micro-batches of 4, 2 ranks in micro-batches of 2 (3 and
    4 sequences: under FSDP every rank runs as many forwards, padded), and a resume with micro-batches of 2
    all measure the same loss at the same weights (before: each rank read --val_steps micro-batches of its
    own, so 2 ranks and a resume of another size measured other tokens)."""
    flags = [*TINY, "--val_steps", 0, "--val_tokens", 7 * 32, "--max_steps", 4, "--plot", 0]
    train(data, tmp_path / "one", *flags)
    train(data, tmp_path / "two", *flags, "--micro_batch_size", 2, "--fsdp", int(sharding == "fsdp"), nproc=2)
    train(data, tmp_path / "resumed", *flags, "--max_steps", 2)
    proc = resume(tmp_path / "resumed", "--max_steps", 4, "--micro_batch_size", 2)
    assert "val loss: 224 tokens (7 sequences of 32) at every eval" in proc.stdout
    one, two, resumed = (read_log(tmp_path / run)["val"] for run in ("one", "two", "resumed"))
    assert sorted(one) == sorted(two) == [0, 4] and sorted(resumed) == [0, 2, 4]
    assert two[0] == pytest.approx(one[0], abs=1e-5)  # the same initial weights: the same tokens
    assert two[4] == pytest.approx(one[4], abs=2e-4) and resumed[4] == pytest.approx(one[4], abs=1e-5)


def test_a_rewritten_shard_of_the_same_length_is_refused_before_training_on_it(data, tmp_path,  # noqa: F811
                                                                                capsys):
    """A token changed where the checkpoint's samples of a shard do not look (its first, middle and last
    2048): the shard is checksummed whole when first read and refused, in a copied folder as in place;
    before, the resume trained on it."""
    import shutil
    shutil.copytree(data, tmp_path / "data")
    main([str(a) for a in ["--data_dir", tmp_path / "data", "--log_dir", tmp_path / "log", *TINY,
                           "--max_steps", 2, "--plot", 0]])
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    for folder in ("data", "copy"):
        path = tmp_path / folder / "synth_train_000001.npy"
        tokens = np.load(path)
        tokens[3000] = (tokens[3000] + 1) % 256
        np.save(path, tokens)
        code, err = run_main(capsys, "--log_dir", tmp_path / "log", "--init_from", "resume", "--max_steps", 3,
                             "--data_dir", tmp_path / folder)
        assert code == 1 and err == (f"train_gpt2.py: error: {path}: other tokens than when the checkpoint's "
                                     f"run read it (its checksum differs), so its position would read other "
                                     f"tokens; restore the shard, or resume with the changed data under "
                                     f"another --data_dir\n")
        assert not (tmp_path / "log" / "model_00003.pt").exists()
