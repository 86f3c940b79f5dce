"""--fsdp 1 (FSDP2 over 2 gloo ranks on CPU) and --activation_checkpointing 1: the same training as one
process, checkpoints in the one format every script reads (resumed with or without FSDP, exported),
evaluations and samples under FSDP, and the memory lines at start-up."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import HELLASWAG_EXCERPT, REPO, ci_only, read_log, run_train
from checkpoints import load_checkpoint
from common import gpt2_tokenizer
from test_train import HELLA, TINY, data, resume, run_main, train  # noqa: F401 (data: the fixture)
from train_gpt2 import GPT, GPTConfig, SAMPLE_PROMPT, model_from_checkpoint

# 2 ranks x 2 micro-batches = 1 process x 4; a clip below the norms (~0.8-1.0), so clipping over the
# sharded gradients changes every step.
COMMON = ["--max_steps", 6, "--ckpt_interval", 3, "--micro_batch_size", 2, "--total_batch_size", 256,
          "--grad_clip", 0.5, "--plot", 0]
TOL = 2e-4


def assert_same_losses(a, b, steps):
    for step in steps:
        assert a["train"][step] == pytest.approx(b["train"][step], abs=TOL), step


def memory_line(stdout):
    """The start-up line's weights, gradients and AdamW state, in bytes, and how it says they are held."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("memory per rank: "))
    units = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    sizes = [float(n) * units[u] for n, u in re.findall(r"([\d.]+) (bytes|kB|MB|GB)", line)]
    return sizes, line.split(", ")[-2]


# train_gpt2.main() on every rank, each recording the parameters it makes in memory (not on the meta device)
# before its training loop starts (in the loop FSDP all-gathers each block's whole parameters, for a moment),
# as (numel of the whole parameter, numel this rank holds), and how it torch.loads files, in
# probe_rank<RANK>.json
PROBE = r"""
import json, os, sys
import torch
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[1])
import train_gpt2
made, loads = [], []
make_parameter, load = torch.nn.Parameter.__new__, torch.load
def parameter(cls, data=None, requires_grad=True):
    p = make_parameter(cls, data, requires_grad)
    mine = p.to_local() if isinstance(p, DTensor) else p
    if not mine.is_meta and made is not None:
        made.append([p.numel(), mine.numel()])
    return p
def loop_starts(self, enter=train_gpt2.StopRequest.__enter__):
    global made, probe
    probe, made = made, None
    return enter(self)
train_gpt2.StopRequest.__enter__ = loop_starts
def load_probed(f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)):  # a file (broadcast_object_list's unpickling loads from memory)
        loads.append(kwargs.get("mmap", False))
    return load(f, *args, **kwargs)
torch.nn.Parameter.__new__, torch.load = staticmethod(parameter), load_probed
try:
    train_gpt2.main(sys.argv[3:])
finally:
    with open(os.path.join(sys.argv[2], f"probe_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"made": probe, "mmap": loads}, f)
"""


def probed_train(probe_dir, *args, nproc=2):
    """train_gpt2.py's flags under torchrun, through PROBE: (stdout, the probe of each rank)."""
    os.makedirs(probe_dir, exist_ok=True)
    (probe_dir / "probe.py").write_text(PROBE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", probe_dir / "probe.py", REPO, probe_dir,
                           *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, [json.loads((probe_dir / f"probe_rank{r}.json").read_text()) for r in range(nproc)]


def assert_read_once(probes):
    """Rank 0 made the whole model (scratch, GPT-2 weights or a checkpoint's); rank 1 never made a
    parameter whole, only its shards (under half of each parameter, padding aside), and loaded a checkpoint,
    if any, only memory-mapped (its pages shared with rank 0's, not copied)."""
    reader, other = probes
    assert any(whole == mine for whole, mine in reader["made"])
    assert other["made"] and all(mine < whole for whole, mine in other["made"]), other["made"]
    assert all(mmap for probe in probes for mmap in probe["mmap"])


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The same 6 steps as 2 FSDP ranks (probed) and as 1 process, checkpoints at steps 3 and 6:
    (root, stdouts, the FSDP ranks' probes)."""
    root = tmp_path_factory.mktemp("fsdp")
    fsdp, probes = probed_train(root / "probe", "--data_dir", data, "--log_dir", root / "fsdp", *TINY,
                                *COMMON, "--fsdp", 1)
    single = train(data, root / "single", *COMMON)
    return root, fsdp, single.stdout, probes


@pytest.mark.slow
def test_two_fsdp_ranks_equal_one_process(runs):
    root, *_ = runs
    fsdp, single = read_log(root / "fsdp"), read_log(root / "single")
    assert sorted(fsdp["train"]) == list(range(6))
    assert_same_losses(fsdp, single, range(6))
    a, b = (torch.load(root / run / "model_00006.pt", weights_only=True) for run in ("fsdp", "single"))
    assert a["loader_position"] == b["loader_position"] == [0, 0, 24 * 64]  # 24 micro-batches of 2x32 read
    assert set(a["model"]) == set(b["model"])
    for ckpt in (a, b):  # the tied wte/lm_head weight saved once, as one tensor
        weights = ckpt["model"]
        assert weights["lm_head.weight"].data_ptr() == weights["transformer.wte.weight"].data_ptr()
    for k in a["model"]:  # gathered whole onto rank 0, tied wte/lm_head included
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
    # The optimizer state by parameter name (get_optimizer_state_dict's format), whichever way it was written.
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert len(b["optimizer"]["state"]) == 28 and set(b["optimizer"]["state"]) <= set(b["model"])
    for i, state in b["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["optimizer"]["state"][i][k], state[k], atol=1e-6, rtol=1e-3)


@pytest.mark.slow
def test_only_rank_0_builds_the_model_whole_from_scratch_a_checkpoint_or_gpt2_weights(runs, data, hf_folder,
                                                                                      tmp_path):
    """Every other rank builds it on the meta device and is sent its shards: from scratch (the runs above),
    resuming the FSDP run's step-3 checkpoint (the uninterrupted run's losses again), and from GPT-2 weights
    (the losses of one process fine-tuning them); a folder that is not GPT-2 is one line from rank 0."""
    root, _, _, probes = runs
    assert_read_once(probes)
    shutil.copytree(root / "fsdp", tmp_path / "run")
    os.remove(tmp_path / "run" / "model_00006.pt")
    out, probes = probed_train(tmp_path / "probe_resume", "--log_dir", tmp_path / "run", "--init_from",
                               "resume")
    assert "model_00003.pt at step 3" in out
    assert_same_losses(read_log(tmp_path / "run"), read_log(root / "single"), range(3, 6))
    assert_read_once(probes)

    gpt2 = ["--data_dir", data, "--init_from", hf_folder, "--seq_len", 32, "--micro_batch_size", 2,
            "--total_batch_size", 256, "--max_steps", 4, "--warmup_steps", 2, "--max_lr", 3e-3,
            "--val_steps", 2, "--grad_clip", 0.5, "--sample_interval", 0, "--plot", 0]
    out, probes = probed_train(tmp_path / "probe_hf", *gpt2, "--log_dir", tmp_path / "hf_fsdp", "--fsdp", 1)
    assert "sharded over 2 ranks" in out
    assert_read_once(probes)
    run_train(*gpt2, "--log_dir", tmp_path / "hf_single")
    assert_same_losses(read_log(tmp_path / "hf_fsdp"), read_log(tmp_path / "hf_single"), range(4))

    (tmp_path / "not_gpt2").mkdir()
    (tmp_path / "not_gpt2" / "config.json").write_text('{"model_type": "llama"}')
    proc = run_train(*gpt2[:2], "--init_from", tmp_path / "not_gpt2", "--log_dir", tmp_path / "x",
                     "--fsdp", 1, nproc=2, check=False)
    assert proc.returncode != 0 and proc.stderr.count("train_gpt2.py: error: --init_from ") == 1, proc.stderr
    assert "a llama model, not GPT-2" in proc.stderr


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process_and_exports(runs, tmp_path):
    """The 2-rank FSDP run's step-3 checkpoint, resumed by one process without FSDP: the uninterrupted
    run's losses; its final checkpoint exports to a folder transformers loads with our logits."""
    from transformers import GPT2LMHeadModel
    from export import main as export_main
    root, *_ = runs
    shutil.copytree(root / "fsdp", tmp_path / "run")
    os.remove(tmp_path / "run" / "model_00006.pt")
    proc = resume(tmp_path / "run", "--fsdp", 0)
    assert "model_00003.pt at step 3" in proc.stdout and "a full copy on every rank" in proc.stdout
    assert_same_losses(read_log(tmp_path / "run"), read_log(root / "single"), range(3, 6))

    export_main(["--checkpoint", str(root / "fsdp" / "model_00006.pt"), "--out_dir", str(tmp_path / "hf")])
    ours = model_from_checkpoint(load_checkpoint(root / "fsdp" / "model_00006.pt")).eval()
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-4


@pytest.mark.slow
@ci_only
def test_plain_checkpoint_resumes_under_fsdp_with_activation_checkpointing_and_compile(runs, tmp_path):
    """The 1-process run's step-3 checkpoint, resumed on 2 FSDP ranks recomputing every block in backward,
    each block compiled (as --compile 1 does under FSDP): the uninterrupted eager run's losses."""
    root, *_ = runs
    shutil.copytree(root / "single", tmp_path / "run")
    os.remove(tmp_path / "run" / "model_00006.pt")
    proc = resume(tmp_path / "run", "--fsdp", 1, "--activation_checkpointing", 1, "--compile", 1, nproc=2)
    assert "model_00003.pt at step 3" in proc.stdout and "sharded over 2 ranks" in proc.stdout
    assert "compile on" in proc.stdout
    assert_same_losses(read_log(tmp_path / "run"), read_log(root / "single"), range(3, 6))


@pytest.mark.slow
def test_memory_lines_count_the_state_per_rank(runs):
    """Weights and gradients 4 bytes per parameter, AdamW 8; under FSDP each of 2 ranks holds half."""
    _, fsdp_out, single_out, _ = runs
    n = int(re.search(r"^([\d,]+) parameters \|", single_out, re.M)[1].replace(",", ""))
    (weights, grads, adamw, total), how = memory_line(single_out)
    assert how == "a full copy on every rank"
    assert weights == grads == pytest.approx(4 * n, rel=5e-3) and adamw == pytest.approx(8 * n, rel=5e-3)
    assert total == pytest.approx(16 * n, rel=5e-3)
    sharded, how = memory_line(fsdp_out)
    assert how == "sharded over 2 ranks"
    for per_rank, whole in zip(sharded, (weights, grads, adamw, total)):
        assert per_rank == pytest.approx(whole / 2, rel=0.02)
    for out in (fsdp_out, single_out):
        peak = re.search(r"^peak memory after the first step: ([\d.]+) (MB|GB) \(peak RSS of rank 0\)$",
                         out, re.M)
        assert peak and 50 < float(peak[1]) * {"MB": 1, "GB": 1000}[peak[2]] < 4000, out
        assert out.index("peak memory after") > out.index("step     0 | loss")


def test_activation_checkpointing_recomputes_the_blocks_with_the_same_gradients():
    """In training, each block runs again in backward; the loss and every gradient are those without."""
    grads, calls = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
        model.activation_checkpointing = on
        hook = model.transformer.h[0].register_forward_pre_hook(lambda *_: calls.append(on))
        idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        _, loss = model(idx, idx)
        loss.backward()
        hook.remove()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert calls == [False, True, True]  # once without; forward and recompute with
    assert grads[0][0] == grads[1][0]
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))


@pytest.mark.slow
def test_activation_checkpointing_under_ddp_trains_like_one_plain_process(runs, data, tmp_path):
    """Recomputed blocks composed with DDP's gradient hooks: 2 DDP ranks recomputing every block give
    1 plain process's losses."""
    root, *_ = runs
    proc = train(data, tmp_path, *COMMON, "--activation_checkpointing", 1, nproc=2)
    assert "2 process(es) on cpu" in proc.stdout and "a full copy on every rank" in proc.stdout
    assert_same_losses(read_log(tmp_path), read_log(root / "single"), range(6))


@pytest.mark.slow
@ci_only
def test_ddp_and_compile_train_like_one_plain_process(runs, data, tmp_path):
    """DDP's gradient hooks on a compiled model (Dynamo's DDP path): 2 compiled DDP ranks give 1 eager
    process's losses. (With --activation_checkpointing too, a run hung once in CI on gloo; 40 runs of it
    since did not.)"""
    root, *_ = runs
    proc = train(data, tmp_path, *COMMON, "--compile", 1, nproc=2)
    assert ("2 process(es) on cpu | float32 | compile on" in proc.stdout
            and "a full copy on every rank" in proc.stdout)
    assert_same_losses(read_log(tmp_path), read_log(root / "single"), range(6))


@pytest.mark.slow
@ci_only
def test_hellaswag_and_samples_under_fsdp(tmp_path, shakespeare_shards):
    """41 HellaSwag examples over 2 FSDP ranks (21 and 20, one per forward: rank 1 runs one padding batch)
    give the acc_norm hellaswag.py gives the checkpoint's weights; the samples every rank generated are
    those of the checkpoint's model."""
    from hellaswag import iterate_examples, score
    run_train("--data_dir", shakespeare_shards, "--log_dir", tmp_path, *HELLA, "--max_steps", 2,
              "--micro_batch_size", 4, "--hellaswag_limit", 41, "--hellaswag_dir", HELLASWAG_EXCERPT,
              "--plot", 0, "--fsdp", 1, nproc=2)
    model = model_from_checkpoint(load_checkpoint(tmp_path / "model_00002.pt")).eval()
    enc = gpt2_tokenizer()
    _, correct_norm, n = score(model, list(iterate_examples("val", HELLASWAG_EXCERPT))[:41], enc)
    assert n == 41 and read_log(tmp_path)["hella"][2] == pytest.approx(correct_norm / n, abs=1e-4)
    prompt = enc.encode(SAMPLE_PROMPT)
    rows = model.generate(prompt, 4, max_new_tokens=32 - len(prompt), seed=42, n_vocab=enc.n_vocab)
    expected = [f"2 sample {i}: {enc.decode(row.tolist())!r}" for i, row in enumerate(rows)]
    assert (tmp_path / "samples.txt").read_text().splitlines() == expected


def test_fsdp_without_torchrun_is_a_one_line_error(capsys, data, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    code, err = run_main(capsys, "--data_dir", data, "--log_dir", tmp_path, *map(str, TINY), "--fsdp", "1")
    assert code == 1 and err.startswith("train_gpt2.py: error: --fsdp 1: ") and "torchrun" in err
    assert err.count("\n") == 1 and not (tmp_path / "log.txt").exists()
