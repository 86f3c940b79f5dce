"""HellaSwag, all of it: the data, its rendering and scoring, and the command line that evaluates a model.

    python hellaswag.py                                   # OpenAI's gpt2 (124M) on the 10,042 val tasks
    python hellaswag.py --model log/model_19073.pt        # one of train_gpt2.py's checkpoints
    python hellaswag.py --model gpt2-xl --limit 500       # the first 500 tasks only

Each task is rendered as 4 rows, the context's tokens followed by one ending's (enc.encode(ctx), then
enc.encode(" " + ending)); the model scores an ending by the cross-entropy of its tokens given
everything before them. `acc` picks the ending with the lowest summed loss, `acc_norm` the lowest mean
loss per token, as build-nanogpt does. The last line printed is `acc: 0.xxxx acc_norm: 0.xxxx n: N`.

Reference with this scoring (build-nanogpt's published run on rowanz/hellaswag's val file): gpt2 (124M)
acc 0.2859, acc_norm 0.2955. The tests' excerpt (tests/data, the first 200 val tasks) comes from a copy
with the WikiHow markers ([header], [step], ...) stripped from its contexts (data/SOURCES.md), so GPT-2
scores close to, not exactly, these numbers on such a copy.

The data (hellaswag_{train,val,test}.jsonl, rowanz/hellaswag on GitHub) is downloaded on first use to
$HELLASWAG_DIR, by default ~/.cache/gpt2-repro/hellaswag; $HELLASWAG_URL overrides the download URL.
The test split's labels are not public, so only train and val can be scored. train_gpt2.py imports the
scoring from here for its evals (each rank scoring its share); this file imports train_gpt2.py only in
main(), to load a model, so that neither loads the other twice.
"""

import contextlib
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import (PRETRAINED, UserError, config_parser, gpt2_tokenizer, option, require_gpt2_vocab,
                    write_synced)


# -----------------------------------------------------------------------------
# The data: one JSON task per line, ctx, endings[4] and label; downloaded once


def hellaswag_cache():
    return os.environ.get("HELLASWAG_DIR") or os.path.expanduser("~/.cache/gpt2-repro/hellaswag")


def hellaswag_file(split, data_dir=""):
    """hellaswag_{split}.jsonl in data_dir, which must hold it, or in the cache, downloaded if missing into a
    temp file of this process's, renamed when complete: no truncated file is ever left at the path."""
    name = f"hellaswag_{split}.jsonl"
    path = os.path.join(data_dir or hellaswag_cache(), name)
    if os.path.isfile(path):
        return path
    if data_dir:
        raise UserError(f"{path}: no such file (without --data_dir it is downloaded to {hellaswag_cache()})")
    import urllib.request
    from tqdm import tqdm
    url = os.environ.get("HELLASWAG_URL", "https://raw.githubusercontent.com/rowanz/hellaswag/master/data")
    url = url.rstrip("/") + "/" + name

    def download(f):
        with urllib.request.urlopen(url, timeout=60) as r:
            total = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                while chunk := r.read(1 << 20):
                    bar.update(f.write(chunk))
        if total and f.tell() != total:
            raise OSError(f"got {f.tell()} of {total} bytes")

    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_synced(tmp, download)
        os.replace(tmp, path)
    except Exception as e:  # urllib raises OSError, ValueError and http.client's own exceptions
        raise UserError(f"{path}: not downloaded yet, and downloading it from {url} failed "
                        f"({type(e).__name__}: {e}); connect to the network, or pass --data_dir a folder "
                        f"that holds it") from None
    return path


def check_example(ex):
    """What is wrong with a parsed line, or None if it is a task we can score."""
    if not isinstance(ex, dict):
        return f"expected a JSON object, got {type(ex).__name__}"
    missing = [k for k in ("ctx", "endings", "label") if k not in ex]
    if missing:
        return "no " + ", ".join(missing) + " field"
    if not isinstance(ex["ctx"], str) or not ex["ctx"]:
        return "ctx must be a non-empty string"  # else an ending's first token would have nothing before it
    endings = ex["endings"]
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        return f"endings must be a list of 4 strings, got {json.dumps(endings)[:80]}"
    if type(ex["label"]) is not int or not 0 <= ex["label"] < 4:
        return f"label must be 0, 1, 2 or 3, got {json.dumps(ex['label'])}"


def iterate_examples(split, data_dir=""):
    """Yield the tasks of a split (train or val) as dicts, in file order, checking each line; a file of no
    task is an error (a score over none would divide by zero)."""
    if split not in ("train", "val"):
        raise UserError(f"split {split!r}: expected train or val (HellaSwag's test labels are not public)")
    path = hellaswag_file(split, data_dir)
    empty = True
    with open(path, "rb") as f:  # bytes: json.loads reports bad UTF-8 as a ValueError, like bad JSON
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path} line {n}: not valid JSON ({e})") from None
            problem = check_example(ex)
            if problem:
                raise UserError(f"{path} line {n}: {problem}")
            empty = False
            yield ex
    if empty:
        raise UserError(f"{path}: holds no tasks")


# -----------------------------------------------------------------------------
# Scoring: 4 rows per task, its context then one ending; acc picks the ending of the lowest summed loss,
# acc_norm the lowest mean loss per token, as build-nanogpt does


def render_example(example, enc):
    """(tokens (4, T) long, mask (4, T) long, 1 on each row's ending tokens, label); rows padded with 0."""
    ctx = enc.encode(example["ctx"])
    endings = [enc.encode(" " + e) for e in example["endings"]]  # GPT-2's BPE folds the space into the word
    tokens = nn.utils.rnn.pad_sequence([torch.tensor(ctx + end) for end in endings], batch_first=True)
    mask = nn.utils.rnn.pad_sequence([torch.tensor([0] * len(ctx) + [1] * len(end)) for end in endings],
                                     batch_first=True)
    return tokens, mask, example["label"]


def longest_example(examples, enc):
    """Tokens in the longest rendered example: the pad_to that fits them all."""
    return max((render_example(ex, enc)[0].size(1) for ex in examples), default=1)


def iterate_losses(model, rendered, device="cpu", batch_size=16, autocast=contextlib.nullcontext(),
                   pad_to=None, world_size=1):
    """Yield (sums (4,), means (4,)): each rendered (tokens, mask, label)'s endings' summed and mean
    cross-entropy (float32, on the CPU), batch_size examples per forward, padded (attention is causal, so
    padding changes nothing); with pad_to, every forward is (batch_size * 4, pad_to): one compiled shape."""
    # Under FSDP every forward all-gathers the weights, which every rank must join: a rank whose share is
    # one example short may be a batch short, and then runs that batch on padding (so needs pad_to).
    batches = torch.tensor(math.ceil(len(rendered) / batch_size), device=device)
    if world_size > 1:
        dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    for start in range(0, batches.item() * batch_size, batch_size):
        batch = rendered[start:start + batch_size]
        width = pad_to or max(t.size(1) for t, _, _ in batch)
        tokens = torch.zeros(batch_size * 4 if pad_to else len(batch) * 4, width, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, (t, m, _) in enumerate(batch):
            if t.size(1) > width:
                raise UserError(f"an example of {t.size(1)} tokens is longer than pad_to={pad_to}")
            tokens[4 * i:4 * i + 4, :t.size(1)], mask[4 * i:4 * i + 4, :t.size(1)] = t, m
        tokens, scored = tokens.to(device), mask[:, 1:].bool().to(device)  # position t's logits predict t+1
        with torch.no_grad(), autocast:
            logits = model(tokens)[0]  # our GPT returns (logits, loss); transformers' models, logits first
        ce = F.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored], reduction="none")
        sums = torch.zeros(scored.shape, device=ce.device).masked_scatter_(scored, ce).sum(1)
        n = 4 * len(batch)
        yield from zip(sums[:n].view(-1, 4).cpu(), (sums / scored.sum(1))[:n].view(-1, 4).cpu())


def score(model, examples, enc, device="cpu", batch_size=16, autocast=contextlib.nullcontext(), pad_to=None,
          progress=None, world_size=1):
    """(n_correct, n_correct_norm, n) over the example dicts, tokenized with enc (GPT-2's BPE); with
    world_size > 1 (and pad_to) each rank scores its share, and the counts are summed. progress: a tqdm bar
    to advance with the running acc_norm (an estimate until the end without pad_to: shortest tasks first)."""
    rendered = [render_example(ex, enc) for ex in examples]
    if pad_to is None:  # batches of like lengths waste less on padding (27% fewer positions on val, batch 16)
        rendered.sort(key=lambda r: r[0].size(1))
    n = correct = correct_norm = 0
    losses = iterate_losses(model, rendered, device, batch_size, autocast, pad_to, world_size)
    for (sums, means), (_, _, label) in zip(losses, rendered, strict=True):
        n += 1
        correct += int(sums.argmin()) == label
        correct_norm += int(means.argmin()) == label
        if progress is not None:
            progress.set_postfix(acc_norm=f"{correct_norm / n:.4f}", refresh=False)
            progress.update()
    counts = torch.tensor([correct, correct_norm, n], device=device)
    if world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return tuple(counts.tolist())


def hellaswag_share(data_dir, limit, enc, model, rank, world_size):
    """This rank's share of the HellaSwag val examples, and the longest rendered example's length."""
    require_gpt2_vocab(model, "--hellaswag: the model")  # the examples are GPT-2 tokens
    try:
        if rank == 0:
            hellaswag_file("val", data_dir)  # downloads it on first use, once
        if world_size > 1:
            dist.barrier()
        examples = list(iterate_examples("val", data_dir))[:limit or None]
    except UserError as e:  # missing, unreachable or corrupt data
        raise UserError(f"--hellaswag: {e}") from None
    longest = longest_example(examples, enc)
    if longest > model.config.block_size:
        raise UserError(f"--hellaswag: the longest HellaSwag example has {longest} tokens, more than the "
                        f"model's block_size {model.config.block_size}; use --hellaswag 0")
    return examples[rank::world_size], longest


# -----------------------------------------------------------------------------
# The command line


@dataclass
class HellaswagConfig:
    model: str = option("gpt2", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder, or a "
                                "train_gpt2.py checkpoint (log/model_NNNNN.pt, or log: its newest)")
    split: str = option("val", "train or val")
    data_dir: str = option("", "folder holding hellaswag_{split}.jsonl ('' = $HELLASWAG_DIR or "
                               "~/.cache/gpt2-repro/hellaswag, downloaded there on first use)")
    limit: int = option(0, "score the first N tasks only (0 = all)")
    batch_size: int = option(16, "tasks per forward pass (4 rows each)")
    device: str = "auto"  # help: common.SHARED_FLAGS_HELP
    dtype: str = "auto"
    compile: str | bool = "auto"


def parse_args(argv=None):
    parser = config_parser(HellaswagConfig, "hellaswag.py", __doc__)
    cfg = HellaswagConfig(**vars(parser.parse_args(argv)))
    checks = [("split", cfg.split in ("train", "val"),
               "expected train or val (HellaSwag's test labels are not public)"),
              ("limit", cfg.limit >= 0, "must be >= 0"),
              ("batch_size", cfg.batch_size > 0, "must be a positive integer"),
              ("model", cfg.model in PRETRAINED or os.path.isdir(cfg.model) or os.path.isfile(cfg.model),
               "expected " + ", ".join(PRETRAINED) + ", a Hugging Face GPT-2 folder, a model_NNNNN.pt "
                                                     "checkpoint or a train_gpt2.py --log_dir")]
    for name, ok, allowed in checks:
        if not ok:
            parser.error(f"--{name} {getattr(cfg, name)}: {allowed}")
    return cfg


def main(argv=None):
    # Here, not at the top: train_gpt2.py imports this file for its evals
    from train_gpt2 import load_model, resolve_system
    from tqdm import tqdm
    cfg = parse_args(argv)
    try:
        device, _, use_compile, autocast = resolve_system(cfg.device, cfg.dtype, cfg.compile)
        enc = gpt2_tokenizer()
        # Read the data before loading weights, so a bad --data_dir fails in a second, not after a download.
        examples = list(itertools.islice(iterate_examples(cfg.split, cfg.data_dir), cfg.limit or None))
        try:
            model = require_gpt2_vocab(load_model(cfg.model), cfg.model)
        except UserError as e:  # a bad checkpoint, not a GPT-2 folder, no network for the Hub
            raise UserError(f"--model {e}") from None
        model.to(device).eval()
        longest = longest_example(examples, enc)
        if longest > model.config.block_size:
            raise UserError(f"a task has {longest} tokens, more than the model's block_size "
                            f"{model.config.block_size}")
        pad_to = None
        if use_compile:  # padded to the longest task, every forward has one shape: compiled once
            model, pad_to = torch.compile(model, dynamic=False), longest
        with tqdm(total=len(examples), desc=f"hellaswag {cfg.split}", unit="task") as bar:
            correct, correct_norm, n = score(model, examples, enc, device, cfg.batch_size, autocast, pad_to,
                                             progress=bar)
    except UserError as e:
        sys.exit(f"hellaswag.py: error: {e}")
    print(f"acc: {correct / n:.4f} acc_norm: {correct_norm / n:.4f} n: {n}", flush=True)


if __name__ == "__main__":
    main()
