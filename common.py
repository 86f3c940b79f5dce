"""What every script of the repository shares; it imports no torch and no other script of the repository.

UserError, the one error every script's main() prints as one line; print0 and format_bytes; the
command-line flags made from a config dataclass (config_parser); GPT-2's constants and its tokenizer,
built from the BPE files in data/ with no download; and the safe disk writes: a file flushed to disk
before it is renamed into place, a full disk recognised, and the lock that keeps a second run out of a
folder. No torch, so that fineweb.py's tokenizing processes and plot.py start in a fraction of a second.
"""

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import socket

try:
    import fcntl
except ImportError:  # native Windows: folders are not locked
    fcntl = None

# Shipped with the repository (data/SOURCES.md): GPT-2's BPE files and karpathy/char-rnn's Tiny Shakespeare
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# sha256 of OpenAI's two BPE files (encoder.json makes our tokenizer, export.py's Hugging Face tokenizer
# needs vocab.bpe too): the values tiktoken checks when it downloads them for its "gpt2" encoding
GPT2_BPE_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                   "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
# <|endoftext|>, the last id: GPT-2's only special token, the document separator
GPT2_EOT = GPT2_VOCAB_SIZE - 1
# OpenAI's GPT-2 weights on the Hugging Face Hub
PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class UserError(ValueError):
    """Bad flags, input, data or checkpoints, or a diverged run: every script's main() prints it as one line
    and exits 1."""


def print0(*args, **kwargs):
    """print() on rank 0 only, so 8 ranks do not print everything 8 times."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def format_bytes(n):
    """n bytes to 3 significant digits: 498 MB, 1.99 GB."""
    for e, unit in ((9, "GB"), (6, "MB"), (3, "kB"), (0, "bytes")):
        if n >= 10**e or unit == "bytes":
            return f"{n / 10**e:.3g} {unit}"


# -----------------------------------------------------------------------------
# Command-line flags: every script's, one per field of its config dataclass


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are one line, `prog: error: ...`, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_bool(s):
    value = {"1": True, "true": True, "0": False, "false": False}.get(s.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected 1, 0, true or false, got {s!r}")
    return value


def finite_float(s):
    value = float(s)  # argparse turns a ValueError into "invalid finite_float value"; nan passes every check
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return value


def auto_or_bool(s):
    """The value of a flag taking auto, 1/true or 0/false (a str | bool field): "auto", True or False."""
    value = {"auto": "auto", "1": True, "true": True, "0": False, "false": False}.get(s.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected auto, 1, 0, true or false, got {s!r}")
    return value


def option(default, help=None, group=None):
    """A config field: its default, its --help (None: SHARED_FLAGS_HELP's) and, on a group's first field,
    the group's "title: description" that --help shows above it and the fields after it."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group})


# --device, --dtype and --compile mean the same in every script: a config field of one of these names
# (default "auto") gets its help here; train_gpt2.resolve_system checks and resolves them.
SHARED_FLAGS_HELP = {
    "device": "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps",
    "dtype": "autocast dtype: auto (bfloat16 on CUDA GPUs that have it, float16 on older ones such as V100, "
             "T4, RTX 20xx; float32 off CUDA), bfloat16, float16 or float32",
    "compile": "torch.compile the model: auto (on for CUDA, where Triton can run), 1 or 0",
}


def config_parser(config_class, prog, doc, show_defaults=True):
    """A parser with one flag per field of config_class, under the fields' group headings; a list field
    takes one or more values. Parsing returns only the flags given; the dataclass holds the defaults
    (show_defaults=False: --help does not show them, e.g. where a preset gives them)."""
    parser = OneLineParser(prog=prog, description=doc.splitlines()[0], argument_default=argparse.SUPPRESS)
    types = {bool: parse_bool, float: finite_float, str | bool: auto_or_bool}
    group = parser
    for f in dataclasses.fields(config_class):
        if f.metadata.get("group"):
            group = parser.add_argument_group(*f.metadata["group"].split(": ", 1))
        help = f.metadata.get("help") or SHARED_FLAGS_HELP.get(f.name)
        kind = dict(nargs="+") if f.type is list else dict(type=types.get(f.type, f.type))
        help = f"{help} (default: {f.default})" if show_defaults else help
        group.add_argument(f"--{f.name}", help=help, **kind)
    return parser


def check_flags(cfg, checks):
    """A UserError for the first (name, ok, why) of checks whose ok is False: `--name value: why`."""
    for name, ok, why in checks:
        if not ok:
            value = getattr(cfg, name)
            raise UserError(f"--{name} {int(value) if isinstance(value, bool) else value}: {why}")


# -----------------------------------------------------------------------------
# GPT-2's tokenizer


@functools.cache
def gpt2_tokenizer():
    """GPT-2's BPE as a tiktoken Encoding, from data/encoder.json: the ids of tiktoken.get_encoding("gpt2"),
    with no download. Every script tokenizes with it."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizing regex
    contents = {}
    for name, sha256 in GPT2_BPE_SHA256.items():
        path = os.path.join(DATA_DIR, name)
        try:
            with open(path, "rb") as f:
                contents[name] = f.read()
        except OSError as e:
            raise UserError(f"{path}: cannot read GPT-2's BPE ({e.strerror}); restore it with "
                            f"`git checkout -- data`") from None
        if hashlib.sha256(contents[name]).hexdigest() != sha256:
            raise UserError(f"{path}: damaged (not the bytes of OpenAI's file); restore it with "
                            f"`git checkout -- data`")
    # encoder.json spells each token's bytes with one printable character per byte (GPT-2's bytes_to_unicode):
    # the printable bytes as themselves, the other 68 as chr(256), chr(257), ... in byte order. Its ids are
    # the merge ranks tiktoken uses. (tiktoken.load's reader of these files would also copy them into
    # TIKTOKEN_CACHE_DIR, which fails where that folder is read-only.)
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    byte_of = {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}
    encoder = json.loads(contents["encoder.json"])
    eot = encoder.pop("<|endoftext|>")  # GPT2_EOT: the files' sha256 are checked above
    ranks = {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items()}
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eot}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def require_gpt2_vocab(model, source):
    """A model for GPT-2 text (generate.py, hellaswag.py) needs all of GPT-2's token ids."""
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"{source}: its vocabulary has {model.config.vocab_size} tokens, fewer than GPT-2's "
                        f"{GPT2_VOCAB_SIZE}, so it cannot read GPT-2 tokens (it was trained with a smaller "
                        f"--vocab_size)")
    return model


# -----------------------------------------------------------------------------
# Disk writes: nothing half-written left under a final name, and one run per folder


def disk_full(e):
    """Whether an exception comes from a full disk: an OSError ENOSPC, also as the cause or context of
    the error torch.save raises ("unexpected pos"), in safetensors' message ("os error 28"), or numpy's
    short write, which has no errno ("20000 requested and 18368 written", from np.save's tofile)."""
    while e is not None:
        if isinstance(e, OSError) and (e.errno == errno.ENOSPC or " requested and " in str(e)) \
                or "os error 28" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def write_synced(path, write):
    """Write a new file with write(f), then flush it to the disk. Whatever goes wrong, a full disk or
    Ctrl-C, nothing is left at path."""
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise


def hold_folder(folder, flag, create=True):
    """Make folder (create=False: it must exist, as for a run resuming there) and lock it for this run (an
    flock on folder/.lock): a second run on it stops at once, saying whose it is. Use it as a context
    manager; the OS also drops the lock when the process dies, killed or not, so none outlives its run."""
    if not create and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder}: no such folder, so nothing to resume there; check the path")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a file of that name, or under a file; a read-only disk
        raise UserError(f"{flag} {folder}: cannot make that folder ({e.strerror}); pick another "
                        f"{flag}") from None
    lock = os.path.join(folder, ".lock")
    try:
        f = open(lock, "a+")
    except OSError as e:
        if os.access(folder, os.W_OK) and os.path.lexists(lock):  # e.g. a folder named .lock
            raise UserError(f"{flag} {folder}: cannot open its lock file {lock} ({e.strerror}); remove it "
                            f"(the run makes a new one) and run again") from None
        raise UserError(f"{flag} {folder}: cannot write in that folder ({e.strerror}); pick another "
                        f"{flag}") from None
    try:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "pid unknown"
        f.close()
        raise UserError(f"{flag} {folder}: in use by another run ({holder}); wait for it to end or pick "
                        f"another {flag}") from None
    except OSError as e:  # a file system without locks (some network ones): run, unguarded
        print(f"note: {flag} {folder}: cannot lock it ({e.strerror}), so nothing keeps a second run out")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    return f
