import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The data the tests read, all in the repository: Tiny Shakespeare and GPT-2's BPE files in data/ (what
# the product ships), and the first 200 HellaSwag val tasks in tests/data (data/SOURCES.md).
TINY_SHAKESPEARE = os.path.join(REPO, "data", "input.txt")
HELLASWAG_EXCERPT = os.path.join(REPO, "tests", "data")
# Where ../shared/data (beside the checkout) holds all 10,042 HellaSwag val tasks, one test also scores them.
SHARED_HELLASWAG = os.path.join(os.path.dirname(REPO), "shared", "data", "hellaswag")

# The slowest checks (15 s to minutes each on 2 CPU cores; many repeat a check the suite makes once, on
# another dtype, optimizer or sharding), past what the suite's 15 minutes can hold on a user's machine; CI
# (CI=true) runs them.
ci_only = pytest.mark.skipif(not os.environ.get("CI"),
                             reason="one of the slowest checks: CI runs it (CI=true)")

# Never wait on the network: transformers and datasets must use local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# PyTorch's CPU allocator backs large tensors (a micro-batch's B x T x 50304 logits) with transparent huge
# pages: 15x fewer page faults, ~20% off the wall time of a small CPU training run (docs/training.md).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
sys.path.insert(0, REPO)


@functools.cache
def tiktoken_gpt2():
    """tiktoken's own "gpt2" encoding, the reference for common.gpt2_tokenizer() and what the tests build
    expected tokens with. tiktoken downloads OpenAI's two files and caches them under the sha1 of their URL;
    here its cache is a temporary folder holding the repository's copies under those names, so it is built
    without network, by tiktoken's own code (which also checks the files' sha256)."""
    import tiktoken
    from tiktoken_ext import openai_public
    cache = tempfile.mkdtemp(prefix="tiktoken_cache_")
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        shutil.copy(os.path.join(REPO, "data", name),
                    os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    try:
        return tiktoken.Encoding(**openai_public.gpt2())
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
        shutil.rmtree(cache)


def write_npy_shard(path, tokens):
    np.save(path, np.asarray(tokens, dtype=np.uint16))


def write_bin_shard(path, tokens):
    """llm.c's format: 256 int32 header (magic, version, token count), then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def run_train(*args, nproc=1, check=True, timeout=900, merge_stderr=False, **kwargs):
    """Run train_gpt2.py as a user would (torchrun when nproc > 1); returns the CompletedProcess
    (with merge_stderr, stderr is interleaved into stdout)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run(launcher + [os.path.join(REPO, "train_gpt2.py"), *map(str, args)], cwd=REPO,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                          text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_gpt2.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def folder_in_use(folder):
    """folder held as a running train_gpt2.py or fineweb.py holds it (common.hold_folder, in a child process
    waiting on its stdin); yields the child, which is SIGKILLed at the end if still alive."""
    code = ("import sys, common; lock = common.hold_folder(sys.argv[1], ''); print('held', flush=True); "
            "sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        yield child
    finally:
        child.kill()
        child.wait()


def read_log(log_dir):
    """log.txt as {kind: {step: value}}, without the steps' end times (`N time`: the wall clock's, never the
    same in two runs)."""
    out = {}
    with open(os.path.join(log_dir, "log.txt")) as f:
        for line in f:
            if line.startswith("# "):  # each attempt's record
                continue
            step, kind, value = line.split()
            if kind == "time":
                continue
            out.setdefault(kind, {})[int(step)] = float(value)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(0.05)


def children(proc):
    """The pids of a launcher's child processes: its workers, the training processes (one per rank)."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory):
    """Tiny Shakespeare tokenized with GPT-2's BPE: the first 10% as the val shard, the rest as train."""
    from common import gpt2_tokenizer
    text = open(TINY_SHAKESPEARE, encoding="utf-8").read()
    enc = gpt2_tokenizer()
    tokens = np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint16)
    d = tmp_path_factory.mktemp("shakespeare")
    n_val = len(tokens) // 10
    write_npy_shard(d / "shakespeare_val_000000.npy", tokens[:n_val])
    write_npy_shard(d / "shakespeare_train_000001.npy", tokens[n_val:])
    return d


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A random GPT-2 (GPT-2's vocabulary, 64-token context) saved as a Hugging Face folder, standing in
    for `gpt2`, whose weights are not reachable offline."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(folder)
    return folder


# Runs inside a private mount namespace (see on_small_disk): mounts the tmpfs, then does the steps.
SMALL_DISK_STEPS = r"""
import json, os, shutil, subprocess, sys
mount, size, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], check=True)
filler, results = os.path.join(mount, "filler"), []
for kind, *args in steps:
    if kind == "fill":  # leave args[0] bytes free
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        with open(filler, "wb") as f:
            f.write(bytes(max(0, free - args[0])))
    elif kind == "free":
        os.remove(filler)
    elif kind == "readonly":
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    elif kind == "run":
        proc = subprocess.run([str(a) for a in args[0]], capture_output=True, text=True)
        results.append(dict(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr,
                            files=sorted(os.path.relpath(os.path.join(d, n), mount)
                                         for d, _, names in os.walk(mount) for n in names if n != "filler")))
    elif kind == "save":  # copy the disk's files out before it goes
        shutil.copytree(mount, args[0], ignore=lambda d, names: ["filler"])
print(json.dumps(results))
"""


def on_small_disk(mount_dir, size, steps):
    """Do steps on a tmpfs of `size` (e.g. "8m") mounted at mount_dir, a disk that fills up for real
    (ENOSPC from the kernel). It lives in a private mount namespace (unshare: no root needed, nothing
    else sees it, gone at the end). Steps: ("fill", bytes_left_free), ("free",) to remove the filling,
    ("readonly",) to remount it read-only, ("run", argv), ("save", folder) to copy the disk's files out.
    Returns, per "run", its returncode, stdout, stderr and the files then on the disk."""
    os.makedirs(mount_dir, exist_ok=True)
    cmd = ["unshare", "--map-root-user", "--mount", sys.executable, "-c", SMALL_DISK_STEPS, str(mount_dir),
           size, json.dumps(steps, default=str)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        pytest.skip("needs util-linux's unshare to mount a small disk")
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"this kernel allows no private mount namespace ({proc.stderr.strip()})")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)
