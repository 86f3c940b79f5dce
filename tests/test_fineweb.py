"""fineweb.py: a corpus -> GPT-2 uint16 token shards, as train_gpt2.py reads them.

Shard names and formats, <|endoftext|> placement, the local readers, num_proc / streaming invariance,
resume after an interruption, one-line errors, a local folder through datasets.load_dataset, and
train_gpt2.py training on the output. The expected token stream is always built directly with tiktoken's
own gpt2 encoding (conftest.tiktoken_gpt2): [50256] + encode_ordinary(doc) for every document, in order.

fineweb.py runs in this process through fineweb.main (fast), except where a real process matters (SIGKILL).
datasets' arrow cache goes to a temporary folder (see hf_cache), never to ~/.cache.
"""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import (REPO, TINY_SHAKESPEARE, folder_in_use, on_small_disk, read_log, run_train,
                      tiktoken_gpt2, wait_for)
import common
import fineweb

EOT = 50256
# the spec: a corpus of val_tokens plus 2 tokens (a token and its target) has a train split
MIN_TRAIN_TOKENS = 2

# The many-document corpus: small shards, so documents cross shard boundaries and several tasks of 256
# documents each run in parallel. 12,345 is not a document boundary, so the last val document runs on
# into the first train shard.
REF = ("--shard_size", 20000, "--val_tokens", 12345)
READER = ("--val_tokens", 1000, "--shard_size", 50000)  # for the ~85K-token corpora of the reader tests


# -----------------------------------------------------------------------------
# Helpers


def fineweb_main(*args):
    """`python fineweb.py *args`, in this process: (exit status, error message or None)."""
    argv0, sys.argv[0] = sys.argv[0], "fineweb.py"  # argparse names the program after argv[0]
    try:
        fineweb.main([str(a) for a in args])
    # sys.exit("fineweb.py: error: ...") exits 1 printing the message; argparse exits 2
    except SystemExit as e:
        return (1, e.code) if isinstance(e.code, str) else (e.code, None)
    finally:
        sys.argv[0] = argv0
    return 0, None


def tokenize(out_dir, *args, num_proc=1):
    """Run fineweb.py into out_dir, which must succeed; returns out_dir as a str."""
    status, error = fineweb_main("--num_proc", num_proc, *args, "--out_dir", out_dir)
    assert status == 0, error
    return str(out_dir)


def expected_stream(docs):
    """The spec's token stream: every document as <|endoftext|> followed by its GPT-2 tokens."""
    enc = tiktoken_gpt2()
    tokens = []
    for doc in docs:
        tokens.append(EOT)
        tokens += enc.encode_ordinary(doc)
    return np.array(tokens, dtype=np.int64)


def read_shard(path):
    """A shard's tokens, read by the format's definition (not with fineweb.open_shard)."""
    path = str(path)
    if path.endswith(".bin"):
        header = np.fromfile(path, dtype=np.int32, count=256)
        tokens = np.fromfile(path, dtype=np.uint16, offset=256 * 4)
        assert list(header[:3]) == [20240520, 1, len(tokens)], f"{path}: bad llm.c header {header[:3]}"
        assert not header[3:].any()
        return tokens
    tokens = np.load(path, allow_pickle=False)
    assert tokens.dtype == np.uint16 and tokens.ndim == 1, f"{path}: {tokens.ndim}-D {tokens.dtype}"
    return tokens


def read_manifest(out_dir):
    with open(os.path.join(out_dir, "manifest.json")) as f:
        return json.load(f)


def shard_names(out_dir):
    return sorted(n for n in os.listdir(out_dir) if n.endswith((".npy", ".bin")))


def read_stream(out_dir):
    """The shards of a finished out_dir, in manifest order, concatenated (int64); checks the listing too."""
    manifest = read_manifest(out_dir)
    assert manifest["done"] is True
    names = [s["name"] for s in manifest["shards"]]
    assert sorted(names) == shard_names(out_dir), "the manifest and the folder disagree"
    return np.concatenate([read_shard(os.path.join(out_dir, n)) for n in names]).astype(np.int64)


def assert_stream(out_dir, docs):
    got, want = read_stream(out_dir), expected_stream(docs)
    assert len(got) == len(want), f"{len(got)} tokens, expected {len(want)}"
    if not np.array_equal(got, want):
        first = int(np.argmax(got != want))
        raise AssertionError(f"token {first} is {got[first]}, expected {want[first]}")


def snapshot(folder):
    """{file name: bytes} of every file in folder ({} if it does not exist) but .lock, which names the process
    that last held the folder."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in set(os.listdir(folder)) - {".lock"}:
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def assert_same_files(got_dir, want_dir):
    """Byte-identical folders: the same file names (no stray .tmp left over) and the same bytes."""
    got, want = snapshot(got_dir), snapshot(want_dir)
    assert sorted(got) == sorted(want)
    assert [n for n in sorted(want) if got[n] != want[n]] == []


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)
    return path


def chunks(docs, n):
    """docs cut into n consecutive runs."""
    size = -(-len(docs) // n)
    return [docs[i: i + size] for i in range(0, len(docs), size)]


# -----------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    """datasets' cache in a temporary folder. datasets reads HF_HOME / HF_DATASETS_CACHE once, at import (and
    another test module may have imported it already), so set the variables for subprocesses and patch
    datasets.config for this process."""
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "datasets"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_DATASETS_CACHE", str(cache))
        import datasets.config as config
        patch.setattr(config, "HF_CACHE_HOME", str(home))
        patch.setattr(config, "HF_DATASETS_CACHE", cache)
        patch.setattr(config, "HF_MODULES_CACHE", home / "modules")
        patch.setattr(config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
        patch.setattr(config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
        yield cache


@pytest.fixture(scope="module")
def shakespeare_path():
    return TINY_SHAKESPEARE


@pytest.fixture(scope="module")
def shakespeare(shakespeare_path):
    with open(shakespeare_path, encoding="utf-8", newline="") as f:
        return f.read()


@pytest.fixture(scope="module")
def paragraphs(shakespeare):
    """Tiny Shakespeare's 7,222 paragraphs (330,807 tokens as documents): many documents, many tasks."""
    return shakespeare.split("\n\n")


@pytest.fixture(scope="module")
def small_docs(paragraphs):
    """The first 2,000 paragraphs: 84,899 tokens, enough for a small val shard plus one training
    micro-batch."""
    return paragraphs[:2000]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, paragraphs):
    """The paragraphs as a .jsonl, with an extra column as real corpora have."""
    path = tmp_path_factory.mktemp("corpus") / "paragraphs.jsonl"
    return write_jsonl(path, [{"id": i, "text": p} for i, p in enumerate(paragraphs)])


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, small_docs):
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    return write_jsonl(path, [{"text": d} for d in small_docs])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The paragraphs tokenized by one process: every other way of running must reproduce it byte for byte."""
    return tokenize(tmp_path_factory.mktemp("reference") / "out", "--input", corpus, *REF)


@pytest.fixture(scope="module")
def reference_bin(tmp_path_factory, corpus):
    return tokenize(tmp_path_factory.mktemp("reference_bin") / "out", "--input", corpus, *REF,
                    "--format", "bin")


@pytest.fixture(scope="module")
def shakespeare_bin(tmp_path_factory, shakespeare_path):
    """input.txt through --input: one document; the val split as in the preset, 100K-token train shards."""
    return tokenize(tmp_path_factory.mktemp("shakespeare_bin") / "out", "--input", shakespeare_path,
                    "--val_tokens", 34000, "--shard_size", 100000, "--format", "bin")


@pytest.fixture(scope="module")
def shakespeare_preset(tmp_path_factory):
    """--preset shakespeare: the repository's copy of Tiny Shakespeare, no download."""
    return tokenize(tmp_path_factory.mktemp("shakespeare_preset") / "out", "--preset", "shakespeare")


# -----------------------------------------------------------------------------
# 1. Shard names, formats, manifest


def test_npy_shards_names_dtype_and_manifest(reference, corpus, paragraphs):
    names = shard_names(reference)
    assert names[-1] == "data_val_000000.npy"
    assert names[:-1] == [f"data_train_{i:06d}.npy" for i in range(1, len(names))]
    assert len(names) == 17  # 12,345 val tokens + 318,462 train tokens in 20,000-token shards
    for name in names:
        tokens = np.load(os.path.join(reference, name), allow_pickle=False)
        assert tokens.dtype == np.uint16 and tokens.ndim == 1

    manifest = read_manifest(reference)
    assert manifest["source"]["input"] == [[str(corpus), os.path.getsize(corpus)]]
    assert "gpt2" in manifest["tokenizer"] and str(EOT) in manifest["tokenizer"]
    assert [s["name"] for s in manifest["shards"]] == ["data_val_000000.npy"] + names[:-1]
    for shard in manifest["shards"]:
        assert shard["tokens"] == len(np.load(os.path.join(reference, shard["name"])))
    assert manifest["docs"] == len(paragraphs)
    assert manifest["done"] is True


def test_bin_shards_have_llmc_header_and_the_npy_tokens(reference, reference_bin):
    names = shard_names(reference)
    assert shard_names(reference_bin) == [n[:-len(".npy")] + ".bin" for n in names]
    for name in names:
        path = os.path.join(reference_bin, name[:-len(".npy")] + ".bin")
        header = np.fromfile(path, dtype=np.int32, count=256)
        npy = np.load(os.path.join(reference, name))
        assert list(header[:3]) == [20240520, 1, len(npy)]
        assert not header[3:].any()
        assert os.path.getsize(path) == 256 * 4 + 2 * len(npy)
        assert np.array_equal(np.fromfile(path, dtype=np.uint16, offset=256 * 4), npy)
    manifest, manifest_npy = read_manifest(reference_bin), read_manifest(reference)
    assert manifest["format"] == "bin"
    assert [s["tokens"] for s in manifest["shards"]] == [s["tokens"] for s in manifest_npy["shards"]]


# -----------------------------------------------------------------------------
# 2. The token stream: EOT before every document; val first, then full train shards


def test_stream_is_eot_then_tokens_of_each_document(reference, paragraphs):
    assert_stream(reference, paragraphs)


def test_val_shard_first_then_full_train_shards(reference, paragraphs):
    expected = expected_stream(paragraphs)
    sizes = [s["tokens"] for s in read_manifest(reference)["shards"]]
    assert sizes[0] == 12345
    assert sizes[1:-1] == [20000] * (len(sizes) - 2)
    assert 0 < sizes[-1] <= 20000 and sum(sizes) == len(expected)
    # the setting is meaningful: the last val document runs on into train_000001, as do others across shards
    assert expected[12345] != EOT
    assert read_shard(os.path.join(reference, "data_train_000001.npy"))[0] != EOT


# -----------------------------------------------------------------------------
# 3. Local readers


def test_txt_folder_is_one_document_per_file_in_sorted_order(tmp_path, small_docs):
    folder = tmp_path / "texts"
    names = ["9.txt", "10.txt", "b.txt", "sub/c.txt", "a.txt", "empty.txt"]  # created out of order
    texts = ["\n\n".join(c) + "\n" for c in chunks(small_docs, len(names) - 1)] + [""]
    for name, text in zip(names, texts):
        write_text(folder / name, text)
    write_text(folder / "notes.md", "not a document")  # not a corpus file type: a folder skips it
    by_path = dict(zip((str(folder / n) for n in names), texts))
    out = tokenize(tmp_path / "out", "--input", folder, *READER)
    assert_stream(out, [by_path[p] for p in sorted(by_path)])


def test_jsonl(tmp_path, small_docs):
    docs = ["", "<|endoftext|> is plain text inside a document",
            "naïve café — 日本語 🙂\r\n\ttabs"] + small_docs
    path = write_jsonl(tmp_path / "docs.jsonl",
                       [{"text": d, "id": i, "url": f"u{i}"} for i, d in enumerate(docs)])
    assert_stream(tokenize(tmp_path / "out", "--input", path, *READER), docs)


def test_json_array_of_objects(tmp_path, small_docs):
    docs = ["first", "second\n"] + small_docs
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"id": i, "text": d} for i, d in enumerate(docs)]), encoding="utf-8")
    assert_stream(tokenize(tmp_path / "out", "--input", path, *READER), docs)


def test_parquet(tmp_path, small_docs):
    docs = ["first", "é"] + small_docs
    path = write_parquet(tmp_path / "docs.parquet", {"text": docs, "id": list(range(len(docs)))})
    assert_stream(tokenize(tmp_path / "out", "--input", path, *READER), docs)


def test_glob_reads_matches_in_sorted_order(tmp_path, small_docs):
    parts = chunks(small_docs, 3)
    for name, docs in zip(["part-2.jsonl", "part-10.jsonl", "part-1.jsonl"], parts):
        write_jsonl(tmp_path / name, [{"text": d} for d in docs])
    write_jsonl(tmp_path / "other.jsonl", [{"text": "not matched"}])
    out = tokenize(tmp_path / "out", "--input", tmp_path / "part-*.jsonl", *READER)
    assert_stream(out, parts[2] + parts[1] + parts[0])  # part-1, part-10, part-2


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_text_column(tmp_path, small_docs, kind):
    rows = {"text": ["decoy"] * len(small_docs), "content": small_docs}
    path = tmp_path / f"docs.{kind}"
    if kind == "jsonl":
        write_jsonl(path, [{"text": t, "content": c} for t, c in zip(rows["text"], rows["content"])])
    else:
        write_parquet(path, rows)
    out = tokenize(tmp_path / "out", "--input", path, "--text_column", "content", *READER)
    assert_stream(out, small_docs)
    assert read_manifest(out)["source"]["text_column"] == "content"


@pytest.mark.parametrize("streaming", [0, 1])
def test_mixed_types_keep_the_given_order(tmp_path, small_docs, streaming):
    p, t1, j1, j2, t2 = chunks(small_docs, 5)
    files = [  # given in this order: not sorted, not grouped by type
        write_parquet(tmp_path / "c.parquet", {"text": p, "extra": [1] * len(p)}),
        write_text(tmp_path / "a.txt", "\n\n".join(t1)),
        write_jsonl(tmp_path / "e.jsonl", [{"text": d} for d in j1]),
        tmp_path / "b.json",
        write_text(tmp_path / "d.txt", "\n\n".join(t2)),
    ]
    files[3].write_text(json.dumps([{"text": d} for d in j2]), encoding="utf-8")
    out = tokenize(tmp_path / "out", "--input", *files, "--streaming", streaming, *READER)
    assert_stream(out, p + ["\n\n".join(t1)] + j1 + j2 + ["\n\n".join(t2)])


# -----------------------------------------------------------------------------
# 4. Tiny Shakespeare: through --input, and through its preset


def test_shakespeare_through_input(shakespeare_bin, shakespeare):
    n = len(tiktoken_gpt2().encode_ordinary(shakespeare)) + 1
    assert_stream(shakespeare_bin, [shakespeare])
    manifest = read_manifest(shakespeare_bin)
    assert sum(s["tokens"] for s in manifest["shards"]) == n == 338026
    assert manifest["docs"] == 1
    assert [s["tokens"] for s in manifest["shards"]] == [34000, 100000, 100000, 100000, 4026]


def test_shakespeare_preset(shakespeare_preset, shakespeare):
    assert shard_names(shakespeare_preset) == ["shakespeare_train_000001.npy", "shakespeare_val_000000.npy"]
    manifest = read_manifest(shakespeare_preset)
    assert manifest["prefix"] == "shakespeare" and manifest["val_tokens"] == 34000
    assert manifest["source"]["input"] == [[TINY_SHAKESPEARE, 1115394]]
    assert [s["tokens"] for s in manifest["shards"]] == [34000, 338026 - 34000]
    assert_stream(shakespeare_preset, [shakespeare])


# -----------------------------------------------------------------------------
# 5. The bytes do not depend on the number of processes, nor on streaming


@pytest.mark.parametrize("args", [("--num_proc", 2), ("--streaming", 1), ("--streaming", 1, "--num_proc", 2)],
                         ids=["num_proc2", "streaming", "streaming-num_proc2"])
def test_output_does_not_depend_on_processes_or_streaming(tmp_path, reference, corpus, args):
    out = tokenize(tmp_path / "out", "--input", corpus, *REF, *args)
    assert_same_files(out, reference)


# -----------------------------------------------------------------------------
# 6. Resume

# Runs fineweb.main, dying by SIGKILL (no cleanup, as kill -9 or a power cut) halfway through writing the
# kill_at-th shard file: its temporary file is left half-written.
DYING_RUN = """
import os, signal, sys
import fineweb

kill_at, calls, write_shard = int(sys.argv[1]), [], fineweb.write_shard

def dying_write_shard(path, tokens, fmt):
    calls.append(path)
    tmp = write_shard(path, tokens, fmt)
    if len(calls) == kill_at:
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return tmp

fineweb.write_shard = dying_write_shard
fineweb.main(sys.argv[2:])
"""


@pytest.mark.parametrize("kill_at", [1, 9], ids=["before-the-first-manifest", "mid-run"])
def test_resume_after_sigkill(tmp_path, capsys, reference, corpus, paragraphs, kill_at):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", DYING_RUN, str(kill_at), "--input", str(corpus),
                           *map(str, REF), "--num_proc", "1", "--out_dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert any(n.endswith(".tmp") for n in os.listdir(out))  # the half-written shard
    # the val shard itself, which waits under its temporary name until train tokens follow it
    if kill_at == 1:
        assert shard_names(out) == [] and not os.path.exists(out / "manifest.json")
        resumed_after = None
    else:
        manifest = read_manifest(out)
        assert not manifest["done"] and len(manifest["shards"]) == kill_at - 1
        resumed_after = manifest["shards"][-1]["name"]
        boundary = sum(s["tokens"] for s in manifest["shards"])
        assert expected_stream(paragraphs)[boundary] != EOT  # it resumes in the middle of a document

    tokenize(out, "--input", corpus, *REF)
    stdout = capsys.readouterr().out
    if resumed_after:
        assert f"resuming after {resumed_after}" in stdout
    else:
        assert "resuming" not in stdout
    assert_same_files(out, reference)


def test_resume_after_lost_shards_with_streaming(tmp_path, capsys, reference, corpus):
    """The manifest of a run stopped after shard 10, a half-written shard 11 lying about: a streaming,
    two-process rerun (ds.skip instead of row ranges) finishes it as the reference."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    manifest = read_manifest(out)
    for shard in manifest["shards"][11:]:
        os.remove(out / shard["name"])
    manifest.update(shards=manifest["shards"][:11], docs=None, done=False)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "data_train_000011.npy.tmp").write_bytes(b"\x93NUMPY half a shard")

    tokenize(out, "--input", corpus, *REF, "--streaming", 1, num_proc=2)
    assert "resuming after data_train_000010.npy" in capsys.readouterr().out
    assert_same_files(out, reference)


@pytest.mark.parametrize("fixture, index, damage", [
    ("reference", 5, "truncate"),
    ("reference", 0, "truncate"),
    ("reference", 16, "delete"),
    ("reference_bin", 7, "truncate"),
])
def test_damaged_shard_is_redone(tmp_path, capsys, request, corpus, fixture, index, damage):
    want = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    shutil.copytree(want, out)
    name = read_manifest(out)["shards"][index]["name"]
    if damage == "truncate":
        os.truncate(out / name, os.path.getsize(out / name) - 100)
    else:
        os.remove(out / name)

    fmt = "bin" if fixture.endswith("bin") else "npy"
    tokenize(out, "--input", corpus, *REF, "--format", fmt)
    stdout = capsys.readouterr().out
    assert f"{name} is missing or damaged" in stdout
    if index > 0:
        assert f"resuming after {read_manifest(want)['shards'][index - 1]['name']}" in stdout
    assert_same_files(out, want)


def test_complete_directory_is_left_alone(tmp_path, capsys, reference, corpus):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    stat = {n: os.stat(out / n).st_mtime_ns for n in snapshot(out)}
    tokenize(out, "--input", corpus, *REF)
    assert "is complete" in capsys.readouterr().out
    assert {n: os.stat(out / n).st_mtime_ns for n in snapshot(out)} == stat
    assert_same_files(out, reference)


def test_out_dir_inside_an_input_folder_is_never_an_input(tmp_path, capsys, small_docs):
    """Before, a rerun read the first run's manifest.json as a document: "a different corpus", for ever."""
    folder = tmp_path / "texts"
    folder.mkdir()
    write_jsonl(folder / "docs.jsonl", [{"text": d} for d in small_docs])
    out = folder / "tokens"
    assert_stream(tokenize(out, "--input", folder, *READER), small_docs)
    tokenize(out, "--input", folder, *READER)
    assert "is complete" in capsys.readouterr().out
    os.remove(out / shard_names(out)[-1])
    assert_stream(tokenize(out, "--input", folder, *READER), small_docs)  # resumed
    status, message = fineweb_main("--num_proc", 1, "--input", out / "manifest.json", "--out_dir", out)
    assert (status, message) == (1, f"fineweb.py: error: --input {out / 'manifest.json'}: only files in "
                                    f"--out_dir {out}, which this run writes")


def test_an_out_dir_in_use_is_refused_at_once_and_free_once_its_run_is_killed(tmp_path, small_corpus):
    """Two runs into one out_dir ended as one manifest over shards of both corpora."""
    out = tmp_path / "out"
    with folder_in_use(out) as holder:
        status, message = fineweb_main("--num_proc", 1, "--input", small_corpus, *READER, "--out_dir", out)
        assert (status, message) == (1, f"fineweb.py: error: --out_dir {out}: in use by another run (pid "
                                        f"{holder.pid} on host {socket.gethostname()}); wait for it to end "
                                        f"or pick another --out_dir")
        assert os.listdir(out) == [".lock"]
        holder.kill()  # SIGKILL: nothing of it runs after
        holder.wait()
        tokenize(out, "--input", small_corpus, *READER)


# fineweb.main with 2 tokenizing workers, SIGKILLed (as kill -9) when its first shard is written, the workers
# busy with tasks of a minute (as on a large corpus); it first writes the workers' pids to the file argv[1]
KILLED_WITH_WORKERS = """
import multiprocessing, os, signal, sys, time
import fineweb

tokenize_rows = fineweb.tokenize_rows

def slow_rows(rows):
    if rows[0] >= 1024:
        time.sleep(60)
    return tokenize_rows(rows)

def dying_write_shard(path, tokens, fmt):
    with open(sys.argv[1], "w") as f:
        f.write(" ".join(str(p.pid) for p in multiprocessing.active_children()))
    os.kill(os.getpid(), signal.SIGKILL)

fineweb.tokenize_rows, fineweb.write_shard = slow_rows, dying_write_shard
fineweb.main(sys.argv[2:])
"""


def test_a_killed_run_leaves_no_worker_holding_the_lock(tmp_path, corpus):
    """Forked workers get a copy of the lock's descriptor: they close it, so the folder is free the moment
    their parent dies (before, they held it 18-25 s and a rerun blamed the dead parent), and they die with
    it. The rerun then finishes the corpus."""
    import fcntl
    out, pids = tmp_path / "out", tmp_path / "pids"
    with open(tmp_path / "stderr", "w") as err:  # not a pipe, which a live worker would hold open
        proc = subprocess.run([sys.executable, "-c", KILLED_WITH_WORKERS, str(pids), "--input", str(corpus),
                               *map(str, REF), "--num_proc", "2", "--out_dir", str(out)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-3000:]
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    with open(out / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while a worker holds it

    def alive(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return "\nState:\tZ" not in f.read()  # a zombie has exited
        except FileNotFoundError:
            return False
    wait_for(lambda: not any(map(alive, workers)), 10, "end of the dead run's workers")
    assert read_stream(tokenize(out, "--input", corpus, *REF)).size


def test_a_file_system_without_locks_runs_unguarded_with_a_note(tmp_path, capsys, monkeypatch, small_corpus):
    def flock(f, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # as some network file systems answer
    monkeypatch.setattr(common, "fcntl", types.SimpleNamespace(flock=flock, LOCK_EX=2, LOCK_NB=4))
    out = tokenize(tmp_path / "out", "--input", small_corpus, *READER)
    assert f"note: --out_dir {out}: cannot lock it (No locks available), so nothing keeps a second run out" \
        in capsys.readouterr().out
    assert read_stream(out).size


# -----------------------------------------------------------------------------
# 7. Bad input: one line, a non-zero exit, no shard under a final name


def missing_file(tmp_path, request):
    return ["--input", tmp_path / "missing.jsonl", "--val_tokens", 1000], ["missing.jsonl"]


def folder_without_corpus_files(tmp_path, request):
    folder = tmp_path / "nothing_here"
    write_text(folder / "a.csv", "text\nhello\n")
    write_text(folder / "sub" / "b.md", "hello")
    return ["--input", folder, "--val_tokens", 1000], ["nothing_here"]


def empty_jsonl(tmp_path, request):
    (tmp_path / "empty.jsonl").write_text("")
    return ["--input", tmp_path / "empty.jsonl", "--val_tokens", 1000], \
        [f"--input {tmp_path / 'empty.jsonl'}: an empty file"]


def non_utf8_file_in_a_folder(tmp_path, request):
    """Named with its bad byte, not as the folder's UnicodeDecodeError."""
    write_text(tmp_path / "docs" / "a.txt", "fine text " * 100)
    (tmp_path / "docs" / "b.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    return ["--input", tmp_path / "docs", "--val_tokens", 1000], \
        [f"{tmp_path / 'docs' / 'b.txt'}: not UTF-8 text (byte 0xe9 at offset 3)"]


def csv_file(tmp_path, request):
    write_text(tmp_path / "data.csv", "text\n" + "hello world\n" * 1000)
    return ["--input", tmp_path / "data.csv", "--val_tokens", 1000], ["data.csv", ".csv"]


def missing_text_column(tmp_path, request):
    path = write_jsonl(tmp_path / "docs.jsonl",
                       [{"body": d, "title": "t"} for d in request.getfixturevalue("small_docs")])
    return ["--input", path, "--val_tokens", 1000], ["'text'", "body", "title", "--text_column"]


def corpus_too_small(tmp_path, request):
    """One token short of val_tokens plus the smallest train split; the message says what --val_tokens
    works."""
    n = len(expected_stream(request.getfixturevalue("small_docs")))
    return ["--input", request.getfixturevalue("small_corpus"), "--val_tokens", n - MIN_TRAIN_TOKENS + 1,
            "--shard_size", 5000], \
        [f"--val_tokens {n - MIN_TRAIN_TOKENS + 1:,}",
         f"set --val_tokens to at most {n - MIN_TRAIN_TOKENS:,}"]


def out_dir_of_another_corpus(tmp_path, request):
    shutil.copytree(request.getfixturevalue("reference"), tmp_path / "out")
    return ["--input", request.getfixturevalue("small_corpus"), *REF], ["--out_dir"]


def out_dir_with_shards_but_no_manifest(tmp_path, request):
    shutil.copytree(request.getfixturevalue("reference"), tmp_path / "out")
    os.remove(tmp_path / "out" / "manifest.json")
    return ["--input", request.getfixturevalue("corpus"), *REF], ["manifest.json"]


def bad_flag(*flag):
    def case(tmp_path, request):
        return ["--input", request.getfixturevalue("small_corpus"), *flag], list(map(str, flag))
    case.__name__ = f"{flag[0].lstrip('-')}_{flag[1]}"
    return case


ERRORS = [missing_file, folder_without_corpus_files, empty_jsonl, non_utf8_file_in_a_folder, csv_file,
          missing_text_column, corpus_too_small,
          out_dir_of_another_corpus, out_dir_with_shards_but_no_manifest,
          bad_flag("--shard_size", 0), bad_flag("--format", "zip"), bad_flag("--preset", "nope"),
          bad_flag("--prefix", "train"), bad_flag("--prefix", "my_val"), bad_flag("--prefix", "sub/data")]


@pytest.mark.parametrize("case", ERRORS, ids=[c.__name__ for c in ERRORS])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, request, case):
    out = tmp_path / "out"
    args, expected = case(tmp_path, request)
    before = {n: b for n, b in snapshot(out).items() if n.endswith((".npy", ".bin"))}
    capsys.readouterr()

    status, message = fineweb_main("--num_proc", 1, *args, "--out_dir", out)
    err = capsys.readouterr().err + (message + "\n" if message else "")
    assert status != 0
    assert "Traceback" not in err and "StopIteration" not in err and "UnicodeDecodeError" not in err
    lines = [line for line in err.splitlines() if line.startswith("fineweb.py: error:")]
    assert len(lines) == 1, err[-3000:]
    for text in expected:
        assert text in lines[0]
    after = snapshot(out)
    assert {n: b for n, b in after.items() if n.endswith((".npy", ".bin"))} == before
    assert not [n for n in after if n.endswith(".tmp")]


def test_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, small_corpus):
    (tmp_path / "afile").write_text("not a folder")
    for out, why in [(tmp_path / "afile", "File exists"), (tmp_path / "afile" / "out", "Not a directory")]:
        status, message = fineweb_main("--num_proc", 1, "--input", small_corpus, "--out_dir", out)
        assert status == 1 and message == (f"fineweb.py: error: --out_dir {out}: "
                                           f"cannot make that folder ({why}); pick another --out_dir")
    assert "Traceback" not in capsys.readouterr().err


def test_disk_full_keeps_the_shards_written_and_the_rerun_finishes(tmp_path, reference, corpus):
    """Room for a few shards: one line naming the folder, no .tmp left, the listed shards kept; after
    freeing space, the same command resumes and ends byte-identical. Before, an OSError traceback and a
    .tmp were left."""
    disk = tmp_path / "disk"
    run = ["run", [sys.executable, os.path.join(REPO, "fineweb.py"), "--num_proc", 1, "--input", corpus, *REF,
                   "--out_dir", disk / "out"]]
    full, rerun = on_small_disk(disk, "4m", [("fill", 200_000), run, ("free",), run,
                                             ("save", tmp_path / "saved")])
    assert full["returncode"] == 1 and "Traceback" not in full["stderr"]
    errors = [line for line in full["stderr"].splitlines() if line.startswith("fineweb.py: error:")]
    assert len(errors) == 1 and re.fullmatch(
        rf"fineweb.py: error: disk full in {re.escape(str(disk / 'out'))}/: "
        r"the (\d+) shards manifest.json lists "
        r"are kept; free space, then rerun this command, which resumes after them", errors[0]), errors
    kept = int(re.search(r"the (\d+) shards", errors[0])[1])
    assert kept > 1 and not [n for n in full["files"] if n.endswith(".tmp")]
    assert len([n for n in full["files"] if n.endswith(".npy")]) == kept
    assert rerun["returncode"] == 0, rerun["stderr"][-3000:]
    assert f"resuming after data_train_{kept - 1:06d}.npy" in rerun["stdout"]
    assert_same_files(tmp_path / "saved" / "out", reference)


def test_smallest_trainable_corpus(tmp_path, small_corpus, small_docs):
    """Exactly val_tokens plus 2 tokens is enough (one token fewer is corpus_too_small)."""
    n = len(expected_stream(small_docs))
    out = tokenize(tmp_path / "out", "--input", small_corpus, "--val_tokens", n - MIN_TRAIN_TOKENS,
                   "--shard_size", 5000)
    assert_stream(out, small_docs)
    sizes = [s["tokens"] for s in read_manifest(out)["shards"]]
    assert sizes[0] == n - MIN_TRAIN_TOKENS and sum(sizes[1:]) == MIN_TRAIN_TOKENS


def test_corpus_smaller_than_a_default_micro_batch_tokenizes_with_a_note(tmp_path, capsys, small_docs):
    """10,853 tokens with --val_tokens 1,000: refused before (65,537 train tokens were required whatever the
    flags); now it is tokenized, with a note on the micro-batch it fits, and train_gpt2.py trains on it."""
    docs = small_docs[:260]
    path = write_jsonl(tmp_path / "small.jsonl", [{"text": d} for d in docs])
    n = len(expected_stream(docs))
    assert n == 10853
    out = tokenize(tmp_path / "out", "--input", path, "--val_tokens", 1000)
    assert_stream(out, docs)
    assert (f"note: the largest train shard has {n - 1000:,} tokens, fewer than one micro-batch of "
            f"train_gpt2.py's defaults (64 x 1024 + 1 = 65,537): train with --micro_batch_size B and "
            f"--seq_len T such that B x T + 1 <= {n - 1000:,}") in capsys.readouterr().out
    run_train("--data_dir", out, "--log_dir", tmp_path / "log", "--n_layer", 1, "--n_head", 2, "--n_embd", 32,
              "--block_size", 32, "--seq_len", 32, "--micro_batch_size", 4, "--total_batch_size", 128,
              "--max_steps", 2, "--val_steps", 2, "--device", "cpu")
    assert sorted(read_log(tmp_path / "log")["train"]) == [0, 1]


# -----------------------------------------------------------------------------
# 8. --dataset: a local folder through datasets.load_dataset, as a Hub dataset


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_local_dataset_folder(tmp_path, small_docs, kind):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    if kind == "parquet":
        write_parquet(folder / "train.parquet", {"text": small_docs})
        write_parquet(folder / "test.parquet", {"text": ["held out"] * 10})
    else:
        write_jsonl(folder / "train.jsonl", [{"text": d} for d in small_docs])
        write_jsonl(folder / "test.jsonl", [{"text": "held out"}] * 10)
    out = tokenize(tmp_path / "out", "--dataset", folder, "--name", "", "--split", "train",
                   "--prefix", "local", *READER)
    assert shard_names(out) == ["local_train_000001.npy", "local_train_000002.npy", "local_val_000000.npy"]
    assert_stream(out, small_docs)
    source = read_manifest(out)["source"]
    assert source["dataset"] == str(folder) and source["name"] == "" and source["split"] == "train"


# -----------------------------------------------------------------------------
# 9. train_gpt2.py trains on the output


@pytest.mark.parametrize("fixture", ["shakespeare_preset", "shakespeare_bin"], ids=["npy", "bin"])
def test_train_gpt2_reads_the_shards(tmp_path, request, fixture):
    run_train("--data_dir", request.getfixturevalue(fixture), "--log_dir", tmp_path, "--n_layer", 1,
              "--n_head", 2, "--n_embd", 32, "--block_size", 32, "--seq_len", 32, "--micro_batch_size", 4,
              "--total_batch_size", 128, "--max_steps", 3, "--eval_interval", 3, "--val_steps", 2,
              "--device", "cpu")
    log = read_log(tmp_path)
    assert sorted(log["train"]) == [0, 1, 2]
    assert 3 in log["val"]
    assert all(5 < loss < 12 for kind in log.values() for loss in kind.values())  # ~ln(50304) = 10.8 at init


def test_train_gpt2_refuses_a_copy_that_is_not_the_folder_the_manifest_lists(tmp_path, reference):
    """A copy missing a listed shard, or holding one fineweb.py did not write, trained on what was there."""
    shutil.copytree(reference, tmp_path / "missing")
    os.remove(tmp_path / "missing" / "data_train_000007.npy")
    shutil.copytree(reference, tmp_path / "extra")
    shutil.copy(tmp_path / "extra" / "data_train_000001.npy", tmp_path / "extra" / "data_train_000099.npy")
    for folder, what in (("missing", "data_train_000007.npy, listed in its manifest.json, is missing; rerun "
                                     "the fineweb.py command that made the folder, which redoes it"),
                         ("extra", "data_train_000099.npy is not a shard its manifest.json lists (fineweb.py "
                                   "did not write it there); move it out")):
        proc = run_train("--data_dir", tmp_path / folder, "--log_dir", tmp_path / f"log_{folder}",
                         "--n_layer", 1, "--n_head", 2, "--n_embd", 32, "--block_size", 32, "--seq_len", 32,
                         "--micro_batch_size", 4, "--total_batch_size", 128, "--max_steps", 1,
                         "--val_steps", 2, "--device", "cpu", check=False)
        assert proc.returncode == 1
        assert proc.stderr == f"train_gpt2.py: error: --data_dir {tmp_path / folder}: {what}\n"


def test_datasets_cache_is_the_temporary_one(hf_cache, reference):
    assert any((hf_cache / "json").iterdir())


# -----------------------------------------------------------------------------
# Interruptions at the worst moments, and malformed data


class Killed(BaseException):
    """A simulated SIGKILL: nothing of fineweb.py's error handling catches it."""


@pytest.mark.parametrize("moment", ["before the first manifest", "between manifest and rename"])
def test_interruption_around_the_first_manifest_can_be_resumed(tmp_path, monkeypatch, reference, corpus,
                                                               moment):
    """Killed while finalizing the val shard: before manifest.json exists, or after it lists the shard
    but before the rename. Either way the rerun resumes and ends byte-identical."""
    real_replace = os.replace

    def killed_save(out_dir, manifest):
        raise Killed

    def killed_rename(src, dst):
        if str(dst).endswith(".npy"):
            raise Killed
        real_replace(src, dst)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        if moment == "before the first manifest":
            patch.setattr(fineweb, "save_manifest", killed_save)
        else:
            patch.setattr(fineweb.os, "replace", killed_rename)
        with pytest.raises(Killed):
            fineweb_main("--num_proc", 1, "--input", corpus, *REF, "--out_dir", out)
    assert shard_names(out) == []
    status, error = fineweb_main("--num_proc", 1, "--input", corpus, *REF, "--out_dir", out)
    assert status == 0, error
    assert_same_files(out, reference)


def test_streaming_malformed_jsonl_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": "hello world " * 10}) + "\n" for _ in range(3000))
                    + "{not json\n")
    status, message = fineweb_main("--num_proc", 1, "--input", path, "--streaming", 1, "--val_tokens", 1000,
                                   "--out_dir", tmp_path / "out")
    assert status == 1 and message.startswith("fineweb.py: error:")


@pytest.mark.parametrize("num_proc, streaming", [(1, 0), (2, 0), (2, 1)])
def test_null_document_is_a_one_line_error_naming_file_and_row(tmp_path, small_docs, num_proc, streaming):
    """The null is row 301 of the second file, in the second task of 256 documents."""
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in small_docs[:100]])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in small_docs[100:400]] + [{"text": None}]
                         + [{"text": d} for d in small_docs[400:]])
    status, message = fineweb_main("--num_proc", num_proc, "--streaming", streaming, "--input", first, second,
                                   "--val_tokens", 1000, "--out_dir", tmp_path / "out")
    assert (status, message) == (1, f"fineweb.py: error: row 301 of {second}: its --text_column 'text' "
                                    f"is None, not text")
    manifest = read_manifest(tmp_path / "out")  # the val shard was done before the second task
    assert not manifest["done"] and shard_names(tmp_path / "out") == [s["name"] for s in manifest["shards"]]
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


def test_input_file_with_brackets_in_its_name(tmp_path, small_docs):
    path = write_jsonl(tmp_path / "part[1].jsonl", [{"text": d} for d in small_docs])
    status, error = fineweb_main("--num_proc", 1, "--input", path, *READER, "--out_dir", tmp_path / "out")
    assert status == 0, error
    assert_stream(str(tmp_path / "out"), small_docs)


def test_damaged_manifest_is_a_one_line_error(tmp_path, reference, corpus):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "manifest.json").write_text("")
    status, message = fineweb_main("--num_proc", 1, "--input", corpus, *REF, "--out_dir", out)
    assert status == 1 and message.startswith("fineweb.py: error:")


# -----------------------------------------------------------------------------
# 6. Platforms and the network


@pytest.mark.slow
def test_spawn_start_method_as_on_macos_and_windows(tmp_path, reference, corpus):
    """macOS and Windows start pool workers with spawn, not fork: each worker re-imports fineweb.py and gets
    the dataset by pickling. The shards must be those of a forked run."""
    script = tmp_path / "spawned.py"
    script.write_text(f"import multiprocessing, sys\nsys.path.insert(0, {REPO!r})\nimport fineweb\n"
                      f"if __name__ == '__main__':\n    multiprocessing.set_start_method('spawn')\n"
                      f"    fineweb.main()\n")
    proc = subprocess.run([sys.executable, script, "--input", corpus, *map(str, REF), "--num_proc", "2",
                           "--out_dir", tmp_path / "out"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_files(tmp_path / "out", reference)


def test_url_input_over_http(tmp_path, shakespeare_bin):
    """--input http(s)://... goes through datasets' HTTP filesystem, which needs aiohttp
    (in requirements.txt): Tiny Shakespeare served by `python -m http.server` on 127.0.0.1 gives the
    shards of the local file."""
    (tmp_path / "www").mkdir()
    shutil.copy(TINY_SHAKESPEARE, tmp_path / "www" / "input.txt")
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "--directory", tmp_path / "www"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # "Serving HTTP on 127.0.0.1 port N ..."
        port = re.search(r" port (\d+) ", server.stdout.readline()).group(1)
        url = f"http://127.0.0.1:{port}/input.txt"
        # datasets' offline mode refuses every URL, a local one too; huggingface_hub reads each of these
        # as offline (TRANSFORMERS_OFFLINE too, as an air-gapped machine may set)
        offline = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        env = {k: v for k, v in os.environ.items() if k not in offline}
        proc = subprocess.run([sys.executable, os.path.join(REPO, "fineweb.py"), "--input", url,
                               "--val_tokens", "34000", "--shard_size", "100000", "--format", "bin",
                               "--out_dir", tmp_path / "out"],
                              capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shards = {n: b for n, b in snapshot(tmp_path / "out").items() if n != "manifest.json"}
    assert (shards == {n: b for n, b in snapshot(shakespeare_bin).items() if n != "manifest.json"}
            and len(shards) == 5)
    assert read_manifest(tmp_path / "out")["source"]["input"] == [[url, None]]


def test_no_network_and_no_tiktoken_cache_needed(tmp_path, small_corpus):
    """GPT-2's BPE comes from the repository's data/ folder: with an empty tiktoken cache and every proxy
    dead, a real fineweb.py process tokenizes as the in-process run does."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "fineweb.py"), "--input", small_corpus,
                           *map(str, READER), "--out_dir", tmp_path / "out"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_files(tmp_path / "out", tokenize(tmp_path / "in_process", "--input", small_corpus, *READER))
    assert not os.path.exists(tmp_path / "empty_cache")  # tiktoken's cache was never touched


def test_damaged_bpe_file_is_a_one_line_error(tmp_path, small_corpus, monkeypatch):
    shutil.copytree(os.path.join(REPO, "data"), tmp_path / "data")
    with open(tmp_path / "data" / "encoder.json", "r+b") as f:
        f.truncate(1000)  # cut short, as by a bad copy
    monkeypatch.setattr(common, "DATA_DIR", str(tmp_path / "data"))
    common.gpt2_tokenizer.cache_clear()
    try:
        status, error = fineweb_main("--input", small_corpus, *READER, "--out_dir", tmp_path / "out")
    finally:
        common.gpt2_tokenizer.cache_clear()
    assert status == 1 and error == (f"fineweb.py: error: {tmp_path}/data/encoder.json: damaged (not the "
                                     f"bytes of OpenAI's file); restore it with `git checkout -- data`")
    assert not os.path.exists(tmp_path / "out")
