"""Sample text from GPT-2's weights or a train_gpt2.py checkpoint.

    python generate.py                                                   # GPT-2 124M: 10 samples of 30 tokens
    python generate.py --init_from log/model_19073.pt --prompt FILE:prompt.txt --max_new_tokens 200
    python generate.py --help                                            # every flag

Each sample is printed as `> ` followed by the prompt and its continuation. The sampling itself is the
model's, GPT.generate() in train_gpt2.py (the training loop's samples use it too): the prompt is run
through the model once, filling a KV cache; after that each new token costs one token's forward
instead of the whole sequence's.
"""

import os
import sys
from dataclasses import dataclass

from common import (PRETRAINED, UserError, check_flags, config_parser, gpt2_tokenizer, option,
                    require_gpt2_vocab)
from train_gpt2 import SAMPLE_PROMPT, load_model, resolve_system


@dataclass
class GenerateConfig:
    init_from: str = option("gpt2", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder, "
                                    "or a train_gpt2.py checkpoint (log/model_NNNNN.pt, or log: its newest)",
                            group="model")
    prompt: str = option(SAMPLE_PROMPT, "the text to continue, or FILE:path to read it from a file ('' "
                                        "starts from <|endoftext|>: unconditional samples)")
    num_return_sequences: int = option(10, "samples of the prompt", group="sampling")
    max_length: int = option(30, "tokens per sample, the prompt's included. A sample never runs past the "
                                 "model's context (block_size, 1024 for GPT-2): it stops there, with a note, "
                                 "whatever the length flags ask")
    max_new_tokens: int = option(0, "tokens to add to the prompt; overrides --max_length when > 0")
    temperature: float = option(1.0, "softmax temperature (0 = greedy: always the most likely token)")
    top_k: int = option(50, "sample among the k most likely tokens only (0 = all)")
    top_p: float = option(1.0, "nucleus sampling: among the fewest top tokens whose probability reaches p "
                               "(1 = off)")
    seed: int = option(42, "seed of the sampling; the same flags give the same samples")
    device: str = option("auto", group="system")  # help: common.SHARED_FLAGS_HELP
    dtype: str = "auto"
    compile: str | bool = "auto"


def parse_args(argv=None):
    return GenerateConfig(**vars(config_parser(GenerateConfig, "generate.py", __doc__).parse_args(argv)))


def check_generate_flags(cfg):
    check_flags(cfg, [
        ("num_return_sequences", cfg.num_return_sequences > 0, "must be a positive integer"),
        ("max_length", cfg.max_length > 0, "must be a positive integer"),
        ("max_new_tokens", cfg.max_new_tokens >= 0, "must be >= 0"),
        ("temperature", cfg.temperature >= 0, "must be >= 0"),
        ("top_k", cfg.top_k >= 0, "must be >= 0"),
        ("top_p", 0 < cfg.top_p <= 1, "must be in (0, 1]"),
        ("init_from", cfg.init_from in PRETRAINED or cfg.init_from.endswith((".pt", ".pt.tmp"))
         or os.path.isdir(cfg.init_from), f"expected {', '.join(PRETRAINED)}, a Hugging Face GPT-2 folder, a "
                                          f"model_NNNNN.pt file or a train_gpt2.py --log_dir"),
        ("seed", 0 <= cfg.seed < 2**64, "must be in [0, 2**64)"),
    ])


def read_prompt(prompt, enc):
    """The prompt's token ids. <|endoftext|> in it is the document separator token, as in the training
    data."""
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt {prompt}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                            f"{e.start})") from None
        except OSError as e:
            raise UserError(f"--prompt {prompt}: cannot read the file ({e.strerror or e})") from None
    return enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]


def run(cfg):
    check_generate_flags(cfg)
    device, _, use_compile, autocast = resolve_system(cfg.device, cfg.dtype, cfg.compile)
    enc = gpt2_tokenizer()
    tokens = read_prompt(cfg.prompt, enc)
    try:
        model = require_gpt2_vocab(load_model(cfg.init_from), cfg.init_from).to(device)
    except UserError as e:
        raise UserError(f"--init_from {e}") from None
    block_size = model.config.block_size
    if len(tokens) > block_size:
        raise UserError(f"--prompt: {len(tokens)} tokens, more than the model's context of {block_size} "
                        f"tokens (block_size)")
    n_new = cfg.max_new_tokens or cfg.max_length - len(tokens)
    if n_new <= 0:
        raise UserError(f"--max_length {cfg.max_length}: the prompt alone has {len(tokens)} tokens; raise "
                        f"it or give --max_new_tokens")
    if len(tokens) + n_new > block_size:
        print(f"note: stopping at the model's context of {block_size} tokens: {block_size - len(tokens)} new "
              f"tokens, not {n_new}")
    if use_compile:
        # In place, so that generate()'s forwards are compiled. dynamic: the cache's length grows every
        # token; without it each length would be a recompile.
        model.compile(dynamic=True)
    rows = model.generate(tokens, cfg.num_return_sequences, n_new, cfg.temperature, cfg.top_k, cfg.top_p,
                          cfg.seed, autocast, n_vocab=enc.n_vocab)
    # An <|endoftext|> the model samples is kept and printed as "<|endoftext|>": what follows is a new
    # document, the way the model saw documents joined in training.
    for row in rows:
        print(">", enc.decode(row.tolist()), flush=True)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        run(cfg)
    except UserError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
