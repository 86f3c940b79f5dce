"""The data the repository ships (data/: GPT-2's BPE files and Tiny Shakespeare; tests/data: a HellaSwag
excerpt), and common.gpt2_tokenizer(), the one GPT-2 tokenizer every script uses: built from those
files with no network and without torch, it equals tiktoken's own "gpt2" encoding."""
import hashlib
import json
import os
import pickle
import shutil

import subprocess
import sys

import pytest

import common
from conftest import HELLASWAG_EXCERPT, REPO, SHARED_HELLASWAG, TINY_SHAKESPEARE, tiktoken_gpt2
from common import GPT2_BPE_SHA256, UserError, gpt2_tokenizer


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_bpe_files_are_the_ones_tiktoken_checks(monkeypatch):
    """tiktoken's gpt2 encoding names OpenAI's two files with the sha256 it verifies them by (in
    tiktoken_ext/openai_public.py); ours have exactly those hashes."""
    from tiktoken_ext import openai_public
    seen = {}
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks",
                        lambda **kwargs: seen.update(kwargs) or {})
    openai_public.gpt2()
    assert seen["vocab_bpe_file"].endswith("/gpt-2/encodings/main/vocab.bpe")
    assert seen["encoder_json_file"].endswith("/gpt-2/encodings/main/encoder.json")
    expected = {"vocab.bpe": seen["vocab_bpe_hash"], "encoder.json": seen["encoder_json_hash"]}
    assert ({name: sha256(os.path.join(REPO, "data", name)) for name in expected}
            == expected == GPT2_BPE_SHA256)


def test_tiny_shakespeare_is_char_rnns_file():
    assert os.path.getsize(TINY_SHAKESPEARE) == 1_115_394
    assert sha256(TINY_SHAKESPEARE) == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    with open(TINY_SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    assert (text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
            and text.count("\n") == 40000)


def test_hellaswag_excerpt_is_the_first_200_val_tasks():
    path = os.path.join(HELLASWAG_EXCERPT, "hellaswag_val.jsonl")
    with open(path, "rb") as f:
        excerpt = f.read()
    rows = [json.loads(line) for line in excerpt.splitlines()]
    assert len(rows) == 200 and [r["ind"] for r in rows] == list(range(200))
    assert all(set(r) == {"ind", "activity_label", "ctx", "split", "label", "endings"} for r in rows)
    assert all(r["split"] == "val" and len(r["endings"]) == 4 and r["label"] in range(4) for r in rows)
    full = os.path.join(SHARED_HELLASWAG, "hellaswag_val.jsonl")
    if os.path.exists(full):  # the bigger check, where ../shared/data is beside the checkout
        with open(full, "rb") as f:
            assert b"".join(next(f) for _ in range(200)) == excerpt


def texts():
    """Real text and the hard cases of byte-level BPE: runs of spaces and newlines, non-ASCII, emoji,
    contractions, digits, and the special token's spelling."""
    with open(TINY_SHAKESPEARE, encoding="utf-8") as f:
        shakespeare = f.read()
    with open(os.path.join(HELLASWAG_EXCERPT, "hellaswag_val.jsonl"), encoding="utf-8") as f:
        hellaswag = " ".join(r["ctx"] + " " + " ".join(r["endings"]) for r in map(json.loads, f))
    return [shakespeare, hellaswag,
            "naïve café, 日本語, emoji 🙂👩‍👩‍👧 and\ttabs\r\n  3.14159 it's we'll",
            "   leading spaces\n\n\n\ntrailing   ", "x<|endoftext|>y", ""]


def test_ids_equal_tiktokens_gpt2():
    ours, reference = gpt2_tokenizer(), tiktoken_gpt2()
    assert ((ours.n_vocab, ours.eot_token, ours.max_token_value)
            == (reference.n_vocab, reference.eot_token, 50256))
    assert ours._mergeable_ranks == reference._mergeable_ranks  # every token's bytes and rank
    assert ours._pat_str == reference._pat_str and ours._special_tokens == reference._special_tokens
    for text in texts():
        ids = ours.encode_ordinary(text)
        assert ids == reference.encode_ordinary(text)
        assert ours.decode(ids) == text
        assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    # Tiny Shakespeare, as every GPT-2 recipe counts it
    assert len(ours.encode_ordinary(texts()[0])) == 338_025


def test_built_without_network_or_tiktokens_cache(tmp_path, monkeypatch):
    """An empty, read-only TIKTOKEN_CACHE_DIR and dead proxies: built from data/ alone, nothing written."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    for var in ("HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    gpt2_tokenizer.cache_clear()
    try:
        assert gpt2_tokenizer().encode_ordinary("Hello, I'm a language model,") == \
            [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    finally:
        gpt2_tokenizer.cache_clear()
    assert os.listdir(cache) == []


def test_fineweb_tokenizes_without_loading_torch(tmp_path):
    """The tokenizer lives in fineweb.py, which never imports torch (+2 s and +200 MB a process): a whole
    fineweb.py run, workers included, leaves torch unloaded."""
    code = ("import sys; import fineweb; fineweb.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('no torch')")
    proc = subprocess.run([sys.executable, "-c", code, "--preset", "shakespeare", "--num_proc", "2",
                           "--out_dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.endswith("no torch\n"), proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == [".lock", "manifest.json", "shakespeare_train_000001.npy",
                                                    "shakespeare_val_000000.npy"]


def test_pickles_whole_for_spawned_workers():
    """fineweb.py hands the Encoding itself to its workers (pickled under spawn): it must arrive whole,
    not as a name a worker would look up (and download) in tiktoken's registry."""
    enc = pickle.loads(pickle.dumps(gpt2_tokenizer()))
    assert enc is not gpt2_tokenizer() and enc._mergeable_ranks == gpt2_tokenizer()._mergeable_ranks
    assert enc.encode_ordinary(texts()[2]) == gpt2_tokenizer().encode_ordinary(texts()[2])


@pytest.mark.parametrize("damage, message", [
    ("missing", "{path}: cannot read GPT-2's BPE (No such file or directory); "
                "restore it with `git checkout -- data`"),
    ("truncated", "{path}: damaged (not the bytes of OpenAI's file); restore it with `git checkout -- data`"),
])
@pytest.mark.parametrize("name", ["encoder.json", "vocab.bpe"])
def test_missing_or_damaged_file_is_a_one_line_error(tmp_path, monkeypatch, name, damage, message):
    shutil.copytree(os.path.join(REPO, "data"), tmp_path / "data")
    path = tmp_path / "data" / name
    if damage == "missing":
        path.unlink()
    else:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 1)
    monkeypatch.setattr(common, "DATA_DIR", str(tmp_path / "data"))
    gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(UserError) as e:
            gpt2_tokenizer()
    finally:
        gpt2_tokenizer.cache_clear()
    assert str(e.value) == message.format(path=path)
