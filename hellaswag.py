"""Evaluate a GPT-2 model on HellaSwag: pick the most likely of 4 endings for each context.

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
The test split's labels are not public, so only train and val can be scored.
"""

import contextlib
import dataclasses
import itertools
import json
import os
import sys
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
SCORED_SPLITS = ("train", "val")


class HellaswagError(ValueError):
    """Bad flags, a missing or corrupt data file: main() prints it as one line and exits 1."""


# -----------------------------------------------------------------------------
# The data: one JSON task per line (ctx, endings[4], label), downloaded once into a cache folder


def default_data_dir():
    return os.environ.get("HELLASWAG_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-repro", "hellaswag")


def download(url, path):
    """Fetch url to path, through a temp file renamed when complete: an interrupted download leaves
    no truncated file behind, and ranks downloading at once each write their own temp file."""
    from tqdm import tqdm
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := r.read(1 << 20):
                    bar.update(f.write(chunk))
            if total and f.tell() != total:
                raise OSError(f"got {f.tell()} of {total} bytes")
        os.replace(tmp, path)
    except Exception as e:  # urllib raises OSError, ValueError and http.client's own exceptions
        raise HellaswagError(f"{path}: not downloaded yet, and downloading it from {url} failed ({type(e).__name__}: "
                             f"{e}); connect to the network, or pass --data_dir a folder that holds it") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def data_file(split, data_dir=None):
    """hellaswag_{split}.jsonl in data_dir, which must hold it, or in the cache, downloaded if missing."""
    name = f"hellaswag_{split}.jsonl"
    if data_dir:
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise HellaswagError(f"{path}: no such file (without --data_dir it is downloaded to {default_data_dir()})")
        return path
    path = os.path.join(default_data_dir(), name)
    if not os.path.isfile(path):
        download(os.environ.get("HELLASWAG_URL", DATA_URL).rstrip("/") + "/" + name, path)
    return path


def check_example(ex):
    """What is wrong with a parsed line, or None if it is a task we can score."""
    if not isinstance(ex, dict):
        return f"expected a JSON object, got {type(ex).__name__}"
    missing = [k for k in ("ctx", "endings", "label") if k not in ex]
    if missing:
        return "no " + ", ".join(missing) + " field"
    if not isinstance(ex["ctx"], str) or not ex["ctx"]:
        return "ctx must be a non-empty string"  # else an ending's first token would have nothing to predict it
    endings = ex["endings"]
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        return f"endings must be a list of 4 strings, got {json.dumps(endings)[:80]}"
    if type(ex["label"]) is not int or not 0 <= ex["label"] < 4:
        return f"label must be 0, 1, 2 or 3, got {json.dumps(ex['label'])}"
    return None


def iterate_examples(split, data_dir=None):
    """Yield the tasks of a split (train or val) as dicts, in file order, checking each line."""
    if split not in SCORED_SPLITS:
        raise HellaswagError(f"split {split!r}: expected train or val (HellaSwag's test labels are not public)")
    path = data_file(split, data_dir)
    with open(path, "rb") as f:  # bytes: json.loads reports bad UTF-8 as a ValueError, like bad JSON
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as e:
                raise HellaswagError(f"{path} line {n}: not valid JSON ({e})") from None
            problem = check_example(ex)
            if problem:
                raise HellaswagError(f"{path} line {n}: {problem}")
            yield ex


# -----------------------------------------------------------------------------
# Scoring


def render_example(example, enc):
    """(tokens (4, T) long, mask (4, T) long with 1 on each row's ending tokens, label); rows padded with 0."""
    ctx = enc.encode(example["ctx"])
    endings = [enc.encode(" " + e) for e in example["endings"]]  # GPT-2's BPE folds the space into the word
    tokens = torch.zeros(4, len(ctx) + max(map(len, endings)), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, end in enumerate(endings):
        tokens[i, :len(ctx) + len(end)] = torch.tensor(ctx + end)
        mask[i, len(ctx):len(ctx) + len(end)] = 1
    return tokens, mask, example["label"]


def row_losses(model, tokens, mask, autocast=contextlib.nullcontext()):
    """Each row's summed and mean cross-entropy over its masked tokens, each predicted from the tokens
    before it; float32 on the CPU. Padding after a row's tokens cannot change them: attention is causal."""
    with torch.no_grad(), autocast:
        logits = model(tokens)[0]  # our GPT returns (logits, loss), transformers' models an output with logits first
    scored = mask[:, 1:].bool()  # position t's logits predict token t+1
    ce = F.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored], reduction="none")
    sums = torch.zeros(scored.shape, device=ce.device).masked_scatter_(scored, ce).sum(1)
    return sums.cpu(), (sums / scored.sum(1)).cpu()


def example_losses(model, tokens, mask):
    """One rendered example, alone in its forward pass: its 4 endings' (summed, mean) losses."""
    device = next(model.parameters()).device
    return row_losses(model, tokens.to(device), mask.to(device))


def iterate_losses(model, rendered, device="cpu", batch_size=16, autocast=contextlib.nullcontext(), pad_to=None):
    """Yield (sums (4,), means (4,)) for each rendered (tokens, mask, label), batch_size examples per forward.
    With pad_to, every forward is (batch_size * 4, pad_to): a short last batch gets all-padding rows,
    so a compiled model sees one shape."""
    for start in range(0, len(rendered), batch_size):
        batch = rendered[start:start + batch_size]
        width = pad_to or max(t.size(1) for t, _, _ in batch)
        rows = batch_size * 4 if pad_to else len(batch) * 4
        tokens, mask = torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width, dtype=torch.long)
        for i, (t, m, _) in enumerate(batch):
            if t.size(1) > width:
                raise HellaswagError(f"an example of {t.size(1)} tokens is longer than pad_to={pad_to}")
            tokens[4 * i:4 * i + 4, :t.size(1)], mask[4 * i:4 * i + 4, :t.size(1)] = t, m
        sums, means = row_losses(model, tokens.to(device), mask.to(device), autocast)
        yield from zip(sums[:4 * len(batch)].view(-1, 4), means[:4 * len(batch)].view(-1, 4))


def length_order(rendered):
    """Indices of the rendered examples, shortest first (a stable sort)."""
    return sorted(range(len(rendered)), key=lambda i: rendered[i][0].size(1))


def longest_example(examples, enc):
    """Tokens in the longest rendered example: the pad_to that fits them all."""
    return max((render_example(ex, enc)[0].size(1) for ex in examples), default=1)


def score(model, examples, enc, device="cpu", batch_size=16, autocast=contextlib.nullcontext(), pad_to=None,
          progress=None):
    """(n_correct, n_correct_norm, n) over the example dicts, tokenized with enc (GPT-2's BPE,
    fineweb.gpt2_tokenizer()). Under DDP each rank scores its own slice and the caller all-reduces the
    counts. progress: a tqdm bar to advance, showing the running acc_norm (without pad_to the tasks are
    scored shortest first, so it is an estimate until the end)."""
    rendered = [render_example(ex, enc) for ex in examples]
    if pad_to is None:  # batches of like lengths waste less on padding (27% fewer positions on val at batch 16)
        rendered = [rendered[i] for i in length_order(rendered)]
    n = correct = correct_norm = 0
    for (sums, means), (_, _, label) in zip(iterate_losses(model, rendered, device, batch_size, autocast, pad_to), rendered):
        n += 1
        correct += int(sums.argmin()) == label
        correct_norm += int(means.argmin()) == label
        if progress is not None:
            progress.set_postfix(acc_norm=f"{correct_norm / n:.4f}", refresh=False)
            progress.update()
    return correct, correct_norm, n


# -----------------------------------------------------------------------------
# Command line: one dataclass; its fields are the flags


@dataclass
class HellaswagConfig:
    model: str = dataclasses.field(default="gpt2", metadata={"help": "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder, or a train_gpt2.py checkpoint (log/model_NNNNN.pt, or log: its newest)"})
    split: str = dataclasses.field(default="val", metadata={"help": "train or val"})
    data_dir: str = dataclasses.field(default="", metadata={"help": "folder holding hellaswag_{split}.jsonl ('' = $HELLASWAG_DIR or ~/.cache/gpt2-repro/hellaswag, downloaded there on first use)"})
    limit: int = dataclasses.field(default=0, metadata={"help": "score the first N tasks only (0 = all)"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "tasks per forward pass (4 rows each)"})
    device: str = "auto"  # help: train_gpt2.SHARED_FLAGS_HELP
    dtype: str = "auto"
    compile: str = "auto"


def parse_args(argv=None):
    # Imported here, not at the top: train_gpt2.py imports this module's data and scoring for its evals, and
    # a module-level import back would load a second copy of a train_gpt2.py run as __main__.
    from train_gpt2 import PRETRAINED, config_parser
    parser = config_parser(HellaswagConfig, "hellaswag.py", __doc__)
    cfg = HellaswagConfig(**vars(parser.parse_args(argv)))
    checks = [("split", cfg.split in SCORED_SPLITS, "expected train or val (HellaSwag's test labels are not public)"),
              ("limit", cfg.limit >= 0, "must be >= 0"),
              ("batch_size", cfg.batch_size > 0, "must be a positive integer"),
              ("model", cfg.model in PRETRAINED or os.path.isdir(cfg.model) or os.path.isfile(cfg.model),
               "expected " + ", ".join(PRETRAINED) + ", a Hugging Face GPT-2 folder, a model_NNNNN.pt "
                                                     "checkpoint or a train_gpt2.py --log_dir")]
    for name, ok, allowed in checks:
        if not ok:
            parser.error(f"--{name} {getattr(cfg, name)}: {allowed}")
    return cfg


def evaluate(cfg):
    from tqdm import tqdm
    from train_gpt2 import TrainError, load_model, load_tokenizer, require_gpt2_vocab, resolve_system
    try:
        device, _, use_compile, autocast = resolve_system(cfg.device, cfg.dtype, cfg.compile)
        enc = load_tokenizer()
    except TrainError as e:
        raise HellaswagError(str(e)) from None
    # Read the data before loading weights, so a bad --data_dir fails in a second, not after a download.
    examples = list(itertools.islice(iterate_examples(cfg.split, cfg.data_dir), cfg.limit or None))
    if not examples:
        raise HellaswagError(f"{data_file(cfg.split, cfg.data_dir)}: holds no tasks")
    try:
        model = require_gpt2_vocab(load_model(cfg.model), cfg.model)
    except TrainError as e:  # a bad checkpoint, not a GPT-2 folder, no network for the Hub
        raise HellaswagError(f"--model {e}") from None
    model.to(device).eval()
    longest = longest_example(examples, enc)
    if longest > model.config.block_size:
        raise HellaswagError(f"a task has {longest} tokens, more than the model's block_size {model.config.block_size}")
    pad_to = None
    if use_compile:
        model, pad_to = torch.compile(model, dynamic=False), longest  # one shape for every forward: compiled once
    with tqdm(total=len(examples), desc=f"hellaswag {cfg.split}", unit="task") as bar:
        correct, correct_norm, n = score(model, examples, enc, device, cfg.batch_size, autocast,
                                         pad_to, progress=bar)
    print(f"acc: {correct / n:.4f} acc_norm: {correct_norm / n:.4f} n: {n}", flush=True)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        evaluate(cfg)
    except HellaswagError as e:
        sys.exit(f"hellaswag.py: error: {e}")


if __name__ == "__main__":
    main()
