"""The training loop as a user runs it: flags, gradient accumulation, DDP, checkpoints, resume, errors; and
the loop's parts (val loss, log lines, checkpoint state) in-process."""
import contextlib
import hashlib
import json
import math
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import (HELLASWAG_EXCERPT, REPO, children, ci_only, folder_in_use, free_port, on_small_disk,
                      read_log, run_train, wait_for, write_npy_shard)
from checkpoints import checkpoint_paths, load_checkpoint
from common import gpt2_tokenizer
from train_gpt2 import GPT, GPTConfig, TrainConfig, get_lr, main, parse_args

# A tiny model on a 256-token vocabulary: each step takes milliseconds, so the tests exercise the real
# loop (loader, accumulation, AdamW, checkpoints) rather than a toy copy of it.
TINY = ["--n_layer", 2, "--n_head", 2, "--n_embd", 32, "--vocab_size", 256, "--block_size", 64,
        "--seq_len", 32, "--micro_batch_size", 4, "--total_batch_size", 256, "--warmup_steps", 2,
        "--max_lr", 3e-3, "--min_lr", 3e-4, "--eval_interval", 4, "--val_steps", 2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Learnable synthetic tokens: a random 97-token motif repeated, with 10% of tokens replaced by noise."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("synthetic")
    motif = rng.integers(0, 256, 97)
    for name, n in (("synth_val_000000.npy", 4000), ("synth_train_000001.npy", 12000),
                    ("synth_train_000002.npy", 9000)):
        tokens = np.resize(motif, n)
        noise = rng.random(n) < 0.1
        tokens[noise] = rng.integers(0, 256, noise.sum())
        write_npy_shard(d / name, tokens)
    return d


def train(data, log_dir, *args, **kwargs):
    return run_train("--data_dir", data, "--log_dir", log_dir, *TINY, *args, **kwargs)


def resume(log_dir, *args, **kwargs):
    """`--init_from resume`: every other flag comes from the checkpoint unless given again."""
    return run_train("--log_dir", log_dir, "--init_from", "resume", *args, **kwargs)


def run_main(capsys, *argv):
    """main() in-process, for errors: returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


# --- flags -------------------------------------------------------------------------------------------


def test_defaults_are_the_gpt2_124m_recipe():
    cfg, given = parse_args([])
    assert given == {}
    assert (cfg.micro_batch_size, cfg.seq_len, cfg.total_batch_size, cfg.max_steps, cfg.warmup_steps) == \
        (64, 1024, 524288, 19073, 715)
    assert (cfg.max_lr, cfg.min_lr, cfg.weight_decay, cfg.grad_clip) == (6e-4, 6e-5, 0.1, 1.0)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (12, 12, 768, 50304)
    assert (cfg.data_dir, cfg.log_dir, cfg.init_from, cfg.device, cfg.dtype, cfg.compile, cfg.seed) == \
        ("edu_fineweb10B", "log", "scratch", "auto", "auto", "auto", 1337)
    assert (cfg.eval_interval, cfg.val_tokens, cfg.val_steps, cfg.ckpt_interval, cfg.keep_last) == \
        (250, 20 * 64 * 1024 * 8, 0, 5000, 3)


def test_flag_syntax_and_booleans():
    cfg, given = parse_args(["--max_steps=7", "--max_lr", "1e-3", "--shuffle=true", "--init_from", "gpt2"])
    assert (cfg.max_steps, cfg.max_lr, cfg.shuffle, cfg.init_from) == (7, 1e-3, True, "gpt2")
    assert given == {"max_steps": 7, "max_lr": 1e-3, "shuffle": True, "init_from": "gpt2"}
    for text, value in (("1", True), ("0", False), ("false", False), ("True", True)):
        assert parse_args(["--shuffle", text])[0].shuffle is value
    with pytest.raises(SystemExit):
        parse_args(["--shuffle", "maybe"])


def test_the_command_line_is_parsed_once(monkeypatch):
    """One parse tells both the flags and which of them were given (before: two parsers, two parses)."""
    import argparse
    calls, parse = [], argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda *a, **k: calls.append(a) or parse(*a, **k))
    cfg, given = parse_args(["--max_steps", "7", "--shuffle", "0"])
    assert len(calls) == 1 and given == {"max_steps": 7, "shuffle": False} and cfg.max_steps == 7


@pytest.mark.parametrize("flag", ["--hellaswag", "--compile", "--chunked_loss"])
def test_auto_flags_are_auto_true_or_false_checked_at_parse_time(capsys, flag):
    """auto/1/0 flags are checked and converted by one argparse type, as finite_float checks numbers."""
    for text, value in (("auto", "auto"), ("AUTO", "auto"), ("1", True), ("true", True), ("0", False),
                        ("False", False)):
        assert getattr(parse_args([flag, text])[0], flag[2:]) == value and \
            type(getattr(parse_args([flag, text])[0], flag[2:])) is type(value)
    with pytest.raises(SystemExit) as e:
        parse_args([flag, "maybe"])
    assert e.value.code == 2 and capsys.readouterr().err == \
        f"train_gpt2.py: error: argument {flag}: expected auto, 1, 0, true or false, got 'maybe'\n"


def test_resume_reads_the_auto_flags_of_older_checkpoints_saved_as_text(tmp_path):
    """Checkpoints written before the flags became "auto"/True/False hold the text given: "1", "0"."""
    from checkpoints import resume_config
    config = dict(vars(TrainConfig()), hellaswag="1", compile="0", chunked_loss="AUTO")
    torch.save({"model": {}, "optimizer": {"state": {}, "param_groups": []}, "config": config, "step": 5,
                "model_config": dict(vars(GPTConfig())), "loader_position": [0, 0, 0]},
               tmp_path / "model_00005.pt")
    cfg, _ = resume_config(TrainConfig(log_dir=str(tmp_path), init_from="resume"), {})
    assert (cfg.hellaswag, cfg.compile, cfg.chunked_loss) == (True, False, "auto")


# README's quick start before presets
SHAKESPEARE = ("--data_dir shakespeare --n_layer 2 --n_head 4 --n_embd 64 --block_size 64 --seq_len 64 "
               "--micro_batch_size 8 --total_batch_size 512 --max_steps 300 --warmup_steps 20 --max_lr 3e-3 "
               "--min_lr 3e-4 --eval_interval 100 --val_tokens 4096").split()


def test_the_shakespeare_preset_is_the_readme_quick_starts_flags_which_flags_given_override():
    assert parse_args(["--preset", "shakespeare"]) == parse_args(SHAKESPEARE)
    for argv in (["--preset", "shakespeare", "--max_steps", "50"],
                 ["--max_steps=50", "--preset=shakespeare"]):
        cfg, given = parse_args(argv)
        assert (cfg.max_steps, cfg.n_layer, given["max_steps"], given["n_layer"]) == (50, 2, 50, 2)
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tinystories"])


def test_a_preset_run_resumes_with_the_preset_and_a_new_max_steps(capsys, shakespeare_shards, tmp_path):
    """The preset's flags count as given, as if typed: the same on resume, so the run continues."""
    args = ["--data_dir", str(shakespeare_shards), "--log_dir", str(tmp_path), "--device", "cpu",
            "--compile", "0", "--plot", "0", "--sample_interval", "0"]
    main(["--preset", "shakespeare", "--max_steps", "1", *args])
    main(["--preset", "shakespeare", "--init_from", "resume", "--max_steps", "2", *args])
    assert f"resuming from {tmp_path / 'model_00001.pt'} at step 1" in capsys.readouterr().out
    assert sorted(read_log(tmp_path)["train"]) == [0, 1] and (tmp_path / "model_00002.pt").exists()


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "train_gpt2.py", "--help"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in out.stdout


def test_help_groups_the_flags_under_the_configs_headings():
    out = subprocess.run([sys.executable, "train_gpt2.py", "--help"], cwd=REPO, capture_output=True,
                         text=True).stdout
    sections = re.split(r"^(\S[^\n]*):\n", out, flags=re.M)  # [usage, title, body, title, body, ...]
    groups = {title: re.findall(r"^  (--\w+)", body, re.M)
              for title, body in zip(sections[1::2], sections[2::2])}
    assert {title: flags[0] for title, flags in groups.items() if title != "options"} == {
        "I/O": "--log_dir", "data": "--data_dir", "model": "--block_size", "optimizer": "--max_steps",
        "evaluation": "--eval_interval", "system": "--device", "logging": "--plot"}
    flags = ["--preset"] + [f"--{name}" for name in TrainConfig.__dataclass_fields__]  # --preset: "options"
    assert sum(groups.values(), []) == flags
    assert "where the run starts from, where it writes" in out
    # what --preset shakespeare stands for
    assert "--n_layer 2 --n_head 4 --n_embd 64" in " ".join(out.split())


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['x', '--bogus']; import train_gpt2"],
                         cwd=REPO, capture_output=True, text=True)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


@pytest.mark.parametrize("argv, flag", [
    (["--init_from", "gpt3"], "--init_from"),
    (["--max_steps", "0"], "--max_steps"),
    (["--micro_batch_size", "-1"], "--micro_batch_size"),
    (["--total_batch_size", "0"], "--total_batch_size"),
    (["--min_lr", "1e-3", "--max_lr", "6e-4"], "--min_lr"),
    (["--seq_len", "128", "--total_batch_size", "512"], "--seq_len"),
    (["--total_batch_size", "1000"], "--total_batch_size"),
    (["--n_embd", "30", "--n_head", "4"], "--n_embd"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "float8"], "--dtype"),
    (["--compile", "maybe"], "--compile"),
    (["--chunked_loss", "maybe"], "--chunked_loss"),
    (["--max_stepz", "3"], "--max_stepz"),
    (["--max_steps", "ten"], "--max_steps"),
])
def test_bad_flags_are_one_line_errors(capsys, data, tmp_path, argv, flag):
    tiny = [a for a in map(str, TINY)]
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, *tiny, *argv)
    assert code != 0
    assert flag in err and "Traceback" not in err
    assert err.strip().count("\n") == 0, err


@pytest.mark.parametrize("flag, value", [("--max_lr", "nan"), ("--max_lr", "inf"), ("--weight_decay", "nan"),
                                         ("--min_lr", "-inf")])
def test_non_finite_numbers_are_refused_at_parse_time(capsys, data, tmp_path, flag, value):
    """nan passes every comparison (`nan <= 0` is False) and trained until the loss was nan; refused before
    anything is loaded."""
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, *map(str, TINY),
                         f"{flag}={value}")
    assert code == 2 and err == f"train_gpt2.py: error: argument {flag}: expected a finite number, " \
                                f"got {value!r}\n"


def test_errors_from_torchrun_are_one_line_and_nonzero(data, tmp_path):
    proc = train(data, tmp_path, "--min_lr", 1.0, nproc=1, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "train_gpt2.py: error: --min_lr 1.0: must be <= --max_lr 0.003"


# --- platforms: what each GPU and PyTorch build can do, simulated on this CPU machine ------------------


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be a CUDA GPU: set(name, bf16) names it and says whether it has bfloat16 natively."""
    def set_gpu(name, bf16):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: bf16 or including_emulation)
    return set_gpu


def test_dtype_auto_is_bfloat16_where_the_gpu_has_it_else_float16(gpu, monkeypatch):
    from common import UserError
    from train_gpt2 import resolve_system
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)

    def resolve_dtype(dtype, device):
        return resolve_system(device, dtype, False)[1]
    assert resolve_dtype("auto", "cpu") is None and resolve_dtype("auto", "mps") is None  # float32
    assert (resolve_dtype("float16", "cpu") == torch.float16
            and resolve_dtype("bfloat16", "cpu") == torch.bfloat16)
    gpu("NVIDIA H100 80GB HBM3", bf16=True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("float32", "cuda:1") is None
    gpu("Tesla T4", bf16=False)  # Turing: emulated bfloat16 only, which must not count
    assert resolve_dtype("auto", "cuda") == resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(UserError,
                       match=r"^--dtype bfloat16: Tesla T4 has no bfloat16 .*; use --dtype float16$"):
        resolve_dtype("bfloat16", "cuda")


def test_autocast_context_computes_in_the_resolved_dtype():
    from train_gpt2 import resolve_system
    linear, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", None)):
        with resolve_system("cpu", name, False)[3]:
            assert linear(x).dtype == (dtype or torch.float32)


def test_mfu_peaks_of_float16_gpus(gpu):
    from train_gpt2 import peak_flops
    for name, peak in (("Tesla V100-SXM2-16GB", 125e12), ("Tesla T4", 65e12),
                       ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("NVIDIA GeForce RTX 2080 Ti", None)):
        gpu(name, bf16=False)
        assert peak_flops("cuda:0") == peak, name
    assert peak_flops("cpu") is None


def test_compile_auto_is_off_with_a_note_where_triton_cannot_run(monkeypatch, capsys):
    """No Triton (native Windows), or a GPU older than compute capability 7.0: --compile auto is off and
    says why in one line; --compile 1 is a one-line error."""
    import importlib.util
    from common import UserError
    from train_gpt2 import resolve_system

    def resolve_compile(value, device):
        return resolve_system(device, "float32", value)[2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec, triton = importlib.util.find_spec, {"installed": False}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: ((find_spec("math") if triton["installed"] else None)
                                          if name == "triton" else find_spec(name, *a)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    assert resolve_compile("auto", "cuda") is False
    assert capsys.readouterr().out == "note: --compile auto is off: torch.compile needs Triton for CUDA " \
                                      "and it is not installed (pip install triton; on Windows, use WSL)\n"
    with pytest.raises(UserError, match=r"^--compile 1: torch.compile needs Triton .*; use --compile 0$"):
        resolve_compile(True, "cuda")
    triton["installed"] = True
    assert resolve_compile("auto", "cuda:0") is False
    assert "compute capability 7.0 or newer; Tesla P100-PCIE-16GB is 6.0" in capsys.readouterr().out
    with pytest.raises(UserError, match="^--compile 1: .* is 6.0; use --compile 0$"):
        resolve_compile(True, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_compile("auto", "cuda") is True and resolve_compile(False, "cuda") is False
    # CPU: no Triton needed
    assert resolve_compile("auto", "cpu") is False and resolve_compile(True, "cpu") is True
    assert capsys.readouterr().out == ""


def test_ddp_uses_gloo_with_a_note_where_pytorch_has_no_nccl(monkeypatch, capsys):
    import torch.distributed as dist
    from train_gpt2 import setup_distributed
    backends = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: backends.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for k, v in {"RANK": "0", "LOCAL_RANK": "3", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)

    def ddp_backend(device):
        assert setup_distributed(device, 60) == (0, 3, 4, "cuda:3" if device.startswith("cuda") else device)
        return backends[-1]
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert (ddp_backend("cuda:3"), ddp_backend("cpu")) == ("nccl", "gloo")
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)  # native Windows builds
    assert ddp_backend("cuda:0") == "gloo"
    assert capsys.readouterr().out == "note: this PyTorch has no NCCL (native Windows builds have none): " \
                                      "DDP runs on gloo, which is slower\n"


# --- schedule, accumulation, DDP ----------------------------------------------------------------------


def test_lr_schedule():
    cfg = TrainConfig()
    assert get_lr(0, cfg) == pytest.approx(6e-4 / 715)
    assert get_lr(714, cfg) == pytest.approx(6e-4)
    assert get_lr(715, cfg) == pytest.approx(6e-4)
    assert get_lr(715 + (19073 - 715) // 2, cfg) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    assert get_lr(19073, cfg) == pytest.approx(6e-5)
    assert get_lr(10**6, cfg) == pytest.approx(6e-5)
    lrs = [get_lr(s, cfg) for s in range(715, 19073)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warmup


# --- the loop's parts, in-process ------------------------------------------------------------------------


def test_val_loss_estimate_is_the_mean_over_the_same_val_batches(data):
    from train_gpt2 import DataLoaderLite, estimate_val_loss
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=32))
    loader = DataLoaderLite(str(data), "val", 4, 32, vocab_size=256)
    loader.next_batch()  # the estimate starts from the val split's first micro-batch all the same
    tokens = np.load(data / "synth_val_000000.npy").astype(np.int64)
    with torch.no_grad():
        expected = np.mean([model(torch.from_numpy(tokens[i * 128:(i + 1) * 128]).view(4, 32),
                                  torch.from_numpy(tokens[i * 128 + 1:(i + 1) * 128 + 1])
                                  .view(4, 32))[1].item()
                            for i in range(3)])
    first = estimate_val_loss(model, loader, 3 * 128, "cpu", contextlib.nullcontext(), rank=0, world_size=1)
    assert first == pytest.approx(expected, abs=1e-6) and not model.training
    assert estimate_val_loss(model, loader, 3 * 128, "cpu", contextlib.nullcontext(), 0, 1) == first


def test_log_lines_and_no_wandb(tmp_path):
    from common import UserError
    from plot import log_values, start_log, step_line
    (tmp_path / "run").mkdir()  # as main() makes it
    log_file = start_log(tmp_path / "run", None, {"torch": "2.x"})
    logged = []
    wandb_run = type("Recorder", (), {"log": lambda self, values, step: logged.append((step, values))})()
    log_values(log_file, wandb_run, 0, val=10.98765, hella=None)
    log_values(log_file, wandb_run, 0, train=10.1234567, lr=6e-5, mfu=None, skipped=False, time=1e9 + 0.125)
    log_values(log_file, wandb_run, 1, train=9.5, mfu=41.537, skipped=True)
    log_values(None, None, 1, train=9.0)  # a rank but 0: nothing written
    assert open(log_file).read() == '# 0 {"torch": "2.x"}\n0 val 10.9877\n0 train 10.123457\n' \
                                    '0 time 1000000000.12\n1 train 9.500000\n1 mfu 41.54\n1 skipped 1\n'
    # W&B: every value but None, False and the time (W&B times its lines itself)
    assert logged == [(0, {"val": 10.98765}), (0, {"train": 10.1234567, "lr": 6e-5}),
                      (1, {"train": 9.5, "mfu": 41.537, "skipped": True})]
    assert step_line(7, 3.25, 6e-4, 0.5, 0.25, 524288, None, None, False, None) == \
        "step     7 | loss 3.250000 | lr 6.0000e-04 | norm 0.5000 | dt 250ms | tok/sec 2,097,152 | 4.2M tok"
    assert step_line(7, 3.25, 6e-4, 0.5, 0.25, 524288, 41.5, 65536.0, True, 4980).endswith(
        " | mfu 41.5% | 4.2M tok | eta 1h23m | loss scale 65536 | skipped: float16 gradients overflowed, "
        "loss scale halved")
    with open(log_file, "w") as f:  # a crashed run's lines after its step-1 checkpoint, then resumed there
        f.write('# 0 {"torch": "2.x"}\n0 val 10.9877\n0 train 10.123457\n1 val 9.5000\n1 train 9.000000\n'
                '2 train 8.000000\n')
    start_log(tmp_path / "run", 1, {"torch": "2.x"})  # every attempt says where it starts, what made it
    assert open(log_file).read() == '# 0 {"torch": "2.x"}\n0 val 10.9877\n0 train 10.123457\n1 val 9.5000\n' \
                                    '# 1 {"torch": "2.x"}\n'
    (tmp_path / "odd" / "log.txt").mkdir(parents=True)  # a log.txt it cannot read: one line, not a traceback
    with pytest.raises(UserError,
                       match=r"--log_dir .*odd: cannot read .*log.txt \(Is a directory\); move it"):
        start_log(tmp_path / "odd", 1, {"torch": "2.x"})


def test_checkpoint_state_restores_into_a_new_run(data, tmp_path, capsys):
    """What checkpoint_state() saves, restore_state() puts back: optimizer, loss scale, data position."""
    from checkpoints import checkpoint_state, restore_state, save_checkpoint
    from train_gpt2 import DataLoaderLite
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=32))
    [optimizer] = model.configure_optimizers(0.1, 1e-3, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    loaders = [DataLoaderLite(str(data), split, 4, 32, vocab_size=256) for split in ("train", "val")]
    x, y = loaders[0].next_batch()
    scaler.scale(model(x, y)[1]).backward()
    scaler.step(optimizer)
    scaler.update()
    cfg = TrainConfig(data_dir=str(data), micro_batch_size=4, seq_len=32)
    state = checkpoint_state(model, [optimizer], scaler, cfg, 1, loaders, {"device": "cpu"}, val_loss=5.5)
    path = save_checkpoint(state, tmp_path, keep_last=3)
    model2 = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=32))
    [optimizer2] = model2.configure_optimizers(0.1, 1e-3, "cpu")
    scaler2 = torch.amp.GradScaler("cpu", enabled=True)
    loaders2 = [DataLoaderLite(str(data), split, 4, 32, vocab_size=256) for split in ("train", "val")]
    ckpt = load_checkpoint(path)
    restore_state(ckpt, model2, [optimizer2], scaler2, *loaders2)
    assert loaders2[0].position == (0, 0, 128)
    assert scaler2.state_dict() == scaler.state_dict()
    assert optimizer2.state_dict()["state"][0]["step"] == 1 and ckpt["val_loss"] == 5.5
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])



def test_a_checkpoint_of_the_older_format_is_refused_in_one_line(data, tmp_path, capsys):
    """Checkpoints before the optimizer state was saved by parameter name (numbered instead, with the
    position in micro-batches) cannot be resumed: one line says so; their weights still load."""
    from train_gpt2 import load_model
    train(data, tmp_path, "--max_steps", 1)
    ckpt = torch.load(tmp_path / "model_00001.pt", weights_only=True)  # not memory-mapped: rewritten below
    model = GPT(GPTConfig(**ckpt["model_config"]))
    [optimizer] = model.configure_optimizers(0.1, 1e-3, "cpu")
    old = {k: v for k, v in ckpt.items() if k not in ("loader_position", "data")}
    torch.save({**old, "optimizer": optimizer.state_dict(), "loader_positions": [1]},
               tmp_path / "model_00001.pt")
    code, err = run_main(capsys, "--log_dir", tmp_path, "--init_from", "resume", "--max_steps", 2)
    assert code == 1 and err == f"train_gpt2.py: error: {tmp_path}/model_00001.pt: written by an older " \
                                f"train_gpt2.py, whose optimizer state this one cannot read; continue that " \
                                f"run with the train_gpt2.py that wrote it, or pick a new --log_dir\n"
    assert torch.equal(load_model(str(tmp_path)).state_dict()["lm_head.weight"],
                       ckpt["model"]["lm_head.weight"])


def test_provenance_in_every_checkpoint_and_the_log(data, tmp_path):
    """What made a run: torch's version, the device and the first 16 hex digits of a sha256 over every
    script and module of the repository (the shard reader, checkpoints and HellaSwag too, not only
    train_gpt2.py), in each checkpoint and in log.txt's `# STEP {...}` line, which plot.py and a resume
    read past; each attempt (the first start, then each resume) has its own such line."""
    from plot import read_log as plot_read_log
    train(data, tmp_path, "--max_steps", 2, "--ckpt_interval", 1, "--plot", 0)
    source = hashlib.sha256()
    for name in sorted(p for p in os.listdir(REPO) if p.endswith(".py")):
        with open(os.path.join(REPO, name), "rb") as f:
            source.update(f.read())
    assert {"train_gpt2.py", "fineweb.py", "checkpoints.py", "hellaswag.py"} <= set(os.listdir(REPO))
    made_by = {"torch": torch.__version__, "device": "cpu", "source_sha256": source.hexdigest()[:16]}
    assert [load_checkpoint(p)["provenance"] for p in checkpoint_paths(tmp_path)] == [made_by] * 2
    resume(tmp_path, "--max_steps", 3)
    lines = (tmp_path / "log.txt").read_text().splitlines()
    records = [(int(ln.split()[1]), json.loads(ln.split(" ", 2)[2])) for ln in lines if ln.startswith("#")]
    assert lines[0].startswith("# 0 ") and [step for step, _ in records] == [0, 2]
    assert [{k: record[k] for k in made_by} for _, record in records] == [made_by] * 2
    assert plot_read_log(str(tmp_path / "log.txt"))["train"][0] == [0, 1, 2]
    assert load_checkpoint(tmp_path / "model_00003.pt")["provenance"] == made_by


def test_grad_accumulation_equals_one_big_batch(data, tmp_path):
    # 4 micro-steps
    train(data, tmp_path / "accum", "--max_steps", 6, "--micro_batch_size", 2, "--total_batch_size", 256)
    train(data, tmp_path / "big", "--max_steps", 6, "--micro_batch_size", 8, "--total_batch_size", 256)
    a, b = read_log(tmp_path / "accum"), read_log(tmp_path / "big")
    assert len(a["train"]) == 6
    for step in a["train"]:
        assert a["train"][step] == pytest.approx(b["train"][step], abs=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=ci_only)])
def test_ddp_two_processes_equal_one_process(data, tmp_path, optimizer):
    """2 gloo ranks accumulating 2 micro-batches each == 1 process accumulating 4, step for step; and the
    2-rank checkpoint resumes on 1 process with the same token stream. Shuffled, so that the ranks must
    agree on the order of the micro-batches within a shard too (test_multinode runs the default order).
    With muon, every rank orthogonalizes the same all-reduced whole matrices."""
    common = ["--max_steps", 6, "--ckpt_interval", 3, "--micro_batch_size", 2, "--total_batch_size", 256,
              "--shuffle", 1, "--optimizer", optimizer]
    train(data, tmp_path / "ddp", *common, nproc=2)
    train(data, tmp_path / "single", *common)
    ddp, single = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    assert sorted(ddp["train"]) == list(range(6))
    for step in range(6):
        assert ddp["train"][step] == pytest.approx(single["train"][step], abs=2e-5)
    a = torch.load(tmp_path / "ddp" / "model_00006.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "model_00006.pt", weights_only=True)
    assert a["loader_position"] == b["loader_position"] == [0, 0, 24 * 64]  # 24 micro-batches of 2x32 read
    # Muon orthogonalizes in bfloat16 (torch's Newton-Schulz), where the all-reduce's float32 summation
    # order (~1e-7 apart) can flip a rounding: its weights agree to 1e-4 (measured), its losses to 2e-5.
    atol = 1e-5 if optimizer == "adamw" else 5e-4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=atol, rtol=1e-4)

    os.remove(tmp_path / "ddp" / "model_00006.pt")
    resume(tmp_path / "ddp")
    resumed = read_log(tmp_path / "ddp")
    for step in range(3, 6):
        assert resumed["train"][step] == pytest.approx(single["train"][step], abs=2e-5)


# --- checkpoints and resume ----------------------------------------------------------------------------


def test_checkpoints_are_safe_and_complete(data, tmp_path):
    train(data, tmp_path, "--max_steps", 9, "--ckpt_interval", 2, "--keep_last", 2)
    assert sorted(n for n in os.listdir(tmp_path) if n != "loss.png") == [
        ".lock", "log.txt", "model_00008.pt", "model_00009.pt", "report.md"]
    ckpt = torch.load(tmp_path / "model_00009.pt", weights_only=True)  # no pickled classes
    assert ckpt["step"] == 9 and ckpt["config"]["max_steps"] == 9
    assert ckpt["model_config"] == {"block_size": 64, "vocab_size": 256, "n_layer": 2, "n_head": 2,
                                    "n_embd": 32}
    # (epoch, shard, token): 9 x 2 micro-batches of 4x32
    assert ckpt["loader_position"] == [0, 0, 9 * 2 * 128]
    assert [(name, n) for name, n, _ in ckpt["data"]["train"]] == [("synth_train_000001.npy", 12000),
                                                                   ("synth_train_000002.npy", 9000)]
    assert [name for name, _, _ in ckpt["data"]["val"]] == ["synth_val_000000.npy"]
    assert len(ckpt["optimizer"]["state"]) > 0
    # The final checkpoint is the model after the last update: its val loss is that of the weights it holds.
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    val = np.load(data / "synth_val_000000.npy").astype(np.int64)
    with torch.no_grad():
        losses = [model(torch.from_numpy(val[i * 128: (i + 1) * 128]).view(4, 32),
                        torch.from_numpy(val[i * 128 + 1: (i + 1) * 128 + 1]).view(4, 32))[1]
                  for i in range(2)]
    assert ckpt["val_loss"] == pytest.approx(sum(losses).item() / 2, abs=1e-5)
    assert read_log(tmp_path)["val"][9] == pytest.approx(ckpt["val_loss"], abs=1e-4)


@pytest.mark.parametrize("dtype,shuffle,optimizer", [("float32", 0, "adamw"),
                                                     pytest.param("float16", 0, "adamw", marks=ci_only),
                                                     pytest.param("float32", 1, "adamw", marks=ci_only),
                                                     pytest.param("float32", 0, "muon", marks=ci_only),
                                                     pytest.param("float16", 0, "muon", marks=ci_only)])
def test_resume_after_crash_equals_uninterrupted_run(data, tmp_path, dtype, shuffle, optimizer):
    """A 12-step run, and the same run crashed after its step-6 checkpoint and resumed: identical losses
    (no compile; float16 with its GradScaler state restored; shuffled, the same order of micro-batches;
    muon with both its optimizers' state), and the lines the crashed run logged after its checkpoint are
    replaced (the lines of losses; each attempt's `#` line and the steps' end times are its own)."""
    args = ["--max_steps", 12, "--ckpt_interval", 6, "--dtype", dtype, "--shuffle", shuffle,
            "--optimizer", optimizer]
    train(data, tmp_path / "full", *args)
    train(data, tmp_path / "crashed", *args)
    os.remove(tmp_path / "crashed" / "model_00012.pt")  # as if it died before step 12
    proc = resume(tmp_path / "crashed")
    assert "resuming from" in proc.stdout and "model_00006.pt at step 6" in proc.stdout
    logged = [[ln for ln in open(tmp_path / run / "log.txt") if not ln.startswith("#") and " time " not in ln]
              for run in ("full", "crashed")]
    assert logged[0] == logged[1]
    a = torch.load(tmp_path / "full" / "model_00012.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "crashed" / "model_00012.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- float16, for GPUs without bfloat16 (V100, T4, RTX 20xx): autocast and GradScaler run on CPU too ----


def step_lines(stdout):
    return [ln for ln in stdout.splitlines() if re.match(r"step +\d+ \| loss ", ln)]


def test_float16_run_learns_like_float32_and_its_checkpoint_holds_the_scaler(data, tmp_path):
    fp32 = train(data, tmp_path / "fp32", "--max_steps", 8)
    fp16 = train(data, tmp_path / "fp16", "--max_steps", 8, "--dtype", "float16")
    assert "| float32 |" in fp32.stdout and "| float16 |" in fp16.stdout  # --dtype auto is float32 off CUDA
    assert (all(ln.endswith(" | loss scale 65536") for ln in step_lines(fp16.stdout))
            and len(step_lines(fp16.stdout)) == 8)
    assert "loss scale" not in fp32.stdout
    a, b = read_log(tmp_path / "fp32"), read_log(tmp_path / "fp16")
    assert b["val"][8] < b["val"][0] - 0.3  # it learns ...
    for step in range(8):  # ... what float32 learns, to float16's precision
        assert b["train"][step] == pytest.approx(a["train"][step], abs=0.02)
    ckpt = torch.load(tmp_path / "fp16" / "model_00008.pt", weights_only=True)
    assert ckpt["scaler"] == {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                              "growth_interval": 2000, "_growth_tracker": 8}
    assert torch.load(tmp_path / "fp32" / "model_00008.pt", weights_only=True)["scaler"] == {}
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {8}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_float16_overflow_skips_exactly_one_step(data, tmp_path, monkeypatch, capsys, optimizer):
    """Step 3's gradients made inf (a hook on its first micro-batch's loss, whose value stays finite; with
    muon, on one block matrix's gradient only, which Muon steps): the GradScaler skips that update, of
    every optimizer, and halves the loss scale, the step line says so, and the run goes on."""
    forward, calls, hooks = GPT.forward, [], []

    def overflowing_forward(self, idx, targets=None, kv_cache=None):
        logits, loss = forward(self, idx, targets, kv_cache)
        if self.training:
            calls.append(len(calls))
            while hooks:
                hooks.pop().remove()
            if len(calls) == 7:  # 2 micro-batches a step: the first of step 3
                target = self.transformer.h[0].mlp.c_fc.weight if optimizer == "muon" else loss
                hooks.append(target.register_hook(lambda grad: grad * math.inf))
        return logits, loss

    monkeypatch.setattr(GPT, "forward", overflowing_forward)
    main([str(a) for a in ["--data_dir", data, "--log_dir", tmp_path, *TINY, "--max_steps", 8,
                           "--dtype", "float16", "--optimizer", optimizer]])
    lines = step_lines(capsys.readouterr().out)
    assert len(calls) == 16 and len(lines) == 8
    skipped = [ln for ln in lines if "skipped" in ln]
    assert len(skipped) == 1 and skipped[0].startswith("step     3 |"), "\n".join(lines)
    assert "| norm inf |" in skipped[0] or "| norm nan |" in skipped[0]
    assert skipped[0].endswith("| loss scale 65536 | skipped: float16 gradients overflowed, "
                               "loss scale halved")
    assert all(ln.endswith("| loss scale 65536") for ln in lines[:3])
    assert all(ln.endswith("| loss scale 32768") for ln in lines[4:])
    log = read_log(tmp_path)
    assert sorted(log["train"]) == list(range(8)) and all(math.isfinite(v) for v in log["train"].values())
    assert log["val"][8] < log["val"][0]
    ckpt = torch.load(tmp_path / "model_00008.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] == 32768.0
    adamw_states = [s for s in ckpt["optimizer"]["state"].values() if "step" in s]  # Muon's have no count
    assert {int(s["step"]) for s in adamw_states} == {7}  # 8 steps, one skipped


@ci_only
def test_n_steps_then_n_more_equals_2n_steps(data, tmp_path):
    """The literal user story: run N steps, then `--init_from resume --max_steps 2N`. The LR is constant
    here so that the first run's shorter schedule is the same schedule."""
    const = ["--warmup_steps", 0, "--min_lr", 3e-3]
    train(data, tmp_path / "full", *const, "--max_steps", 10)
    train(data, tmp_path / "parts", *const, "--max_steps", 5)
    resume(tmp_path / "parts", "--max_steps", 10)
    full, parts = read_log(tmp_path / "full"), read_log(tmp_path / "parts")
    assert full["train"] == parts["train"]


@pytest.fixture(scope="module")
def counter_data(tmp_path_factory):
    """Token id = its place in the folder (ids 0..1754 train, 2000.. val): a batch says which tokens it holds.
    Shard tails of 30 and 59 tokens hold no micro-batch of 4x32 or 2x32."""
    d = tmp_path_factory.mktemp("counter")
    write_npy_shard(d / "count_train_000001.npy", np.arange(0, 1055))
    write_npy_shard(d / "count_train_000002.npy", np.arange(1055, 1755))
    write_npy_shard(d / "count_val_000000.npy", np.arange(2000, 2300))
    return d


def test_resume_with_half_the_micro_batch_reads_on_from_the_first_unread_token(counter_data, tmp_path,
                                                                               monkeypatch):
    """README's advice when out of memory: resume with a smaller --micro_batch_size (more accumulation). The
    token ranges the train loader reads, interrupted at step 3 and resumed with half the micro-batch, are an
    uninterrupted run's, in order (before, the position counted micro-batches: it re-read 384 tokens)."""
    from train_gpt2 import DataLoaderLite
    reads, next_batch = [], DataLoaderLite.next_batch

    def recording(self):
        x, y = next_batch(self)
        if "_train_" in self.paths[0]:
            ids = x.flatten()
            assert torch.equal(ids, torch.arange(ids[0], ids[0] + len(ids)))  # one range of one shard
            reads.append((int(ids[0]), int(ids[-1]) + 1))
        return x, y

    def merged(ranges):
        out = []
        for a, b in ranges:
            out[-1:] = [(out[-1][0], b)] if out and out[-1][1] == a else out[-1:] + [(a, b)]
        return out

    monkeypatch.setattr(DataLoaderLite, "next_batch", recording)
    main([str(a) for a in ["--data_dir", counter_data, "--log_dir", tmp_path, *TINY, "--vocab_size", 4096,
                           "--max_steps", 8, "--ckpt_interval", 3, "--plot", 0]])  # 2 of 4x32 a step
    uninterrupted = list(reads)
    for step in (6, 8):
        os.remove(tmp_path / f"model_0000{step}.pt")
    del reads[6:]
    main([str(a) for a in ["--log_dir", tmp_path, "--init_from", "resume", "--micro_batch_size", 2]])
    assert len(reads) == 6 + 5 * 4 and reads[6] == (768, 832)
    assert merged(reads) == merged(uninterrupted) == [(0, 1024), (1055, 1695), (0, 384)]


def test_resume_refuses_changed_data_and_reads_another_data_dir_from_its_beginning(data, tmp_path, capsys):
    """A shard added, removed or rewritten in --data_dir since the checkpoint: one line naming the first
    difference. Another --data_dir holding other data is a new corpus, read from its first token (with a
    note); one holding the same data (a copy, a move) continues where the checkpoint stopped."""
    import shutil
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(data, tmp_path / "copy")
    main([str(a) for a in ["--data_dir", tmp_path / "data", "--log_dir", tmp_path / "log", *TINY,
                           "--max_steps", 2, "--plot", 0]])
    tokens, val = np.load(data / "synth_train_000001.npy"), np.load(data / "synth_val_000000.npy")
    for name, new, first_difference in [  # new tokens for the shard, or None to remove it
            ("synth_train_000003.npy", tokens, "train shard synth_train_000003.npy is new"),
            ("synth_train_000002.npy", None, "train shard synth_train_000002.npy is missing"),
            ("synth_train_000001.npy", tokens[:11000],
             "train shard synth_train_000001.npy has changed (12000 tokens then, 11000 now)"),
            ("synth_train_000001.npy", tokens[::-1],
             "train shard synth_train_000001.npy holds other tokens")]:
        path = tmp_path / "data" / name
        saved = path.read_bytes() if path.exists() else None
        os.remove(path) if new is None else write_npy_shard(path, new)
        code, err = run_main(capsys, "--log_dir", tmp_path / "log", "--init_from", "resume", "--max_steps", 4)
        assert code == 1 and err == f"train_gpt2.py: error: --data_dir {tmp_path / 'data'}: " \
            f"{first_difference} since the checkpoint, so its position would read other tokens; " \
            f"restore the shards, or resume with the changed data under another --data_dir to read it " \
            f"from its beginning\n"
        os.remove(path) if saved is None else path.write_bytes(saved)

    # val has no position: a changed val shard is measured from here on, with a note
    shutil.copytree(tmp_path / "log", tmp_path / "log_val")
    path = tmp_path / "data" / "synth_val_000000.npy"
    saved = path.read_bytes()
    write_npy_shard(path, val[::-1])
    main([str(a) for a in ["--log_dir", tmp_path / "log_val", "--init_from", "resume", "--max_steps", 3]])
    assert f"note: --data_dir {tmp_path / 'data'}: val shard synth_val_000000.npy holds other tokens since " \
           f"the checkpoint, so val loss from here on is measured on other tokens than before\n" \
           in capsys.readouterr().out
    path.write_bytes(saved)

    shutil.copytree(data, tmp_path / "other")
    write_npy_shard(tmp_path / "other" / "synth_train_000001.npy", tokens[::-1])
    for name, position in (("data", [0, 0, 3 * 256]), ("copy", [0, 0, 3 * 256]), ("other", [0, 0, 256])):
        shutil.copytree(tmp_path / "log", tmp_path / f"log_{name}")
        main([str(a) for a in ["--log_dir", tmp_path / f"log_{name}", "--init_from", "resume",
                               "--max_steps", 3, "--data_dir", tmp_path / name]])  # one step more
        note = f"note: --data_dir {tmp_path / name} is not the data of the checkpoint " \
               f"({tmp_path / 'data'}): its train split is read from its beginning, and val loss measured " \
               f"on its val split\n"
        assert (note in capsys.readouterr().out) == (name == "other")
        assert torch.load(tmp_path / f"log_{name}" / "model_00003.pt")["loader_position"] == position


@pytest.mark.parametrize("first, then, refusal", [
    ([], ["--shuffle", 1], "--shuffle 1: the checkpoint's run read its data in sorted order and its position "
                           "holds in that order only; keep --shuffle 0"),
    (["--shuffle", 1], ["--micro_batch_size", 2], "--micro_batch_size 2 --seq_len 32: a shuffled run's "
                                                  "position holds for micro-batches of its size only; keep "
                                                  "--micro_batch_size 4 --seq_len 32")],
    ids=["shuffle", "shuffled_micro_batch"])
def test_resume_refuses_a_data_order_without_the_checkpoints_position(data, tmp_path, capsys, first, then,
                                                                      refusal):
    main([str(a) for a in ["--data_dir", data, "--log_dir", tmp_path, *TINY, "--max_steps", 1, *first]])
    code, err = run_main(capsys, "--log_dir", tmp_path, "--init_from", "resume", "--max_steps", 2, *then)
    assert code == 1 and err == f"train_gpt2.py: error: {refusal}\n"


SIGNALLED_RUN = [*TINY, "--max_steps", 60, "--ckpt_interval", 1000]


@pytest.fixture(scope="module")
def uninterrupted_train_losses(data, tmp_path_factory):
    """The train losses of SIGNALLED_RUN run to its end, never signalled (one run for both signals)."""
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    run_train("--data_dir", data, "--log_dir", log_dir, *SIGNALLED_RUN)
    return read_log(log_dir)["train"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=ci_only)])
def test_signal_writes_checkpoint_and_resume_continues(data, tmp_path, sig, uninterrupted_train_losses):
    """Preemption or Ctrl-C: the step finishes, a checkpoint is written, exit 0; resuming then gives
    exactly the losses of a run that was never interrupted."""
    proc = subprocess.Popen([sys.executable, "train_gpt2.py", "--data_dir", str(data), "--log_dir",
                             str(tmp_path / "run"), *map(str, SIGNALLED_RUN)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_file = tmp_path / "run" / "log.txt"
    deadline = time.time() + 600
    while time.time() < deadline and not (log_file.exists() and log_file.read_text().count("train") >= 3):
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    ckpts = [n for n in os.listdir(tmp_path / "run") if n.endswith(".pt")]
    assert len(ckpts) == 1
    step = int(ckpts[0][6:11])
    assert 3 <= step < 60
    assert sorted(read_log(tmp_path / "run")["train"]) == list(range(step))

    resume(tmp_path / "run")
    assert read_log(tmp_path / "run")["train"] == uninterrupted_train_losses


def test_closed_terminal_writes_checkpoint_and_resume_continues(data, tmp_path, uninterrupted_train_losses):
    """A run in a terminal (a pseudo-terminal here) that is closed, as an ssh session that drops: the kernel
    sends SIGHUP and every later write to the terminal fails. The run stops as on SIGTERM, its output going
    nowhere; before, SIGHUP killed it, and a caught one still died on the next print (EIO)."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child, with the terminal as its controlling terminal, stdout and stderr
        os.execv(sys.executable, [sys.executable, os.path.join(REPO, "train_gpt2.py"), "--data_dir",
                                  str(data), "--log_dir", str(tmp_path / "run"), *map(str, SIGNALLED_RUN)])
    log_file = tmp_path / "run" / "log.txt"

    def three_steps_logged():
        while select.select([terminal], [], [], 0)[0]:  # read what it prints, so that its writes never block
            os.read(terminal, 1 << 16)
        return log_file.exists() and log_file.read_text().count("train") >= 3
    try:
        wait_for(three_steps_logged, 600, "3 train steps")
    finally:
        os.close(terminal)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    ckpts = [n for n in os.listdir(tmp_path / "run") if n.endswith(".pt")]
    assert len(ckpts) == 1 and 3 <= int(ckpts[0][6:11]) < 60
    resume(tmp_path / "run")
    assert read_log(tmp_path / "run")["train"] == uninterrupted_train_losses


# Ctrl-C as the run writes its second checkpoint, then Ctrl-C again mid-write: real SIGINTs, sent from
# inside torch.save so that they land there.
CTRL_C_TWICE = """
import os, signal, sys, torch, train_gpt2
save, calls = torch.save, []
def interrupted_save(obj, f):
    calls.append(obj["step"])
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
        f.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGINT)
    save(obj, f)
torch.save = interrupted_save
train_gpt2.main(sys.argv[1:])
"""


def test_second_ctrl_c_during_a_checkpoint_write_is_one_line_and_leaves_no_tmp(data, tmp_path):
    args = ["--data_dir", data, "--log_dir", tmp_path, *TINY, "--max_steps", 10, "--ckpt_interval", 2,
            "--plot", 0]
    proc = subprocess.run([sys.executable, "-c", CTRL_C_TWICE, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130
    assert proc.stderr == f"train_gpt2.py: aborted by Ctrl-C; the last good checkpoint is " \
                          f"{tmp_path / 'model_00002.pt'}\n"
    assert sorted(os.listdir(tmp_path)) == [".lock", "log.txt", "model_00002.pt"]
    assert load_checkpoint(tmp_path / "model_00002.pt")["step"] == 2


def hurt_rank_1(data, tmp_path, hurt, *flags):
    """Two ranks started with the variables torchrun sets (without torchrun, which would act on a failed
    rank itself); once a checkpoint is written, hurt(rank 1's Popen). (both Popens, rank 0's stderr)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    args = ["train_gpt2.py", "--data_dir", data, "--log_dir", tmp_path, *TINY, "--max_steps", 100000,
            "--ckpt_interval", 10, "--plot", 0, *flags]
    ranks = [subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO,
                              env={**env, "RANK": r, "LOCAL_RANK": r},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in "01"]
    try:
        wait_for(lambda: checkpoint_paths(tmp_path), 600, "checkpoint")
        hurt(ranks[1])
        err = ranks[0].communicate(timeout=600)[1]
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    return ranks, err


@pytest.mark.slow
def test_a_frozen_rank_ends_the_run_after_dist_timeout_with_one_line(data, tmp_path):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0's next collective waits --dist_timeout 5 s, then rank 0 exits
    1 with one line naming the last checkpoint, which loads. Before, it waited silently (gloo's default is
    30 minutes). The ranks are started with the variables torchrun sets, without torchrun, which would
    then wait 30 s before it kills the frozen rank."""
    ranks, err = hurt_rank_1(data, tmp_path, lambda rank: rank.send_signal(signal.SIGSTOP),
                             "--dist_timeout", 5)
    last = checkpoint_paths(tmp_path)[-1]
    assert ranks[0].returncode == 1, err[-3000:]  # once seen -6 (SIGABRT) under load: keep what it said
    assert err == f"train_gpt2.py: error: rank 0: a collective waited more than --dist_timeout 5 s for the " \
                  f"other ranks, so one is frozen or dead; the last checkpoint is {last}\n"
    assert (load_checkpoint(last)["step"] % 10 == 0
            and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")])


@pytest.mark.slow
@ci_only
def test_auto_resume_under_torchrun_max_restarts_survives_a_killed_rank(data, tmp_path):
    """`torchrun --max-restarts 1` and --auto_resume 1: rank 1 SIGKILLed after the step-10 checkpoint, so
    torchrun stops rank 0 and starts both again, as a new run that continues the newest checkpoint. It
    exits 0 with an uninterrupted run's final weights and logged values, bit for bit."""
    args = ["--data_dir", data, *TINY, "--max_steps", 100, "--ckpt_interval", 10, "--plot", 0,
            "--auto_resume", 1]
    run_train(*args, "--log_dir", tmp_path / "full", nproc=2)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", "--max-restarts", "1", "train_gpt2.py",
                                 *map(str, args), "--log_dir", str(tmp_path / "killed")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    try:
        wait_for(lambda: (tmp_path / "killed" / "model_00010.pt").exists(), 600, "step-10 checkpoint")
        rank1, = (pid for pid in children(launcher)
                  if "RANK=1" in open(f"/proc/{pid}/environ").read().split("\0"))
        os.kill(rank1, signal.SIGKILL)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            for pid in children(launcher):
                os.kill(pid, signal.SIGKILL)
            launcher.kill()
    assert launcher.returncode == 0, err[-3000:]
    assert re.search(r"resuming from .*model_000[1-9]0.pt at step [1-9]0\n", out), out[-3000:]
    assert read_log(tmp_path / "full") == read_log(tmp_path / "killed")  # every value, not the clock's times
    log = (tmp_path / "killed" / "log.txt").read_text().splitlines()
    assert sum(line.startswith("# ") for line in log) == 2  # the two attempts' records
    a = torch.load(tmp_path / "full" / "model_00100.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "model_00100.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_restarts_sharing_its_store_are_refused_with_the_fix(capsys, data, tmp_path, monkeypatch):
    """torchrun --max-restarts, with its default store shared by every attempt: restarted ranks would read
    the previous attempt's addresses and fail to connect, so the run is refused up front."""
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_MAX_RESTARTS": "1",
                 "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(k, v)
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, *TINY)
    assert code == 1 and err.count("\n") == 1 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in err


def test_diverged_run_stops_without_touching_the_good_checkpoint(data, tmp_path):
    train(data, tmp_path, "--max_steps", 4, "--ckpt_interval", 2)
    good = (tmp_path / "model_00004.pt").read_bytes()
    # An absurd learning rate blows the weights up to inf on the first resumed update.
    proc = resume(tmp_path, "--max_steps", 8, "--max_lr", 1e30, "--min_lr", 0, "--ckpt_interval", 1,
                  "--eval_interval", 1, check=False)
    assert proc.returncode == 1
    assert "diverged" in proc.stderr and "model_00004.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert (sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt"))
            == ["model_00002.pt", "model_00004.pt"])
    assert (tmp_path / "model_00004.pt").read_bytes() == good


def test_resume_errors(capsys, data, tmp_path):
    base = ["--data_dir", data, "--log_dir", tmp_path]
    code, err = run_main(capsys, *base, "--init_from", "resume")
    assert code == 1 and "no model_NNNNN.pt checkpoint" in err

    train(data, tmp_path, "--max_steps", 2)
    code, err = run_main(capsys, *base, "--init_from", "resume", "--n_layer", 4)
    assert code == 1 and "--n_layer 4 contradicts" in err and "n_layer 2" in err

    code, err = run_main(capsys, *base, *map(str, TINY), "--max_steps", 2)
    assert code == 1 and "already holds checkpoints" in err and "--init_from resume" in err

    code, err = run_main(capsys, *base, "--init_from", "resume", "--optimizer", "muon")  # not a fresh Muon
    path = tmp_path / "model_00002.pt"
    assert code == 1 and err == f"train_gpt2.py: error: --optimizer muon: {path} holds the state of " \
                                f"--optimizer adamw; resume with that, or start a new run\n"

    path.write_bytes(path.read_bytes()[:5000])  # truncated, as by a full disk
    code, err = run_main(capsys, *base, "--init_from", "resume")
    assert code == 1 and str(path) in err and "corrupt or truncated" in err
    assert err.strip().count("\n") == 0


def test_muon_with_activation_checkpointing_and_what_muon_refuses(capsys, data, tmp_path):
    """--optimizer muon with --activation_checkpointing 1 (which recomputes the model's forward in backward,
    unseen by the optimizers, as --compile's graphs are) trains as without; one line each for an unknown
    --optimizer, for muon with --fsdp 1 (Muon orthogonalizes whole matrices, FSDP shards them), and for
    resuming a muon checkpoint as adamw (a fresh AdamW for the matrices, silently)."""
    muon = ["--optimizer", "muon", "--max_steps", 3]
    train(data, tmp_path / "plain", *muon)
    train(data, tmp_path / "recomputed", *muon, "--activation_checkpointing", 1)
    assert read_log(tmp_path / "recomputed") == read_log(tmp_path / "plain")

    base = ["--data_dir", data, "--log_dir", tmp_path / "new", *map(str, TINY)]
    code, err = run_main(capsys, *base, "--optimizer", "sgd")
    assert code == 1 and err == "train_gpt2.py: error: --optimizer sgd: expected adamw or muon\n"
    code, err = run_main(capsys, *base, "--optimizer", "muon", "--fsdp", 1)
    assert code == 1 and err == "train_gpt2.py: error: --optimizer muon: Muon orthogonalizes whole " \
                                "matrices, which --fsdp 1 shards over the ranks; with muon use DDP " \
                                "(--fsdp 0)\n"
    code, err = run_main(capsys, "--log_dir", tmp_path / "plain", "--init_from", "resume", "--max_steps", 4,
                         "--optimizer", "adamw")
    path = tmp_path / "plain" / "model_00003.pt"
    assert code == 1 and err == f"train_gpt2.py: error: --optimizer adamw: {path} holds the state of " \
                                f"--optimizer muon; resume with that, or start a new run\n"


def test_a_log_dir_in_use_is_refused_at_once_and_free_once_its_run_is_killed(capsys, data, tmp_path):
    """Two runs on one log_dir would interleave their log lines and checkpoints. While a run holds it (here a
    process holding it as a run does), a new run and a resume stop before touching it; killed (SIGKILL: no
    clean-up runs), its run leaves no stale lock."""
    for args in ([*TINY, "--max_steps", 2], ["--init_from", "resume", "--max_steps", 3]):  # new, then resumed
        with folder_in_use(tmp_path) as holder:
            before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n != ".lock"}
            code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, *map(str, args))
            assert code == 1 and err == f"train_gpt2.py: error: --log_dir {tmp_path}: in use by another " \
                f"run (pid {holder.pid} on host {socket.gethostname()}); wait for it to end or pick " \
                f"another --log_dir\n"
            assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n != ".lock"} == before
            holder.kill()
            holder.wait()
            run_train("--data_dir", data, "--log_dir", tmp_path, *args)
    assert sorted(read_log(tmp_path)["train"]) == [0, 1, 2]


def test_a_new_run_keeps_an_earlier_runs_log(capsys, data, tmp_path):
    """A log_dir holding log.txt or samples.txt but no checkpoint (a run stopped before its first one): a new
    run would have overwritten its log.txt, silently."""
    for name in ("log.txt", "samples.txt"):
        log_dir = tmp_path / name
        log_dir.mkdir()
        (log_dir / name).write_text("0 train 5.5\n")
        code, err = run_main(capsys, "--data_dir", data, "--log_dir", log_dir, *map(str, TINY),
                             "--max_steps", 2)
        assert code == 1 and err == f"train_gpt2.py: error: {log_dir}/ already holds the {name} of an " \
                                    f"earlier run, without a checkpoint to resume: move it away, or pick a " \
                                    f"new --log_dir\n"
        assert (log_dir / name).read_text() == "0 train 5.5\n"


@pytest.mark.parametrize("name", ["log.txt", "samples.txt", "loss.png"])
def test_an_output_path_that_is_a_folder_is_refused_at_start_up(capsys, data, tmp_path, name):
    """Before, a folder named samples.txt was a traceback at the first sample, after training, with no
    checkpoint."""
    (tmp_path / name).mkdir()
    for args in ([], ["--init_from", "gpt2"]):
        code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, *map(str, TINY),
                             "--max_steps", 2, *args)
        assert code == 1 and err == f"train_gpt2.py: error: --log_dir {tmp_path}: {tmp_path / name} is not " \
                                    f"a file, and this run writes there; move it away or pick another " \
                                    f"--log_dir\n"


@pytest.mark.parametrize("seed", ["-5", str(2**64)])
def test_a_seed_torch_or_numpy_cannot_take_is_one_line(capsys, data, tmp_path, seed):
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, *map(str, TINY), "--seed", seed,
                         "--shuffle", 1, "--max_steps", 2)
    assert code == 1 and err == f"train_gpt2.py: error: --seed {seed}: must be in [0, 2**64), as torch and " \
                                f"numpy need\n"


# --- faults and bad input: nothing lost, nothing silent --------------------------------------------------


def test_resume_keeps_every_well_formed_log_line(data, tmp_path, capsys):
    """A torn line (a crash mid-write) or bytes that are not text in log.txt: resume drops just those, with a
    note, and keeps every other line; before, it crashed after reopening the log and lost the rest."""
    train(data, tmp_path, "--max_steps", 4, "--ckpt_interval", 4)
    log_file = tmp_path / "log.txt"
    good = log_file.read_bytes().splitlines(keepends=True)
    log_file.write_bytes(b"".join(good[:3]) + b"1 tra\n" + b"\xff\xfe 2 val\n" + b"".join(good[3:]))
    proc = resume(tmp_path, "--max_steps", 6)
    assert "dropped 2 damaged line(s) (line 4, 5)" in proc.stdout
    after = log_file.read_bytes().splitlines(keepends=True)
    assert after[:len(good)] == good and len(after) > len(good)
    assert not (tmp_path / "log.txt.tmp").exists()


@ci_only
def test_disk_full_while_checkpointing_loses_nothing(data, tmp_path):
    """On a disk with room for one checkpoint, not two: the step-4 checkpoint fails as one line, its .tmp
    is removed, step 2's is untouched; freed, the resumed run ends as an uninterrupted one. Before, a
    torch traceback and a multi-MB .tmp were left."""
    args = [sys.executable, os.path.join(REPO, "train_gpt2.py"), "--data_dir", data, *TINY, "--max_steps", 4,
            "--ckpt_interval", 2, "--plot", 0]
    train(data, tmp_path / "full", "--max_steps", 4, "--ckpt_interval", 2, "--plot", 0)
    size = os.path.getsize(tmp_path / "full" / "model_00002.pt")
    disk = tmp_path / "disk"
    full, resumed = on_small_disk(disk, "8m", [
        ("fill", size * 3 // 2), ("run", args + ["--log_dir", disk / "log"]), ("free",),
        ("run", [sys.executable, os.path.join(REPO, "train_gpt2.py"), "--log_dir", disk / "log",
                 "--init_from", "resume"]), ("save", tmp_path / "saved")])
    assert full["returncode"] == 1, full["stderr"][-3000:]
    assert full["stderr"] == f"train_gpt2.py: error: disk full in {disk / 'log'}: model_00004.pt was not " \
                             f"written and the checkpoints before it are untouched; free space, then " \
                             f"continue with --init_from resume\n"
    assert full["files"] == ["log/.lock", "log/log.txt", "log/model_00002.pt"]
    assert resumed["returncode"] == 0, resumed["stderr"][-3000:]
    assert read_log(tmp_path / "saved" / "log") == read_log(tmp_path / "full")
    a = torch.load(tmp_path / "full" / "model_00004.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "saved" / "log" / "model_00004.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_log_dir_that_cannot_be_a_folder_is_one_line(capsys, data, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    for log_dir, why in [(tmp_path / "afile", "File exists"),
                         (tmp_path / "afile" / "run", "Not a directory")]:
        code, err = run_main(capsys, "--data_dir", data, "--log_dir", log_dir, *map(str, TINY),
                             "--max_steps", 1)
        assert code == 1 and err == f"train_gpt2.py: error: --log_dir {log_dir}: cannot make that folder " \
                                    f"({why}); pick another --log_dir\n"
        assert err.count("\n") == 1


def test_read_only_log_dir_is_one_line_for_a_new_run_and_a_resume(data, tmp_path):
    disk = tmp_path / "disk"
    script = [sys.executable, os.path.join(REPO, "train_gpt2.py")]
    args = script + ["--data_dir", data, *TINY, "--max_steps", 2, "--plot", 0]
    first, resumed, fresh = on_small_disk(disk, "8m", [
        ("run", args + ["--log_dir", disk / "log"]), ("readonly",),
        ("run", script + ["--log_dir", disk / "log", "--init_from", "resume", "--max_steps", 4]),
        ("run", args + ["--log_dir", disk / "new"])])
    assert first["returncode"] == 0, first["stderr"][-3000:]
    for proc, log_dir, what in ((resumed, disk / "log", "write in"), (fresh, disk / "new", "make")):
        assert proc["returncode"] == 1 and proc["stderr"] == f"train_gpt2.py: error: --log_dir {log_dir}: " \
            f"cannot {what} that folder (Read-only file system); pick another --log_dir\n"
    assert resumed["files"] == first["files"] == ["log/.lock", "log/log.txt", "log/model_00002.pt",
                                                        "log/report.md"]


def test_unfinished_data_preparation_is_refused(capsys, data, tmp_path):
    """fineweb.py killed partway leaves shards and a manifest.json saying done: false; training on them
    would silently train on part of the corpus."""
    import shutil
    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "data" / "manifest.json").write_text('{"shards": [], "done": false}')
    code, err = run_main(capsys, "--data_dir", tmp_path / "data", "--log_dir", tmp_path / "log",
                         *map(str, TINY))
    assert (code == 1 and "fineweb.py has not finished writing it" in err
            and "rerun the same fineweb.py" in err)
    shards = [{"name": n, "split": n.split("_")[1], "bytes": os.path.getsize(tmp_path / "data" / n)}
              for n in sorted(os.listdir(data))]
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"shards": shards, "done": True}))
    finished = train(tmp_path / "data", tmp_path / "log", "--max_steps", 1)
    assert finished.returncode == 0 and (tmp_path / "log" / "model_00001.pt").exists()


def test_resume_to_fewer_steps_than_the_checkpoint_is_an_error(capsys, data, tmp_path):
    train(data, tmp_path, "--max_steps", 4)
    code, err = run_main(capsys, "--log_dir", tmp_path, "--init_from", "resume", "--max_steps", 2)
    assert code == 1 and "--max_steps 2:" in err and "at step 4 already" in err


def test_val_tokens_past_the_val_split_are_capped_with_a_note(data, tmp_path):
    """The val shard (4000 tokens) holds 124 sequences of 32: asking for 6400 tokens measures those 3968
    (before, asking for more micro-batches than it held re-read some of them)."""
    proc = train(data, tmp_path, "--max_steps", 1, "--val_steps", 0, "--val_tokens", 6400)  # TINY's is 2
    assert proc.stdout.count("val loss: 3,968 tokens (124 sequences of 32) at every eval, split over the "
                             "ranks, all the val split holds of --val_tokens 6,400\n") == 1
    capped = read_log(tmp_path)["val"][0]
    train(data, tmp_path / "all", "--max_steps", 1, "--val_steps", 0, "--val_tokens", 3968)
    assert read_log(tmp_path / "all")["val"][0] == capped


def test_checkpoint_holding_pickled_objects_is_refused_unloaded(capsys, data, tmp_path):
    """Said to be so, not called corrupt or truncated."""
    train(data, tmp_path, "--max_steps", 2)
    ckpt = torch.load(tmp_path / "model_00002.pt", weights_only=True)
    ckpt["config"] = TrainConfig()  # an object, pickled as code that loading would run
    torch.save(ckpt, tmp_path / "model_00002.pt")
    code, err = run_main(capsys, "--log_dir", tmp_path, "--init_from", "resume")
    assert code == 1 and "holds objects that are not plain tensors and data (train_gpt2.TrainConfig)" in err
    assert "corrupt" not in err


@pytest.fixture(scope="module")
def broken_hf_folders(tmp_path_factory):
    """A GPT-2 folder whose model.safetensors lacks block 1's tensors, and a (tied-embedding) Llama folder."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("broken_hf")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2,
                               n_head=4)).save_pretrained(root / "gpt2")
    weights = load_file(root / "gpt2" / "model.safetensors")
    save_file({k: w for k, w in weights.items() if ".h.1." not in k}, root / "gpt2" / "model.safetensors",
              metadata={"format": "pt"})
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
                     ).save_pretrained(root / "llama")
    return root


@pytest.mark.parametrize("folder, says", [("gpt2", "not a complete GPT-2 checkpoint: 12 missing keys"),
                                          ("llama", "a llama model, not GPT-2")])
def test_fine_tune_from_an_incomplete_or_foreign_folder_is_refused(capsys, data, tmp_path, broken_hf_folders,
                                                                   folder, says):
    """transformers fills what it cannot load with random tensors and says so in a table: training on would be
    a "fine-tune" of partly random weights, exit 0."""
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, "--seq_len", 32,
                         "--micro_batch_size", 4, "--total_batch_size", 256, "--init_from",
                         broken_hf_folders / folder)
    last = err.splitlines()[-1]  # after transformers' "Loading weights" progress bar
    assert code == 1 and last.startswith("train_gpt2.py: error: --init_from ") and says in last, err
    assert "MISSING" not in err and "Traceback" not in err and not (tmp_path / "log.txt").exists()


# --- in-training HellaSwag and samples -----------------------------------------------------------------

HELLA = ["--n_layer", 1, "--n_head", 2, "--n_embd", 32, "--vocab_size", 50304, "--block_size", 256,
         "--seq_len", 32, "--micro_batch_size", 8, "--total_batch_size", 256, "--max_steps", 4,
         "--eval_interval", 2, "--val_steps", 2, "--hellaswag", 1, "--hellaswag_limit", 40,
         "--sample_interval", 2]


def hellaswag_dir():
    return HELLASWAG_EXCERPT


def test_in_training_hellaswag_and_samples(shakespeare_shards, tmp_path):
    """Every eval logs `{step} hella {acc_norm}`: the acc_norm hellaswag.py gives the same weights; every
    sample_interval steps 4 samples of the default prompt go to samples.txt."""
    from hellaswag import iterate_examples, score
    run_train("--data_dir", shakespeare_shards, "--log_dir", tmp_path, *HELLA, "--hellaswag_dir",
              hellaswag_dir())
    log = read_log(tmp_path)
    assert sorted(log["hella"]) == [0, 2, 4]
    ckpt = torch.load(tmp_path / "model_00004.pt", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    examples = list(iterate_examples("val", hellaswag_dir()))[:40]
    correct, correct_norm, n = score(model, examples, gpt2_tokenizer())
    assert n == 40 and log["hella"][4] == pytest.approx(correct_norm / n, abs=1e-4)
    assert ckpt["hellaswag"] == log["hella"][4] and ckpt["val_loss"] == pytest.approx(log["val"][4], abs=1e-4)
    lines = (tmp_path / "samples.txt").read_text().splitlines()
    assert [ln.split(" sample ")[0] for ln in lines] == ["2"] * 4 + ["4"] * 4
    assert all("Hello, I'm a language model," in ln for ln in lines)


def test_hellaswag_on_a_vocabulary_smaller_than_gpt2s_is_a_one_line_error(capsys, data, tmp_path):
    """HellaSwag's examples are GPT-2 tokens, which a 256-token model cannot look up: one line, before
    any step (the model does not check its ids on every forward)."""
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, *TINY, "--hellaswag", 1,
                         "--hellaswag_dir", hellaswag_dir(), "--hellaswag_limit", 4, "--plot", 0)
    assert code == 1 and err == "train_gpt2.py: error: --hellaswag: the model: its vocabulary has 256 " \
                                "tokens, fewer than GPT-2's 50257, so it cannot read GPT-2 tokens (it was " \
                                "trained with a smaller --vocab_size)\n"


def test_an_empty_hellaswag_file_is_a_one_line_error_before_any_step(capsys, shakespeare_shards, tmp_path):
    """No task to score: one line naming the file, not a division by zero at the first eval, and no log.txt
    left behind (a new run refuses an earlier run's log)."""
    (tmp_path / "hella").mkdir()
    (tmp_path / "hella" / "hellaswag_val.jsonl").write_text("\n")
    code, err = run_main(capsys, "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "run", *HELLA,
                         "--hellaswag_dir", tmp_path / "hella", "--plot", 0)
    assert code == 1 and err == f"train_gpt2.py: error: --hellaswag: {tmp_path}/hella/hellaswag_val.jsonl: " \
                                "holds no tasks\n"
    assert not (tmp_path / "run" / "log.txt").exists()  # the corrected command runs in the same --log_dir


def test_run_as_a_script_never_loads_a_second_train_gpt2(shakespeare_shards, tmp_path):
    """`python train_gpt2.py` runs as __main__; with samples, HellaSwag and plots on, the modules it imports
    for them (hellaswag, checkpoints, plot, fineweb, common) must not import `train_gpt2` back, which would
    load the whole script a second time with its own classes (TrainConfig, GPT); hellaswag.py imports it
    only inside main(), which this run never calls. `-X importtime` lists every module a process imports."""
    args = ["--data_dir", shakespeare_shards, "--log_dir", tmp_path, *HELLA, "--max_steps", 2,
            "--hellaswag_limit", 8, "--hellaswag_dir", hellaswag_dir(), "--plot", 1]
    proc = subprocess.run([sys.executable, "-X", "importtime", "train_gpt2.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", proc.stderr, re.M)
    assert {"hellaswag", "checkpoints", "plot", "fineweb", "common"} <= set(imported)
    assert "train_gpt2" not in imported
    assert ((tmp_path / "samples.txt").exists() and (tmp_path / "loss.png").exists()
            and read_log(tmp_path)["hella"])


def test_context_shorter_than_the_sample_prompt_skips_the_samples_with_a_note(shakespeare_shards, tmp_path):
    """The samples' prompt is 8 tokens: a 4-token context cannot hold it. The run says so once and trains on
    to its checkpoint, rather than failing at the first sample_interval."""
    proc = run_train("--data_dir", shakespeare_shards, "--log_dir", tmp_path, "--n_layer", 1, "--n_head", 2,
                     "--n_embd", 32, "--block_size", 4, "--seq_len", 4, "--micro_batch_size", 4,
                     "--total_batch_size", 16, "--max_steps", 3, "--warmup_steps", 1, "--eval_interval", 2,
                     "--val_steps", 1, "--sample_interval", 2)
    assert proc.stdout.count("note: no samples: their prompt has 8 tokens and the model's context "
                             "(block_size) 4") == 1
    assert not (tmp_path / "samples.txt").exists() and (tmp_path / "model_00003.pt").exists()


@pytest.mark.slow
@ci_only
def test_in_training_hellaswag_splits_examples_across_ranks(shakespeare_shards, tmp_path):
    """2 ranks score 20 examples each and all-reduce the counts: the acc_norm of 1 process."""
    args = ["--data_dir", shakespeare_shards, *HELLA, "--hellaswag_dir", hellaswag_dir(),
            "--sample_interval", 0, "--total_batch_size", 512]
    run_train("--log_dir", tmp_path / "ddp", *args, nproc=2)
    run_train("--log_dir", tmp_path / "single", *args)
    assert read_log(tmp_path / "ddp")["hella"][0] == read_log(tmp_path / "single")["hella"][0]


@pytest.mark.slow
@ci_only
def test_compiled_run_trains_like_eager_and_its_evals_do_not_recompile(shakespeare_shards, tmp_path):
    """--compile 1 (on by default on CUDA) gives the train, val and HellaSwag numbers of eager mode, here on
    CPU. The first evaluations and the first train step compile; the later val, HellaSwag and train steps
    reuse those graphs (TORCH_LOGS=recompiles reports any recompilation). One test, so one compilation."""
    args = ["--data_dir", shakespeare_shards, *HELLA, "--hellaswag_dir", hellaswag_dir(),
            "--sample_interval", 0, "--max_steps", 6]
    proc = run_train("--log_dir", tmp_path / "compiled", *args, "--compile", 1,
                     env={**os.environ, "TORCH_LOGS": "recompiles"}, merge_stderr=True)
    out = proc.stdout
    after_first_step = out[out.index("step     1 | loss"):]
    assert "Recompiling" not in after_first_step, after_first_step
    run_train("--log_dir", tmp_path / "eager", *args, "--compile", 0)
    compiled, eager = read_log(tmp_path / "compiled"), read_log(tmp_path / "eager")
    assert sorted(compiled["hella"]) == [0, 2, 4, 6]
    for kind in ("train", "val", "hella"):
        assert compiled[kind] == pytest.approx(eager[kind], abs=1e-4), kind


# --- loss.png and Weights & Biases ---------------------------------------------------------------------


def test_loss_png_is_redrawn_at_every_eval(data, tmp_path):
    """log_dir/loss.png is drawn at every eval from log.txt: after the run it shows the whole run."""
    pytest.importorskip("matplotlib", reason="plots are optional; pip install matplotlib to test them")
    from plot import plot_log
    train(data, tmp_path, "--max_steps", 8)
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    plot_log(tmp_path / "log.txt", tmp_path / "again.png")  # the same log drawn on demand: the same picture
    assert png == (tmp_path / "again.png").read_bytes()


def test_without_matplotlib_training_goes_on_and_says_so_once(data, tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    proc = train(data, tmp_path / "log", "--max_steps", 8, env={**os.environ, "PYTHONPATH": str(shim.parent)})
    assert proc.stdout.count("matplotlib is not installed, so no loss.png: pip install matplotlib") == 1
    assert (sorted(read_log(tmp_path / "log")["val"]) == [0, 4, 8]
            and not (tmp_path / "log" / "loss.png").exists())


# --- Weights & Biases -----------------------------------------------------------------------------------


@ci_only
def test_wandb_logs_the_run_and_a_resume_continues_it(data, tmp_path):
    """--wandb 1 in W&B's offline mode: the run summary W&B prints holds the last train and val losses of
    log.txt, and a resumed run continues the same W&B run (its id is kept in the checkpoint)."""
    pytest.importorskip("wandb", reason="wandb is optional (not in requirements.txt); "
                                        "pip install wandb to test it")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "false"}
    proc = train(data, tmp_path, "--max_steps", 4, "--wandb", 1, "--wandb_run_name", "tiny", env=env,
                 merge_stderr=True)
    log = read_log(tmp_path)
    summary = dict(re.findall(r"^wandb:\s+(\w+) ([\d.e+-]+)$", proc.stdout.split("Run summary:")[1], re.M))
    assert float(summary["val"]) == pytest.approx(log["val"][4], abs=1e-4)
    assert float(summary["train"]) == pytest.approx(log["train"][3], abs=1e-4)
    assert {"lr", "grad_norm", "tokens_per_sec"} <= set(summary)
    run_id = torch.load(tmp_path / "model_00004.pt", weights_only=True)["wandb_id"]
    resume(tmp_path, "--max_steps", 6, env=env, merge_stderr=True)
    runs = sorted(os.listdir(tmp_path / "wandb"))
    assert [r.rsplit("-", 1)[1] for r in runs if r.startswith("offline-run-")] == [run_id, run_id]


def test_wandb_missing_is_a_one_line_error(capsys, data, tmp_path, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, *TINY, "--wandb", 1)
    # echoed as typed (issue 12: it said `--wandb True`)
    assert code == 1 and err == "train_gpt2.py: error: --wandb 1: wandb is not installed: " \
                                "pip install wandb, or drop the flag\n"


# --- fine-tuning and the end-to-end run on real text ----------------------------------------------------


def test_finetune_from_hugging_face_folder(shakespeare_shards, hf_folder, tmp_path):
    from transformers import GPT2LMHeadModel
    train_args = ["--data_dir", shakespeare_shards, "--log_dir", tmp_path, "--init_from", hf_folder,
                  "--micro_batch_size", 4, "--seq_len", 64, "--total_batch_size", 256, "--max_steps", 3,
                  "--warmup_steps", 1, "--max_lr", 1e-4, "--min_lr", 1e-5, "--eval_interval", 3,
                  "--val_steps", 2]
    run_train(*train_args)
    ckpt = torch.load(tmp_path / "model_00003.pt", weights_only=True)
    assert ckpt["model_config"] == {"block_size": 64, "vocab_size": 50257, "n_layer": 2, "n_head": 4,
                                    "n_embd": 32}
    # The step-0 val loss is the Hugging Face model's own loss on the same two val micro-batches.
    hf = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    val = np.load(shakespeare_shards / "shakespeare_val_000000.npy").astype(np.int64)
    with torch.no_grad():
        losses = []
        for i in range(2):
            x, y = (torch.from_numpy(val[i * 256 + j: (i + 1) * 256 + j]) for j in (0, 1))
            logits = hf(x.view(4, 64)).logits
            losses.append(torch.nn.functional.cross_entropy(logits.view(-1, 50257), y).item())
        expected = sum(losses) / 2
    assert read_log(tmp_path)["val"][0] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
@ci_only
def test_end_to_end_on_tiny_shakespeare(shakespeare_shards, tmp_path):
    """Train a small GPT from scratch on Tiny Shakespeare for a few hundred CPU steps: val loss starts at
    ln(50257) ~ 10.8 and must fall far below it."""
    proc = run_train("--data_dir", shakespeare_shards, "--log_dir", tmp_path, "--n_layer", 2, "--n_head", 4,
                     "--n_embd", 64, "--block_size", 64, "--seq_len", 64, "--micro_batch_size", 8,
                     "--total_batch_size", 512, "--max_steps", 300, "--warmup_steps", 20, "--max_lr", 3e-3,
                     "--min_lr", 3e-4, "--eval_interval", 100, "--val_steps", 8)
    val = read_log(tmp_path)["val"]
    assert val[0] == pytest.approx(math.log(50257), abs=0.3)
    assert val[100] > val[300] and val[300] < 6.6, proc.stdout[-2000:]
