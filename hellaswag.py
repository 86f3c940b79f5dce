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
The test split's labels are not public, so only train and val can be scored. fineweb.py reads the data and
train_gpt2.py, whose evals score HellaSwag too, does the scoring; this script is their command line.
"""

import itertools
import os
import sys
from dataclasses import dataclass

import torch

from fineweb import UserError, config_parser, gpt2_tokenizer, iterate_examples, option
from train_gpt2 import PRETRAINED, load_model, longest_example, require_gpt2_vocab, resolve_system, score


@dataclass
class HellaswagConfig:
    model: str = option("gpt2", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder, or a "
                                "train_gpt2.py checkpoint (log/model_NNNNN.pt, or log: its newest)")
    split: str = option("val", "train or val")
    data_dir: str = option("", "folder holding hellaswag_{split}.jsonl ('' = $HELLASWAG_DIR or "
                               "~/.cache/gpt2-repro/hellaswag, downloaded there on first use)")
    limit: int = option(0, "score the first N tasks only (0 = all)")
    batch_size: int = option(16, "tasks per forward pass (4 rows each)")
    device: str = "auto"  # help: fineweb.SHARED_FLAGS_HELP
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


def evaluate(cfg):
    from tqdm import tqdm
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
    print(f"acc: {correct / n:.4f} acc_norm: {correct_norm / n:.4f} n: {n}", flush=True)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        evaluate(cfg)
    except UserError as e:
        sys.exit(f"hellaswag.py: error: {e}")


if __name__ == "__main__":
    main()
