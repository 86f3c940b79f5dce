"""Tokenize a corpus with GPT-2's BPE into uint16 token shards for train_gpt2.py.

    python fineweb.py                                  # FineWeb-Edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --preset shakespeare             # Tiny Shakespeare (in data/, no download)
                                                       # -> shakespeare/
    python fineweb.py --input my_texts/ --out_dir my_tokens --val_tokens 1000000

Every document becomes <|endoftext|> followed by its tokens; the documents, in order, form one token
stream. Its first val_tokens tokens are the val shard ({prefix}_val_000000), the rest is cut into
shard_size-token train shards ({prefix}_train_000001, ...). Shards are written under a temporary name
and renamed when complete, and manifest.json records each one, so an interrupted run picks up where it
stopped and produces the same bytes as an uninterrupted one.

It also holds the shard format read back (find_shards, open_shard), which train_gpt2.py's loader
imports. Like common.py, the base it builds on, it imports no torch, so its tokenizing processes start fast.
"""

import codecs
import collections
import ctypes
import glob
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from common import (DATA_DIR, UserError, config_parser, disk_full, gpt2_tokenizer, hold_folder, option,
                    write_synced)

MIN_TRAIN_TOKENS = 2  # the smallest train split: one token and its target
# one micro-batch of train_gpt2.py's defaults (64 x 1024, +1 for the targets)
DEFAULT_MICRO_BATCH_TOKENS = 64 * 1024 + 1
# documents a worker tokenizes per task: big enough to amortise the IPC, small enough to balance
DOCS_PER_TASK = 256
READERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # datasets' builders
# karpathy/char-rnn's Tiny Shakespeare, shipped in data/ (data/SOURCES.md)
TINY_SHAKESPEARE = os.path.join(DATA_DIR, "input.txt")
# llm.c's .bin shards: a header of 256 int32 (magic, version, token count, then zeros), then uint16 tokens
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256
# A split word in a shard's name: train or val with no letter beside it ("eval" holds none)
SPLIT_WORD = re.compile(r"(?<![a-z])(train|val)(?![a-z])")

PRESETS = {
    "fineweb-edu-10B": dict(dataset="HuggingFaceFW/fineweb-edu", name="sample-10BT", out_dir="edu_fineweb10B",
                            prefix="edufineweb"),
    "fineweb-edu-100B": dict(dataset="HuggingFaceFW/fineweb-edu", name="sample-100BT",
                             out_dir="edu_fineweb100B", prefix="edufineweb"),
    "fineweb-10B": dict(dataset="HuggingFaceFW/fineweb", name="sample-10BT", out_dir="fineweb10B",
                        prefix="fineweb"),
    "openwebtext": dict(dataset="Skylion007/openwebtext", name="", out_dir="openwebtext",
                        prefix="openwebtext"),
    # 338K tokens: the first ~10% are the val split, as in nanoGPT's Shakespeare recipes
    "shakespeare": dict(input=[TINY_SHAKESPEARE], out_dir="shakespeare", prefix="shakespeare",
                        val_tokens=34_000),
}


@dataclass
class FinewebConfig:
    preset: str = option("fineweb-edu-10B", "defaults for a corpus: " + ", ".join(PRESETS))
    dataset: str = option("HuggingFaceFW/fineweb-edu", "Hugging Face dataset (Hub id or local folder)")
    name: str = option("sample-10BT", "the dataset's config, e.g. sample-100BT")
    split: str = option("train", "the dataset split to read")
    text_column: str = option("text", "column holding the documents")
    input: list = option((), "local files, globs or folders (.txt = one document per file, .jsonl/.json, "
                             ".parquet) instead of --dataset")  # a tuple: a field's default must be immutable
    out_dir: str = option("edu_fineweb10B", "folder for the shards and manifest.json")
    prefix: str = option("edufineweb", "shard names: {prefix}_{val|train}_{index:06d}.npy")
    shard_size: int = option(100_000_000, "tokens per train shard")
    val_tokens: int = option(0, "tokens in the val shard (0 = shard_size)")
    num_proc: int = option(0, "tokenizer processes (0 = all cores)")
    format: str = option("npy", "npy (np.save of uint16) or bin (llm.c: 256-int32 header + uint16)")
    streaming: bool = option(False, "tokenize while downloading, without caching the dataset on disk first")


def parse_args(argv=None):
    """Flags from FinewebConfig's fields; the preset supplies every value not given on the command line."""
    parser = config_parser(FinewebConfig, "fineweb.py", __doc__, show_defaults=False)
    parser.epilog = ("Flags not given take the preset's values; with --input and no --preset, --out_dir and "
                     "--prefix default to 'data'.")
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", FinewebConfig.preset)
    if preset not in PRESETS:
        parser.error(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
    defaults = PRESETS[preset]
    if "input" in given and "preset" not in given:
        defaults = dict(out_dir="data", prefix="data")  # local files: nothing of the default preset applies
    cfg = FinewebConfig(**{**defaults, **given})
    if cfg.val_tokens == 0:
        cfg.val_tokens = cfg.shard_size
    if cfg.num_proc == 0:
        cfg.num_proc = os.cpu_count()
    for name in ("shard_size", "val_tokens", "num_proc"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name} {getattr(cfg, name)}: must be a positive integer")
    if cfg.format not in ("npy", "bin"):
        parser.error(f"--format {cfg.format}: expected npy or bin")
    if "/" in cfg.prefix or os.sep in cfg.prefix:
        parser.error(f"--prefix {cfg.prefix}: a path separator in a shard name; give the folder as --out_dir")
    word = SPLIT_WORD.search(cfg.prefix)  # find_shards' split words
    if word:
        other = "val_000000" if word[1] == "train" else "train_000001"
        parser.error(f"--prefix {cfg.prefix}: holds the split word {word[1]}, so that a shard name such "
                     f"as {cfg.prefix}_{other}.{cfg.format} would hold both splits; pick one without train "
                     f"or val")
    return cfg


# -----------------------------------------------------------------------------
# Reading the corpus: a Hugging Face dataset, or local files through datasets' own readers


def input_files(cfg):
    """The files named by --input (files, globs, folders, or URLs), in order, each once; none in --out_dir,
    which this run writes (a rerun would read its manifest.json as a document)."""
    out_dir, files = os.path.realpath(cfg.out_dir), []
    for pattern in cfg.input:
        if pattern.startswith(("http://", "https://")):
            files.append(pattern)
            continue
        if os.path.isdir(pattern):
            found = sorted(p for p in glob.glob(os.path.join(glob.escape(pattern), "**", "*"), recursive=True)
                           if os.path.splitext(p)[1] in READERS)
        elif os.path.isfile(pattern):  # a name like part[1].jsonl is a file, not a pattern
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        ours = [p for p in found if os.path.commonpath([os.path.realpath(p), out_dir]) == out_dir]
        found = [p for p in found if p not in ours]
        if not found:
            raise UserError(f"--input {pattern}: " + (
                f"only files in --out_dir {cfg.out_dir}, which this run writes" if ours
                else "no such file, or no .txt/.jsonl/.json/.parquet files in it"))
        for p in found:
            if os.path.splitext(p)[1] not in READERS:
                raise UserError(f"--input {p}: cannot read {os.path.splitext(p)[1] or 'extensionless'} "
                                f"files; expected .txt (one document per file), .jsonl/.json or .parquet")
            if READERS[os.path.splitext(p)[1]] != "text" and os.path.getsize(p) == 0:
                raise UserError(f"--input {p}: an empty file, which holds no documents; "
                                f"fill it or leave it out")
        files += [p for p in found if p not in files]
    return files


def non_utf8_file(files):
    """(path, offset, byte) of the first byte that is not UTF-8 in the local text and JSON files, or None."""
    for path in files:
        if "://" in path or READERS[os.path.splitext(path)[1]] == "parquet":
            continue
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    return path, offset + e.start, chunk[e.start]
                offset += len(chunk)


def unreadable(cfg, e, doing):
    """The error for data datasets could not read; a file that is not UTF-8 is named, with its bad byte."""
    found = non_utf8_file(input_files(cfg)) if cfg.input and isinstance(e, UnicodeDecodeError) else None
    if found:
        path, offset, byte = found
        return UserError(f"{path}: not UTF-8 text (byte 0x{byte:02x} at offset {offset:,}); "
                         f"convert it to UTF-8 or leave it out of --input")
    return UserError(f"{doing}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def document_source(cfg, doc):
    """Where document doc (counted from 0 over all of --input) comes from, as "row R of FILE"."""
    if not cfg.input:
        return f"row {doc + 1:,} of --dataset {cfg.dataset}"
    import datasets
    for path in input_files(cfg):
        reader = READERS[os.path.splitext(path)[1]]
        rows = 1 if reader == "text" else sum(1 for _ in datasets.load_dataset(
            reader, data_files=[path if "://" in path else glob.escape(path)], split="train", streaming=True))
        if doc < rows:
            return f"row {doc + 1:,} of {path}"
        doc -= rows


def describe_source(cfg):
    """What the shards are made of, for manifest.json: a rerun must read the same thing to resume."""
    source = dict(split=cfg.split, text_column=cfg.text_column)
    if cfg.input:
        source["input"] = [[f, None if "://" in f else os.path.getsize(f)] for f in input_files(cfg)]
    else:
        source.update(dataset=cfg.dataset, name=cfg.name)
    return source


def load_corpus(cfg):
    """The documents as a datasets.Dataset (random access) or, with --streaming, an IterableDataset."""
    import datasets
    try:
        if cfg.input:
            files = input_files(cfg)
            parts, start = [], 0
            while start < len(files):  # runs of files of one type, keeping the order the user gave
                reader = READERS[os.path.splitext(files[start])[1]]
                end = start + 1
                while end < len(files) and READERS[os.path.splitext(files[end])[1]] == reader:
                    end += 1
                kwargs = dict(sample_by="document") if reader == "text" else {}
                # datasets globs them
                data_files = [f if "://" in f else glob.escape(f) for f in files[start:end]]
                parts.append(datasets.load_dataset(reader, data_files=data_files, split="train",
                                                   streaming=cfg.streaming, **kwargs))
                start = end
            ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            where = "--input"
        else:
            ds = datasets.load_dataset(cfg.dataset, name=cfg.name or None, split=cfg.split,
                                       streaming=cfg.streaming)
            where = f"--dataset {cfg.dataset}"
        first = next(iter(ds), None) if cfg.streaming else (ds[0] if len(ds) else None)
    except Exception as e:  # network, missing files, unreadable data: datasets says what
        raise unreadable(cfg, e.__cause__ or e,
                         f"cannot load {', '.join(cfg.input) or cfg.dataset}") from None
    if first is None:
        raise UserError(f"{where} holds no documents")
    columns = list(first)
    if cfg.text_column not in columns:
        raise UserError(f"{where} has no column {cfg.text_column!r} (columns: {', '.join(columns)}); "
                        f"name the text column with --text_column")
    return ds.select_columns([cfg.text_column])


# -----------------------------------------------------------------------------
# Tokenizing: worker processes turn batches of documents into one uint16 array each

_worker = {}


class NotText(Exception):
    """A worker met a document whose text is not a string: (its index in the task, its repr)."""


def init_worker(enc, ds, text_column, parent, lock_fd):
    """A worker's state. It gets the tokenizer from the main process (pickled under spawn): built once.
    A forked worker gets a copy of the --out_dir lock's descriptor (lock_fd), which would keep the folder
    locked after its parent died: it closes it, and dies with its parent (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before that
        os._exit(1)
    if lock_fd is not None:
        os.close(lock_fd)
    _worker.update(enc=enc, eot=np.array([enc.eot_token], dtype=np.uint32), ds=ds, text_column=text_column)


def tokenize_texts(texts):
    """(tokens, lengths): each document as <|endoftext|> + its tokens, concatenated, and each one's
    token count."""
    enc, parts, lengths = _worker["enc"], [], []
    for text in texts:
        if not isinstance(text, str):
            raise NotText(len(lengths), repr(text))
        # encode_ordinary(text) (no special tokens), straight into an array: ~1.7x faster than via a list
        ids = enc.encode_to_numpy(text, disallowed_special=())
        parts += (_worker["eot"], ids)
        lengths.append(len(ids) + 1)
    return np.concatenate(parts).astype(np.uint16), np.array(lengths, dtype=np.int64)


def tokenize_rows(rows):
    """Tokenize dataset rows [start, end): the worker reads them itself, so only tokens cross processes."""
    start, end = rows
    return tokenize_texts(_worker["ds"][start:end][_worker["text_column"]])


def ordered_imap(pool, fn, tasks, window):
    """pool.imap, but with at most `window` tasks in flight, so memory stays bounded on any corpus size."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def batches(ds, first_doc, cfg):
    """Tasks from document first_doc on: row ranges of a Dataset, or lists of texts of a stream."""
    if not cfg.streaming:
        for start in range(first_doc, len(ds), DOCS_PER_TASK):
            yield start, min(start + DOCS_PER_TASK, len(ds))
        return
    rows, texts = iter(ds.skip(first_doc)), []
    for doc in itertools.count(first_doc):
        try:
            row = next(rows)
        except StopIteration:
            break
        except Exception as e:  # a stream is parsed as it is read, so bad data surfaces here
            raise unreadable(cfg, e, f"reading document {doc:,} failed") from None
        texts.append(row[cfg.text_column])
        if len(texts) == DOCS_PER_TASK:
            yield texts
            texts = []
    if texts:
        yield texts


# -----------------------------------------------------------------------------
# Writing: cut the token stream into shards, each written atomically and recorded in the manifest


def write_shard(path, tokens, fmt):
    """Write a shard under path + ".tmp", renamed once manifest.json lists it; returns that name."""
    def write(f):
        if fmt == "bin":
            header = np.zeros(LLMC_HEADER_INTS, dtype=np.int32)
            header[:3] = (LLMC_MAGIC, LLMC_VERSION, len(tokens))
            f.write(header.tobytes())
            f.write(tokens.tobytes())
        else:
            np.save(f, tokens)
    tmp = path + ".tmp"
    write_synced(tmp, write)
    return tmp


class ShardWriter:
    """Fills one shard buffer from the token stream; a full buffer becomes the next shard. Until the
    corpus has shown it holds the val shard plus the smallest train split, shards wait under their
    temporary names, so a corpus too small to train on leaves nothing behind."""

    def __init__(self, cfg, manifest):
        self.cfg, self.manifest = cfg, manifest
        self.buf = np.empty(max(cfg.shard_size, cfg.val_tokens), dtype=np.uint16)
        self.fill = 0
        self.pending = []  # (temporary path, manifest entry) of shards written but not yet renamed
        self.train_tokens = 0
        self.big_enough = bool(manifest["shards"])

    def index(self):
        return len(self.manifest["shards"]) + len(self.pending)

    def add(self, tokens, lengths, first_doc, skip):
        """Append documents first_doc, first_doc+1, ... (their tokens from `skip` on)."""
        pos = skip
        while pos < len(tokens):
            capacity = self.cfg.val_tokens if self.index() == 0 else self.cfg.shard_size
            take = min(capacity - self.fill, len(tokens) - pos)
            self.buf[self.fill: self.fill + take] = tokens[pos: pos + take]
            self.fill += take
            pos += take
            if self.index() > 0:
                self.train_tokens += take
                self.big_enough |= self.train_tokens >= MIN_TRAIN_TOKENS
            if self.fill == capacity:
                ends = np.cumsum(lengths)
                # documents wholly in this shard or before
                done = int(np.searchsorted(ends, pos, side="right"))
                self.flush(first_doc + done, pos - (int(ends[done - 1]) if done else 0))
            if self.big_enough:
                self.finalize()

    def flush(self, next_doc, skip_tokens):
        """Write the buffer as the next shard; the stream continues at token skip_tokens of next_doc."""
        split = "val" if self.index() == 0 else "train"
        name = f"{self.cfg.prefix}_{split}_{self.index():06d}.{self.cfg.format}"
        tmp = write_shard(os.path.join(self.cfg.out_dir, name), self.buf[:self.fill], self.cfg.format)
        self.pending.append((tmp, dict(name=name, split=split, tokens=self.fill, bytes=os.path.getsize(tmp),
                                       next_doc=next_doc, skip_tokens=skip_tokens)))
        self.fill = 0

    def finalize(self):
        """Record the pending shards in the manifest and rename them to their final names. In that order:
        a shard the manifest lists but that is missing on a rerun is redone, while a final-named shard
        the manifest did not list would block the rerun."""
        while self.pending:
            tmp, entry = self.pending[0]
            save_manifest(self.cfg.out_dir, dict(self.manifest, shards=self.manifest["shards"] + [entry]))
            self.manifest["shards"].append(entry)
            os.replace(tmp, tmp[:-len(".tmp")])
            self.pending.pop(0)

    def discard(self):
        for tmp, _ in self.pending:
            os.remove(tmp)
        self.pending = []

    def finish(self, n_docs):
        """The stream ended after n_docs documents: write the last, partial shard and mark the run done."""
        if not self.big_enough:
            total = self.fill + sum(entry["tokens"] for _, entry in self.pending)
            self.discard()
            raise UserError(f"the corpus has {total:,} tokens, too few for --val_tokens "
                            f"{self.cfg.val_tokens:,} and a train split of at least {MIN_TRAIN_TOKENS} "
                            f"tokens (a token and its target); set --val_tokens to at most "
                            f"{total - MIN_TRAIN_TOKENS:,} or add text")
        if self.fill:
            self.flush(n_docs, 0)
        self.finalize()
        self.manifest.update(docs=n_docs, done=True)
        save_manifest(self.cfg.out_dir, self.manifest)
        largest = max(s["tokens"] for s in self.manifest["shards"] if s["split"] == "train")
        # train_gpt2.py slices micro-batches from one shard at a time
        if largest < DEFAULT_MICRO_BATCH_TOKENS:
            print(f"note: the largest train shard has {largest:,} tokens, fewer than one micro-batch of "
                  f"train_gpt2.py's defaults (64 x 1024 + 1 = {DEFAULT_MICRO_BATCH_TOKENS:,}): train with "
                  f"--micro_batch_size B and --seq_len T such that B x T + 1 <= {largest:,}")


def save_manifest(out_dir, manifest):
    tmp = os.path.join(out_dir, "manifest.json.tmp")
    write_synced(tmp, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))


def open_manifest(cfg, source, enc):
    """manifest.json of out_dir, its verified shards only; a fresh one for a new out_dir."""
    settings = dict(source=source,
                    tokenizer=f"tiktoken gpt2, <|endoftext|> ({enc.eot_token}) before every document",
                    format=cfg.format, prefix=cfg.prefix, shard_size=cfg.shard_size,
                    val_tokens=cfg.val_tokens)
    path = os.path.join(cfg.out_dir, "manifest.json")
    if not os.path.exists(path):
        shards = [n for n in os.listdir(cfg.out_dir) if n.endswith((".npy", ".bin"))]
        if shards:
            raise UserError(f"--out_dir {cfg.out_dir} holds shards ({shards[0]}, ...) but no manifest.json, "
                            f"so they are not this run's; choose another --out_dir or empty it")
        return dict(settings, shards=[], docs=None, done=False)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); "
                        f"delete it and the shards beside it to start over") from None
    for key, value in settings.items():
        if manifest.get(key) != value:
            raise UserError(f"--out_dir {cfg.out_dir} holds shards of a different corpus or settings ({key}: "
                            f"{manifest.get(key)} there, {value} now); choose another --out_dir or empty it")
    for i, shard in enumerate(manifest["shards"]):
        path = os.path.join(cfg.out_dir, shard["name"])
        if not (os.path.isfile(path) and os.path.getsize(path) == shard["bytes"]):
            print(f"{shard['name']} is missing or damaged: redoing it and the shards after it")
            del manifest["shards"][i:]
            manifest["done"] = False
            break
    return manifest


# -----------------------------------------------------------------------------
# Reading the shards, for train_gpt2.py: a split's files, each memory-mapped


def open_shard(path):
    """Memory-map one shard as a 1-D uint16 array; nothing is read until a batch is sliced out."""
    if path.endswith(".bin"):
        header = np.fromfile(path, dtype=np.int32, count=LLMC_HEADER_INTS)
        if len(header) < LLMC_HEADER_INTS or header[0] != LLMC_MAGIC:
            raise UserError(f"{path}: not an llm.c token shard (no magic number {LLMC_MAGIC} in its header)")
        if header[1] != LLMC_VERSION:
            raise UserError(f"{path}: llm.c shard version {header[1]}, expected {LLMC_VERSION} "
                            f"(uint16 GPT-2 tokens; version 2 holds uint32 Llama-3 tokens)")
        n_tokens, n_bytes = int(header[2]), os.path.getsize(path)
        if n_bytes != 4 * LLMC_HEADER_INTS + 2 * n_tokens:
            raise UserError(f"{path}: truncated: header says {n_tokens} tokens, file has {n_bytes} bytes")
        return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * LLMC_HEADER_INTS, shape=(n_tokens,))
    try:
        tokens = np.lib.format.open_memmap(path, mode="r")  # .npy only (an .npz is refused), no pickles
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npy token shard ({e})") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"{path}: holds a {tokens.ndim}-D {tokens.dtype} array, expected 1-D uint16 tokens "
                        f"(np.save of a uint16 array, as fineweb.py writes)")
    return tokens


def find_shards(data_dir, split):
    """The paths of a split's shards in data_dir, in name order; in a folder fineweb.py made, the shards
    its manifest.json lists must be exactly those there."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir}: no such folder; make token shards with `python fineweb.py`")
    # A shard's split is the split word right before its number, as fineweb.py ({prefix}_{split}_000001.npy)
    # and llm.c (fineweb_train_000001.bin, tiny_shakespeare_val.bin) name them
    splits = {}
    for n in sorted(os.listdir(data_dir)):
        found = re.search(r"(?<![a-z])(train|val)(?:[_.-]?\d+)?\.(?:npy|bin)$", n)
        if not found:
            continue
        if len(set(SPLIT_WORD.findall(n))) > 1:
            raise UserError(f"{os.path.join(data_dir, n)}: its name holds both train and val, so its split "
                            f"is unclear; rename it, or remake the folder with a fineweb.py --prefix "
                            f"holding neither")
        splits[n] = found[1]
    manifest = os.path.join(data_dir, "manifest.json")  # fineweb.py's record of its run; llm.c's have none
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                record = json.load(f)
        except (OSError, ValueError):
            raise UserError(f"{manifest}: unreadable; rerun the fineweb.py command that made "
                            f"{data_dir}/") from None
        if isinstance(record, dict) and record.get("done") is False:  # fineweb.py's, of a run stopped partway
            raise UserError(f"--data_dir {data_dir}: fineweb.py has not finished writing it (its manifest "
                            f"says so); rerun the same fineweb.py command, which resumes where it stopped")
        if isinstance(record, dict) and "shards" in record:  # fineweb.py's: the shards are those it lists
            listed = {e["name"]: e["bytes"] for e in record["shards"]}
            for n in sorted(set(listed) | set(splits)):
                path = os.path.join(data_dir, n)
                size = os.path.getsize(path) if os.path.isfile(path) else None
                if n not in listed:
                    raise UserError(f"--data_dir {data_dir}: {n} is not a shard its manifest.json lists "
                                    f"(fineweb.py did not write it there); move it out")
                if size != listed[n]:
                    what = "is missing" if size is None else f"has {size} bytes, not {listed[n]}"
                    raise UserError(f"--data_dir {data_dir}: {n}, listed in its manifest.json, {what}; "
                                    f"rerun the fineweb.py command that made the folder, which redoes it")
    names = [n for n in splits if splits[n] == split]
    if not names:
        raise UserError(f"no {split} shards in {data_dir}/, such as edufineweb_{split}_000001.npy or "
                        f"llm.c's *_{split}_*.bin; make them with `python fineweb.py`")
    return [os.path.join(data_dir, n) for n in names]


def main(argv=None):
    cfg = parse_args(argv)
    try:
        enc, source = gpt2_tokenizer(), describe_source(cfg)  # bad input fails here, before out_dir is made
        with hold_folder(cfg.out_dir, "--out_dir") as lock:
            tokenize(cfg, enc, source, lock.fileno() if mp.get_start_method() == "fork" else None)
    except UserError as e:
        sys.exit(f"fineweb.py: error: {e}")


def tokenize(cfg, enc, source, lock_fd=None):
    from tqdm import tqdm
    manifest = open_manifest(cfg, source, enc)
    if manifest["done"]:
        print(f"{cfg.out_dir}/ is complete: {len(manifest['shards'])} shards, "
              f"{sum(s['tokens'] for s in manifest['shards']):,} tokens")
        return
    first_doc, skip = (manifest["shards"][-1]["next_doc"], manifest["shards"][-1]["skip_tokens"]) \
        if manifest["shards"] else (0, 0)
    if manifest["shards"]:
        print(f"resuming after {manifest['shards'][-1]['name']} (document {first_doc:,})")
    ds = load_corpus(cfg)
    writer = ShardWriter(cfg, manifest)
    tasks = batches(ds, first_doc, cfg)
    fn = tokenize_texts if cfg.streaming else tokenize_rows
    initargs = (enc, None if cfg.streaming else ds, cfg.text_column, os.getpid(), lock_fd)
    progress = tqdm(total=None if cfg.streaming else len(ds), initial=first_doc, unit="docs",
                    desc=f"tokenizing into {cfg.out_dir}/", smoothing=0.05)
    n_tokens, t0 = 0, time.time()
    # Workers even for num_proc 1, so that reading and writing in this process overlap the tokenizing.
    pool = mp.Pool(cfg.num_proc, initializer=init_worker, initargs=initargs)
    try:
        results = ordered_imap(pool, fn, tasks, window=2 * cfg.num_proc)
        doc = first_doc
        for tokens, lengths in results:
            writer.add(tokens, lengths, doc, skip)
            n_tokens += len(tokens) - skip
            doc, skip = doc + len(lengths), 0
            progress.update(len(lengths))
            rate = n_tokens / max(time.time() - t0, 1e-6)
            progress.set_postfix_str(f"{n_tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        writer.finish(doc)
    except Exception as e:
        writer.discard()
        if isinstance(e, NotText):  # in the task that starts at document doc
            raise UserError(f"{document_source(cfg, doc + e.args[0])}: its --text_column {cfg.text_column!r} "
                            f"is {e.args[1]}, not text") from None
        if disk_full(e):
            raise UserError(f"disk full in {cfg.out_dir}/: the {len(manifest['shards'])} shards "
                            f"manifest.json lists are kept; free space, then rerun this command, "
                            f"which resumes after them") from None
        raise
    finally:
        progress.close()
        pool.terminate()
    print(f"wrote {len(manifest['shards'])} shards to {cfg.out_dir}/: "
          f"{sum(s['tokens'] for s in manifest['shards']):,} tokens from {manifest['docs']:,} documents")


if __name__ == "__main__":
    main()
