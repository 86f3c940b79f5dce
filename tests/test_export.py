"""export.py: a checkpoint from a tiny train_gpt2.py run becomes a Hugging Face folder that transformers
loads with the same logits and greedy tokens as our GPT, with GPT-2's tokenizer (tiktoken's ids on real
text), a model card holding the run's numbers, and one-line errors that never leave a half-written folder.

GPT-2's tokenizer comes from OpenAI's original files in data/, export.py's default, so exports need no
network.
"""

import contextlib
import dataclasses
import io
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, GPT2TokenizerFast, pipeline
from transformers.utils import logging as hf_logging

from conftest import REPO, TINY_SHAKESPEARE, on_small_disk, run_train, tiktoken_gpt2
from export import ExportConfig, main, parse_args
from checkpoints import load_checkpoint
from train_gpt2 import GPT, GPTConfig, load_model

TOL = 1e-4  # float32 logits
TINY = ("--n_layer", 2, "--n_head", 2, "--n_embd", 32, "--block_size", 64, "--seq_len", 64,
        "--micro_batch_size", 4, "--total_batch_size", 256, "--hellaswag", 0, "--sample_interval", 0,
        "--compile", 0, "--device", "cpu")
QUICK = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")  # quiet(), in a subprocess
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}


@pytest.fixture(autouse=True, scope="module")
def quiet():
    """One thread (the tiny models' ops gain nothing from two busy cores) and no progress bars on stderr,
    so that an error is the only thing there. Restored after this module."""
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    yield
    if bars:
        hf_logging.enable_progress_bar()
    torch.set_num_threads(threads)


def cli(*argv):
    """main() in-process: its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in argv])
    return out.getvalue()


def cli_error(capsys, *argv):
    """main() in-process for a bad input: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def assert_one_line_error(err, *expected):
    assert err.startswith("export.py: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(s in err for s in expected), err


@pytest.fixture(scope="module")
def gpt2_files():
    """A folder holding OpenAI's encoder.json + vocab.bpe, given explicitly (here: the repository's own)."""
    return os.path.join(REPO, "data")


@pytest.fixture(scope="module")
def log_dir(shakespeare_shards, tmp_path_factory):
    """A tiny run on Tiny Shakespeare with checkpoints at steps 2 and 4 (vocab 50304, context 64); a short
    warmup and a high learning rate, so that 4 steps move the weights away from their init."""
    log_dir = tmp_path_factory.mktemp("log")
    run_train("--data_dir", shakespeare_shards, "--log_dir", log_dir, *TINY, "--max_steps", 4,
              "--ckpt_interval", 2, "--eval_interval", 2, "--val_steps", 2, "--warmup_steps", 1,
              "--max_lr", 3e-3, env=QUICK)
    return log_dir


@pytest.fixture(scope="module")
def exported(log_dir):
    """`export.py --checkpoint LOG_DIR`: the newest checkpoint, into the default out_dir, with the default
    tokenizer (data/'s files). (folder, stdout)."""
    out = cli("--checkpoint", log_dir)
    return log_dir / "hf_model_00004", out


def text_sample():
    """A few thousand characters of real text, newlines and runs of spaces included, plus non-ASCII."""
    with open(TINY_SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()[:4000]
    return text + "\n\n   naïve café, 日本語, emoji 🙂 and tabs\tend  "


# --- the folder, against our own model ---------------------------------------------------------------


def test_newest_checkpoint_into_default_folder_with_every_file(exported, log_dir):
    folder, out = exported
    assert "hf_model_00004" in os.listdir(log_dir) and not any(".tmp" in n for n in os.listdir(log_dir))
    assert {"config.json", "model.safetensors", "README.md", *TOKENIZER_FILES} <= set(os.listdir(folder))
    assert out == (f'saved {folder}\nload it with: transformers.pipeline("text-generation", '
                   f'model="{folder}")\n')


@pytest.fixture(scope="module")
def perturbed(log_dir, gpt2_files, tmp_path_factory):
    """model_00004.pt with noise of std 1/sqrt(n_embd) added to every weight, exported: (folder, checkpoint).
    Four steps in, the trained model's greedy continuation repeats one token, which says little; with the
    noise, every next token depends on every weight, and the GELU inputs are O(1), where the tanh
    approximation differs from the exact GELU by ~1e-3, above TOL."""
    ckpt = load_checkpoint(str(log_dir / "model_00004.pt"))
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # the tied wte/lm_head is one parameter, perturbed once
            p.add_(torch.randn_like(p) / math.sqrt(model.config.n_embd))
    path = tmp_path_factory.mktemp("perturbed") / "model_00004.pt"
    torch.save({**ckpt, "model": model.state_dict()}, path)
    cli("--checkpoint", path, "--tokenizer", gpt2_files)
    return path.parent / "hf_model_00004", path


def test_transformers_logits_equal_ours(exported, log_dir, perturbed):
    for folder, path in [(exported[0], log_dir / "model_00004.pt"), perturbed]:
        ours, hf = load_model(str(path)).eval(), GPT2LMHeadModel.from_pretrained(folder).eval()
        assert hf.config.vocab_size == 50257 and hf.config.n_positions == 64
        idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected, got = ours(idx)[0][..., :50257], hf(idx).logits
        assert (got - expected).abs().max().item() < TOL, folder


def test_pipeline_greedy_continuation_equals_ours(perturbed):
    folder, path = perturbed
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = tiktoken_gpt2().encode_ordinary(prompt)
    ours = load_model(str(path)).generate(ids, 1, max_new_tokens=10, temperature=0, n_vocab=50257)[0].tolist()
    assert len(set(ours[len(ids):])) > 5  # a real continuation, not one token repeated
    got = generator(prompt, max_new_tokens=10, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(got) == ours
    text = generator(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert text == tiktoken_gpt2().decode(ours)


def test_tokenizer_ids_equal_tiktokens_and_every_format_loads(exported, tmp_path):
    folder = exported[0]
    text = text_sample()
    expected = tiktoken_gpt2().encode_ordinary(text)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok(text)["input_ids"] == expected and tok.decode(expected) == text
    assert tok.bos_token == tok.eos_token == tok.unk_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok.model_max_length == 64  # the model's context
    # vocab.json + merges.txt alone, as tools that do not read tokenizer.json take them
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / name, tmp_path / name)
    assert GPT2TokenizerFast.from_pretrained(tmp_path)(text)["input_ids"] == expected


def test_model_card(exported, log_dir):
    card = (exported[0] / "README.md").read_text(encoding="utf-8")
    ckpt = load_checkpoint(str(log_dir / "model_00004.pt"))
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\nlicense: mit\n"
                           "tags:\n- gpt2\n---\n")
    assert "| step | 4 of 4 |" in card
    assert "| tokens seen | 1,024 (4 steps x 256) |" in card
    assert (f"| val loss | {ckpt['val_loss']:.4f} on the val split of `{ckpt['config']['data_dir']}` "
            "| 3.2924") in card
    assert "| HellaSwag acc_norm | not measured | 0.2955" in card
    assert "| 2 | 2 | 32 | 64 | 50257 (trained with 50304;" in card
    assert "| `--max_lr` | `0.003` |" in card and "| `--init_from` | `scratch` |" in card
    assert f'pipeline("text-generation", model="{exported[0]}")' in card


# --- other checkpoints ------------------------------------------------------------------------------


def test_checkpoint_file_into_an_empty_out_dir(log_dir, gpt2_files, tmp_path):
    (tmp_path / "out").mkdir()  # an empty folder is no work to lose
    cli("--checkpoint", log_dir / "model_00002.pt", "--out_dir", tmp_path / "out", "--tokenizer", gpt2_files)
    assert "| step | 2 of 4 |" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert os.listdir(tmp_path) == ["out"]


def save_variant(log_dir, path, vocab_size=None, **keys):
    """model_00004.pt with other keys, or with a random model of another vocab_size, saved at path."""
    ckpt = load_checkpoint(str(log_dir / "model_00004.pt"))
    if vocab_size:
        config = GPTConfig(**{**ckpt["model_config"], "vocab_size": vocab_size})
        ckpt.update(model=GPT(config).state_dict(), model_config=dataclasses.asdict(config))
    torch.save({**ckpt, **keys}, path)
    return path


def test_card_shows_hellaswag_when_measured(log_dir, gpt2_files, tmp_path):
    path = save_variant(log_dir, tmp_path / "model_00004.pt", hellaswag=0.30125, val_loss=None,
                        config={**load_checkpoint(str(log_dir / "model_00004.pt"))["config"],
                                "hellaswag_limit": 500})
    cli("--checkpoint", path, "--tokenizer", gpt2_files)
    card = (tmp_path / "hf_model_00004" / "README.md").read_text(encoding="utf-8")
    assert "| HellaSwag acc_norm | 0.3013 on 500 val examples | 0.2955 on 10,042 val examples |" in card
    assert "| val loss | not measured |" in card


def test_toy_vocab_exports_the_weights_without_a_tokenizer(log_dir, tmp_path):
    path = save_variant(log_dir, tmp_path / "model_00004.pt", vocab_size=100)
    out = cli("--checkpoint", path, "--tokenizer", tmp_path / "no_such_tokenizer")  # never read
    assert "note: the model's vocabulary has 100 tokens" in out and out.count("\n") == 3
    folder = tmp_path / "hf_model_00004"
    assert not TOKENIZER_FILES & set(os.listdir(folder))
    assert "comes without a tokenizer" in (folder / "README.md").read_text(encoding="utf-8")
    ours, hf = load_model(str(path)).eval(), GPT2LMHeadModel.from_pretrained(folder).eval()
    idx = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < TOL


def test_finetuned_from_a_hugging_face_folder(shakespeare_shards, hf_folder, exported, tmp_path):
    """An --init_from run has GPT-2's 50257 tokens, no padding; the tokenizer comes from a Hugging Face
    folder (the first export's)."""
    run_train("--data_dir", shakespeare_shards, "--log_dir", tmp_path, "--init_from", hf_folder,
              "--seq_len", 64, "--micro_batch_size", 4, "--total_batch_size", 256, "--max_steps", 2,
              "--eval_interval", 2, "--val_steps", 1, "--hellaswag", 0, "--sample_interval", 0,
              "--compile", 0, "--device", "cpu", env=QUICK)
    cli("--checkpoint", tmp_path, "--tokenizer", exported[0])
    folder = tmp_path / "hf_model_00002"
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "| 2 | 4 | 32 | 64 | 50257 |" in card and f"| `--init_from` | `{hf_folder}` |" in card
    text = text_sample()
    expected = tiktoken_gpt2().encode_ordinary(text)
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == expected
    ours, hf = (load_model(str(tmp_path / "model_00002.pt")).eval(),
                GPT2LMHeadModel.from_pretrained(folder).eval())
    idx = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < TOL


# --- the command line and its errors ------------------------------------------------------------------


def test_defaults_and_help(capsys):
    assert parse_args([]) == ExportConfig(checkpoint="log", out_dir="", tokenizer="", push_to_hub="",
                                          private=False)
    assert parse_args(["--private", "true", "--push_to_hub", "a/b"]).private is True
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Turn a train_gpt2.py checkpoint into a Hugging Face model folder" in out
    assert all(f"--{name}" in out for name in ExportConfig.__dataclass_fields__)


@pytest.mark.parametrize("case, argv, expected", [
    ("out_dir not empty", ["--out_dir", "{tmp}/full"],
     "--out_dir {tmp}/full: already exists and is not an empty"),
    ("no such checkpoint", ["--checkpoint", "{tmp}/model_00100.pt"],
     "--checkpoint {tmp}/model_00100.pt: no such checkpoint"),
    ("folder without checkpoints", ["--checkpoint", "{tmp}/full"],
     "no model_NNNNN.pt checkpoint in this folder"),
    ("corrupt checkpoint", ["--checkpoint", "{tmp}/model_00009.pt"], "cannot read the checkpoint"),
    ("tokenizer folder without files", ["--tokenizer", "{tmp}/full"],
     "--tokenizer {tmp}/full: no GPT-2 tokenizer"),
    ("corrupt tokenizer.json", ["--tokenizer", "{tmp}/bad_tok"], "--tokenizer {tmp}/bad_tok: cannot read"),
    ("no such tokenizer folder", ["--tokenizer", "{tmp}/nope"], "--tokenizer {tmp}/nope: no such folder"),
    ("repo id without user", ["--push_to_hub", "notarepoid", "--checkpoint", "{tmp}/missing"],
     "--push_to_hub notarepoid: expected a Hugging Face repo id, user/name"),
    ("private without push", ["--private", "1"], "--private: only means something with --push_to_hub"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(capsys, log_dir, tmp_path, case, argv, expected):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("someone's work")
    (tmp_path / "bad_tok").mkdir()
    (tmp_path / "bad_tok" / "tokenizer.json").write_text("{not json")
    (tmp_path / "model_00009.pt").write_bytes(b"not a checkpoint")
    before = sorted(os.listdir(tmp_path))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = cli_error(capsys, "--checkpoint", log_dir / "model_00004.pt", "--out_dir", tmp_path / "out",
                          *argv)
    assert code == 1
    assert_one_line_error(err, expected.replace("{tmp}", str(tmp_path)))
    assert (sorted(os.listdir(tmp_path)) == before
            and (tmp_path / "full" / "keep.txt").read_text() == "someone's work")


def test_push_offline_keeps_the_complete_folder(capsys, log_dir, gpt2_files, tmp_path):
    import huggingface_hub.constants
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is off: this test must not reach the Hub")
    out_dir = tmp_path / "out"
    code, err = cli_error(capsys, "--checkpoint", log_dir, "--out_dir", out_dir, "--tokenizer", gpt2_files,
                          "--push_to_hub", "someone/tiny-gpt")
    assert code == 1
    assert_one_line_error(err, "--push_to_hub someone/tiny-gpt: ", "offline",
                          f"the folder is saved in {out_dir}: "
                          f"upload it later with `hf upload someone/tiny-gpt {out_dir}`\n")
    assert {"config.json", "model.safetensors", "README.md", *TOKENIZER_FILES} <= set(os.listdir(out_dir))
    card = (out_dir / "README.md").read_text(encoding="utf-8")
    assert "# tiny-gpt\n" in card and 'pipeline("text-generation", model="someone/tiny-gpt")' in card


def test_push_to_an_unreachable_hub_is_one_line(log_dir, gpt2_files, tmp_path):
    """Online mode against a closed local port (refused at once): a network error, not a traceback."""
    env = dict(QUICK, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_a_real_token")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "export.py"), "--checkpoint", log_dir,
                           "--out_dir", tmp_path / "out", "--tokenizer", gpt2_files,
                           "--push_to_hub", "someone/tiny-gpt"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr, "--push_to_hub someone/tiny-gpt: ",
                          f"the folder is saved in {tmp_path / 'out'}")
    assert proc.stdout.startswith(f"saved {tmp_path / 'out'}\n")


def test_disk_full_is_one_line_and_leaves_nothing(log_dir, tmp_path):
    """The weights (6.4 MB) do not fit: one line naming the folder, no half-written or temporary folder;
    with the space freed, the same export works. Before, a SafetensorError traceback."""
    disk = tmp_path / "disk"
    run = ["run", [sys.executable, os.path.join(REPO, "export.py"), "--checkpoint", log_dir, "--out_dir",
                   disk / "gpt2-repro"]]
    full, freed = on_small_disk(disk, "16m", [("fill", 2_000_000), run, ("free",), run])
    assert full["returncode"] == 1 and full["files"] == []
    assert "Traceback" not in full["stderr"]  # before it, only transformers' progress bar
    assert full["stderr"].splitlines()[-1] == (f"export.py: error: disk full in {disk}: "
                                               f"{disk / 'gpt2-repro'} was not written; "
                                               "free space and export again")
    assert freed["returncode"] == 0, freed["stderr"][-3000:]
    assert {"model.safetensors", "config.json", "README.md"} <= {os.path.basename(n) for n in freed["files"]}
