"""GPT.generate() and generate.py: the KV-cache loop against the recompute-everything baseline, sampling
(seeded, top-k, top-p), the command line's output and flags, its one-line errors, and end-to-end runs on a
Hugging Face folder and on a checkpoint from a tiny train_gpt2.py run.

Small random models stand in for GPT-2's weights (not reachable offline): the cache and sampling code
do not care what the weights are.
"""

import copy
import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train_gpt2
from conftest import REPO, ci_only, run_train, tiktoken_gpt2
from generate import GenerateConfig, main, parse_args
from train_gpt2 import GPT, GPTConfig, sample_next

ENC = tiktoken_gpt2()
PROMPT = "Hello, I'm a language model,"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: OpenMP's thread sync costs far more than their matmuls, and costs seconds
    a call when other processes hold the cores. One thread keeps every test fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(vocab_size=100, block_size=64, seed=1):
    """A 2-layer GPT whose weights are pushed away from the 0.02-scale init, so that its next-token
    distributions are far from uniform and an error in the cache would change them."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_gpt()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A model_00000.pt in train_gpt2.py's checkpoint layout around a tiny GPT (vocab 50304, context 64)."""
    net = tiny_gpt(vocab_size=50304)
    path = tmp_path_factory.mktemp("ckpt") / "model_00000.pt"
    torch.save({"model": net.state_dict(), "optimizer": {}, "model_config": dataclasses.asdict(net.config),
                "config": {}, "step": 0, "loader_positions": [0]}, path)
    return path


def cli(capsys, *argv):
    """main() in-process: (stdout, stderr)."""
    main([str(a) for a in argv])
    return capsys.readouterr()


def cli_error(capsys, *argv):
    """main() in-process for a bad input: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def samples(stdout):
    return [line[2:] for line in stdout.splitlines() if line.startswith("> ")]


# --- the KV cache against the baseline --------------------------------------------------------------


@pytest.mark.parametrize("n_new", [10, 60])
def test_kv_cache_greedy_equals_recompute_greedy(model, n_new):
    prompt = [5, 17, 42, 3]
    cached = model.generate(prompt, 3, n_new, temperature=0)
    baseline = model.generate(prompt, 3, n_new, temperature=0, recompute=True)
    assert cached.shape == (3, len(prompt) + n_new) and cached.dtype == torch.long
    assert torch.equal(cached, baseline)
    assert cached[:, :4].tolist() == [prompt] * 3
    assert len(set(cached[0, 4:].tolist())) > 3  # the weights give a real sequence, not one token repeated


def test_kv_cache_logits_equal_recompute_logits_at_every_step(model, monkeypatch):
    """The logits each step samples from are the same with and without the cache, to 1e-5 (float32)."""
    seen = {True: [], False: []}
    for recompute in (False, True):
        def record(logits, *args, recompute=recompute):
            seen[recompute].append(logits.clone())
            return sample_next(logits, *args)
        monkeypatch.setattr(train_gpt2, "sample_next", record)
        model.generate([1, 2, 3], 2, 40, top_k=0, seed=7, recompute=recompute)
    assert len(seen[False]) == len(seen[True]) == 40
    for a, b in zip(seen[False], seen[True]):
        assert (a - b).abs().max().item() < 1e-5


# --- sampling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k, top_p", [(50, 1.0), (0, 0.9), (20, 0.8), (0, 1.0)])
def test_seeded_sampling_is_reproducible(model, top_k, top_p):
    run = lambda seed: model.generate([1, 2, 3], 4, 20, top_k=top_k, top_p=top_p, seed=seed)
    assert torch.equal(run(42), run(42))
    assert not torch.equal(run(42), run(43))
    assert len({tuple(row) for row in run(42).tolist()}) > 1  # the sequences of one call differ too


@pytest.mark.parametrize("kwargs", [dict(top_p=1e-6), dict(top_k=1),
                                    dict(top_k=1, top_p=0.5, temperature=3.0)])
def test_tiny_top_p_or_top_k_1_is_greedy(model, kwargs):
    greedy = model.generate([1, 2, 3], 3, 30, temperature=0)
    assert torch.equal(model.generate([1, 2, 3], 3, 30, seed=1, **kwargs), greedy)


def support(logits, **kwargs):
    """The set of tokens sample_next draws from logits (1, V) in 2000 draws."""
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(2000, -1), kwargs.pop("temperature", 1.0), generator=g, **kwargs)
    return set(draws.flatten().tolist())


def test_top_p_keeps_the_smallest_set_reaching_p_and_top_k_the_k_best():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    assert support(logits, top_k=0, top_p=0.45) == {1}  # 0.5 alone reaches 0.45
    assert support(logits, top_k=0, top_p=0.79) == {1, 3}
    assert support(logits, top_k=0, top_p=0.81) == {1, 3, 2}
    assert support(logits, top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert support(logits, top_k=2, top_p=1.0) == {1, 3}
    assert support(logits, top_k=3, top_p=0.5) == {1}
    assert support(logits, top_k=0, top_p=1.0, temperature=0) == {1}


def test_vocab_padding_rows_are_never_sampled():
    """A 50304-row model (train_gpt2.py's padded vocab) never yields ids >= 50257, which tiktoken cannot
    decode, even when the padding rows have the largest logits."""
    net = tiny_gpt(vocab_size=50304)
    with torch.no_grad():
        net.transformer.ln_f.weight.zero_()
        net.transformer.ln_f.bias.fill_(1.0)  # every position's final hidden state is all ones
        net.lm_head.weight[50257:] = 10.0  # so the padding rows win by far
    for kwargs in (dict(temperature=0), dict(top_k=0), dict(top_k=5, top_p=0.9)):
        assert net.generate([1, 2], 2, 10, n_vocab=50257, **kwargs)[:, 2:].max().item() < 50257


def test_stops_at_block_size(model):
    out = model.generate(list(range(60)), 2, 100)
    assert out.shape == (2, 64)  # the note that it stops there is generate.py's
    assert model.generate(list(range(64)), 2, 5).shape == (2, 64)  # a full prompt: nothing to add


def test_prompt_longer_than_context_is_an_error(model):
    with pytest.raises(ValueError, match="65 tokens.*block_size"):
        model.generate(list(range(65)), 2, 5)


def test_restores_training_mode_and_accepts_a_tensor_prompt(model):
    model.train()
    try:
        out = model.generate(torch.tensor([1, 2, 3]), 2, 5, temperature=0)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(out, model.generate([1, 2, 3], 2, 5, temperature=0))


# --- the command line ---------------------------------------------------------------------------------


def test_defaults_and_flag_syntax():
    cfg = parse_args([])
    assert (cfg.init_from, cfg.prompt, cfg.num_return_sequences, cfg.max_length, cfg.max_new_tokens) == \
        ("gpt2", PROMPT, 10, 30, 0)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed, cfg.device, cfg.dtype, cfg.compile) == \
        (1.0, 50, 1.0, 42, "auto", "auto", "auto")
    cfg = parse_args(["--top_k=5", "--top_p", "0.9", "--compile=false", "--prompt=a b"])
    assert (cfg.top_k, cfg.top_p, cfg.compile, cfg.prompt) == (5, 0.9, False, "a b")


def test_help_lists_every_flag_and_the_context_limit(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in GenerateConfig.__dataclass_fields__:
        assert f"--{name}" in out
    assert "block_size" in out


def test_prints_each_sample_as_prompt_and_continuation(capsys, hf_folder):
    out = cli(capsys, "--init_from", hf_folder, "--num_return_sequences", 4, "--max_length", 20,
              "--device", "cpu")
    texts = samples(out.out)
    assert len(texts) == 4 and all(t.startswith(PROMPT) for t in texts)
    # Exactly the decoded rows of GPT.generate() with the same settings.
    from train_gpt2 import load_model
    rows = load_model(str(hf_folder)).generate(ENC.encode(PROMPT), 4, 20 - len(ENC.encode(PROMPT)))
    assert out.out.endswith("".join(f"> {ENC.decode(row.tolist())}\n" for row in rows))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_autocast_samples(capsys, hf_folder, dtype):
    """--dtype float16 (GPUs without bfloat16) and bfloat16 run on CPU too: 16-bit logits, the same prompt."""
    out = cli(capsys, "--init_from", hf_folder, "--num_return_sequences", 2, "--max_new_tokens", 6,
              "--dtype", dtype, "--device", "cpu")
    texts = samples(out.out)
    assert len(texts) == 2 and all(t.startswith(PROMPT) and len(t) > len(PROMPT) for t in texts)


def test_same_flags_same_output_other_seed_other_output(capsys, hf_folder):
    args = ["--init_from", hf_folder, "--num_return_sequences", 3, "--max_new_tokens", 10, "--top_p", 0.95]
    first, again, other = (cli(capsys, *args, "--seed", s).out for s in (1, 1, 2))
    assert first == again and first != other


@pytest.fixture
def rows(monkeypatch):
    """The tensors main() gets from GPT.generate(), recorded."""
    seen = []
    real = GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    return seen


def test_max_length_counts_the_prompt_and_max_new_tokens_overrides_it(capsys, hf_folder, rows):
    n_prompt = len(ENC.encode(PROMPT))
    cli(capsys, "--init_from", hf_folder, "--num_return_sequences", 2, "--max_length", 12)
    cli(capsys, "--init_from", hf_folder, "--num_return_sequences", 2, "--max_length", 12,
        "--max_new_tokens", 7)
    assert [r.shape for r in rows] == [(2, 12), (2, n_prompt + 7)]


def test_file_prompt(capsys, hf_folder, tmp_path, rows):
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    out = cli(capsys, "--init_from", hf_folder, "--prompt", f"FILE:{tmp_path / 'prompt.txt'}",
              "--num_return_sequences", 2, "--max_new_tokens", 5)
    assert rows[0][:, :len(ENC.encode(text))].tolist() == [ENC.encode(text)] * 2
    assert out.out.count(f"> {text}") == 2


def test_endoftext_in_the_prompt_is_the_special_token_and_empty_prompt_starts_from_it(capsys, hf_folder,
                                                                                       rows):
    cli(capsys, "--init_from", hf_folder, "--prompt", "a<|endoftext|>b", "--max_new_tokens", 2)
    cli(capsys, "--init_from", hf_folder, "--prompt", "", "--max_new_tokens", 2)
    assert rows[0][0, :3].tolist() == [64, 50256, 65]
    assert rows[1][0, :1].tolist() == [50256]


def test_generation_past_the_context_stops_there(capsys, hf_folder, rows):
    out = cli(capsys, "--init_from", hf_folder, "--num_return_sequences", 3, "--max_new_tokens", 500)
    assert rows[0].shape == (3, 64)
    assert out.out.count("note: stopping at the model's context of 64 tokens") == 1
    assert len(samples(out.out)) == 3


def test_checkpoint_with_padded_vocab(capsys, checkpoint, rows):
    out = cli(capsys, "--init_from", checkpoint, "--num_return_sequences", 3, "--max_new_tokens", 20,
              "--top_k", 0)
    assert rows[0].shape == (3, len(ENC.encode(PROMPT)) + 20) and rows[0].max().item() < 50257
    assert len(samples(out.out)) == 3


def test_a_training_log_dir_means_its_newest_checkpoint(capsys, checkpoint, tmp_path):
    """As export.py takes a log_dir; before, transformers said "no model.safetensors" there."""
    log = tmp_path / "log"
    log.mkdir()
    shutil.copy(checkpoint, log / "model_00010.pt")
    (log / "model_00002.pt").write_bytes(b"an older checkpoint, not read")
    (log / "model_00011.pt.tmp").write_bytes(b"half a checkpoint")
    args = ["--num_return_sequences", 2, "--max_new_tokens", 5]
    assert cli(capsys, "--init_from", log, *args).out == cli(capsys, "--init_from", checkpoint, *args).out
    partial = log / "model_00011.pt.tmp"
    code, err = cli_error(capsys, "--init_from", partial)
    assert code == 1 and err == f"generate.py: error: --init_from {partial}: a checkpoint still being " \
                                f"written, or cut short by a crash; pass a finished model_NNNNN.pt, or its " \
                                f"folder for the newest one\n"


@pytest.mark.parametrize("case, argv, expected", [
    ("prompt longer than context", ["--prompt", "word " * 80], "more than the model's context of 64 tokens"),
    ("FILE: missing", ["--prompt", "FILE:{tmp}/nope.txt"], "--prompt FILE:"),
    ("no such folder", ["--init_from", "{tmp}/no_such_model"], "--init_from"),
    ("no such .pt", ["--init_from", "{tmp}/model_00100.pt"], "no such checkpoint"),
    ("corrupt .pt", ["--init_from", "{tmp}/bad.pt"], "cannot read the checkpoint"),
    ("folder without a model", ["--init_from", "{tmp}/empty"], "neither a Hugging Face GPT-2 folder"),
    ("negative temperature", ["--temperature", "-0.5"], "--temperature -0.5: must be >= 0"),
    ("top_p zero", ["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    ("top_p above one", ["--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"),
    ("negative top_k", ["--top_k", "-1"], "--top_k -1"),
    ("no sequences", ["--num_return_sequences", "0"], "--num_return_sequences 0: must be a positive integer"),
    ("max_length within the prompt", ["--max_length", "5"], "--max_length 5: the prompt alone has 8 tokens"),
    ("negative max_new_tokens", ["--max_new_tokens", "-3"], "--max_new_tokens -3"),
    ("bad device", ["--device", "tpu"], "--device tpu"),
    ("bad dtype", ["--dtype", "float8"], "--dtype float8"),
    ("bad compile", ["--compile", "maybe"], "--compile: expected auto, 1, 0, true or false, got 'maybe'"),
    ("not a number", ["--top_k", "ten"], "--top_k"),
    ("unknown flag", ["--beam_width", "4"], "--beam_width"),
    ("FILE: not UTF-8", ["--prompt", "FILE:{tmp}/latin1.txt"],
     "--prompt FILE:{tmp}/latin1.txt: not UTF-8 text (byte 0xe9"),
    ("vocabulary smaller than GPT-2's", ["--init_from", "{tmp}/model_00001.pt"],
     "its vocabulary has 1000 tokens, fewer than GPT-2's 50257, so it cannot read GPT-2 tokens"),
    ("infinite temperature", ["--temperature", "inf"], "--temperature: expected a finite number, got 'inf'"),
    ("negative seed", ["--seed", "-1"], "--seed -1: must be in [0, 2**64)"),
])
def test_bad_input_is_a_one_line_error(capsys, tmp_path, checkpoint, case, argv, expected):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1.txt").write_bytes("Un café, s'il vous plaît".encode("latin-1"))
    net = tiny_gpt(vocab_size=1000)  # a checkpoint of a run with --vocab_size 1000
    torch.save({"model": net.state_dict(), "optimizer": {}, "model_config": dataclasses.asdict(net.config),
                "config": {}, "step": 1, "loader_positions": [0]}, tmp_path / "model_00001.pt")
    expected = expected.replace("{tmp}", str(tmp_path))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = cli_error(capsys, "--init_from", checkpoint, *argv)
    assert code != 0
    assert err.startswith("generate.py: error: ") and expected in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err


# --- end to end, as a user runs it --------------------------------------------------------------------


# one_thread(), in a subprocess
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")


def run_generate(*args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_end_to_end_on_a_hugging_face_folder(hf_folder):
    proc = run_generate("--init_from", hf_folder, "--num_return_sequences", 5)
    texts = samples(proc.stdout)
    assert len(texts) == 5 and all(t.startswith(PROMPT) for t in texts)
    assert proc.stdout.splitlines()[0] == f"loading GPT-2 weights from {hf_folder}"
    bad = subprocess.run([sys.executable, "generate.py", "--init_from", hf_folder, "--top_p", "2"], cwd=REPO,
                         capture_output=True, text=True, env=ONE_THREAD)
    assert bad.returncode == 1 and bad.stderr == "generate.py: error: --top_p 2.0: must be in (0, 1]\n"


@pytest.mark.slow
def test_end_to_end_on_a_checkpoint_from_train_gpt2(shakespeare_shards, tmp_path):
    run_train("--data_dir", shakespeare_shards, "--log_dir", tmp_path,
              "--n_layer", 2, "--n_head", 2, "--n_embd", 32,
              "--block_size", 32, "--seq_len", 32, "--micro_batch_size", 4, "--total_batch_size", 128,
              "--max_steps", 3, "--warmup_steps", 1, "--max_lr", 1e-3, "--min_lr", 1e-4, "--eval_interval", 3,
              "--val_steps", 1, "--device", "cpu", "--compile", "0", env=ONE_THREAD)
    ckpt = tmp_path / "model_00003.pt"
    proc = run_generate("--init_from", ckpt, "--num_return_sequences", 3, "--max_new_tokens", 40)
    texts = samples(proc.stdout)
    assert len(texts) == 3 and all(t.startswith(PROMPT) for t in texts)
    assert "note: stopping at the model's context of 32 tokens" in proc.stdout
    assert proc.stdout == run_generate("--init_from", ckpt, "--num_return_sequences", 3,
                                       "--max_new_tokens", 40).stdout


@pytest.mark.slow
@ci_only
def test_compiled_model_generates_the_same_tokens(model):
    """model.compile(dynamic=True), as --compile 1 does: generate()'s forwards go through torch.compile, and
    give the same greedy tokens as eager."""
    compiled = copy.deepcopy(model)
    compiled.compile(dynamic=True)
    torch._dynamo.reset()
    tokens = compiled.generate([1, 2, 3], 2, 20, temperature=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the forwards were compiled
    assert torch.equal(tokens, model.generate([1, 2, 3], 2, 20, temperature=0))
