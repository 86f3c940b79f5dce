"""Sample text from GPT-2's weights or a train_gpt2.py checkpoint.

    python generate.py                                                   # GPT-2 124M: 10 samples of 30 tokens
    python generate.py --init_from log/model_19073.pt --prompt FILE:prompt.txt --max_new_tokens 200
    python generate.py --help                                            # every flag

Each sample is printed as `> ` followed by the prompt and its continuation. The training loop calls
generate() to print samples as it trains. The prompt is run through the model once, filling a KV cache;
after that each new token costs one token's forward instead of the whole sequence's.
"""

import contextlib
import math
import os
import sys
from dataclasses import dataclass

import torch

from train_gpt2 import (GPT2_VOCAB_SIZE, PRETRAINED, KVCache, TrainError, autocast_context, config_parser, flag,
                        load_model, load_tokenizer, print0, resolve_compile, resolve_device, resolve_dtype)


@dataclass
class GenerateConfig:
    init_from: str = flag("gpt2", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder, "
                                  "or a train_gpt2.py checkpoint (log/model_NNNNN.pt)")
    prompt: str = flag("Hello, I'm a language model,", "the text to continue, or FILE:path to read it from a file "
                                                       "('' starts from <|endoftext|>: unconditional samples)")
    num_return_sequences: int = flag(10, "samples of the prompt")
    max_length: int = flag(30, "tokens per sample, the prompt's included. A sample never runs past the model's "
                               "context (block_size, 1024 for GPT-2): it stops there, with a note, whatever the "
                               "length flags ask")
    max_new_tokens: int = flag(0, "tokens to add to the prompt; overrides --max_length when > 0")
    temperature: float = flag(1.0, "softmax temperature (0 = greedy: always the most likely token)")
    top_k: int = flag(50, "sample among the k most likely tokens only (0 = all)")
    top_p: float = flag(1.0, "nucleus sampling: among the fewest top tokens whose probability reaches p (1 = off)")
    seed: int = flag(42, "seed of the sampling; the same flags give the same samples")
    device: str = "auto"  # help: train_gpt2.SHARED_FLAGS_HELP
    dtype: str = "auto"
    compile: str = "auto"


def sample_next(logits, temperature, top_k, top_p, generator):
    """The next token of each row of logits (B, V), as a (B, 1) tensor: the argmax at temperature 0,
    else a draw from the softmax restricted to the top_k tokens, then to the nucleus of top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, -math.inf).scatter(-1, indices, values)
    if top_p < 1.0:
        sorted_logits, indices = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the tokens ranked above it reach p: what is left is the smallest set whose
        # probability reaches p, and never empty (nothing ranks above the first token).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, indices, sorted_logits.masked_fill(drop, -math.inf))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model, tokens, num_return_sequences, max_new_tokens, temperature=1.0, top_k=50, top_p=1.0, seed=42,
             device="cpu", autocast=contextlib.nullcontext(), recompute=False):
    """num_return_sequences continuations of the prompt `tokens` (a list of ids), as a LongTensor
    (num_return_sequences, len(tokens) + n_new) on device: the prompt, then n_new = max_new_tokens new
    tokens, or fewer where the model's block_size comes first. Seeded: the same arguments give the same
    tokens. recompute=True is the baseline without the KV cache: every new token runs the whole sequence."""
    config = getattr(model, "module", model).config  # DDP keeps the model in .module
    if not 0 < len(tokens) <= config.block_size:
        raise TrainError(f"the prompt has {len(tokens)} tokens; the model takes 1 to {config.block_size} "
                         f"(its context, block_size)")
    n_new = min(max_new_tokens, config.block_size - len(tokens))
    if n_new < max_new_tokens:
        print0(f"note: stopping at the model's context of {config.block_size} tokens: {n_new} new tokens, "
               f"not {max_new_tokens}")
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    seq = torch.as_tensor(tokens, dtype=torch.long, device=device).repeat(num_return_sequences, 1)
    cache = None if recompute else KVCache(config, num_return_sequences)
    new = seq  # what the cached forward reads next: the whole prompt once, then only the newest token
    try:
        for _ in range(n_new):
            with autocast:
                logits, _ = model(seq if recompute else new, kv_cache=cache)
            logits = logits[:, -1, :].float()
            # Rows past GPT-2's 50257 (a 50304-row model's padding) are no token; tiktoken cannot decode them.
            logits[:, GPT2_VOCAB_SIZE:] = -math.inf
            new = sample_next(logits, temperature, top_k, top_p, generator)
            seq = torch.cat([seq, new], dim=1)
    finally:
        model.train(was_training)
    return seq


def parse_args(argv=None):
    return GenerateConfig(**vars(config_parser(GenerateConfig, "generate.py", __doc__).parse_args(argv)))


def check_flags(cfg):
    checks = {
        "num_return_sequences": (cfg.num_return_sequences > 0, "must be a positive integer"),
        "max_length": (cfg.max_length > 0, "must be a positive integer"),
        "max_new_tokens": (cfg.max_new_tokens >= 0, "must be >= 0"),
        "temperature": (cfg.temperature >= 0, "must be >= 0"),
        "top_k": (cfg.top_k >= 0, "must be >= 0"),
        "top_p": (0 < cfg.top_p <= 1, "must be in (0, 1]"),
        "init_from": (cfg.init_from in PRETRAINED or cfg.init_from.endswith(".pt") or os.path.isdir(cfg.init_from),
                      f"expected {', '.join(PRETRAINED)}, a Hugging Face GPT-2 folder or a model_NNNNN.pt file"),
    }
    for name, (ok, why) in checks.items():
        if not ok:
            raise TrainError(f"--{name} {getattr(cfg, name)}: {why}")


def read_prompt(prompt, enc):
    """The prompt's token ids. <|endoftext|> in it is the document separator token, as in the training data."""
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TrainError(f"--prompt {prompt}: cannot read the file ({e.strerror or e})") from None
    return enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]


def run(cfg):
    check_flags(cfg)
    device = resolve_device(cfg.device)
    dtype, use_compile = resolve_dtype(cfg.dtype, device), resolve_compile(cfg.compile, device)
    enc = load_tokenizer()
    tokens = read_prompt(cfg.prompt, enc)
    try:
        model = load_model(cfg.init_from).to(device)
    except TrainError as e:
        raise TrainError(f"--init_from {e}") from None
    if len(tokens) > model.config.block_size:
        raise TrainError(f"--prompt: {len(tokens)} tokens, more than the model's context of {model.config.block_size} "
                         f"tokens (block_size)")
    n_new = cfg.max_new_tokens or cfg.max_length - len(tokens)
    if n_new <= 0:
        raise TrainError(f"--max_length {cfg.max_length}: the prompt alone has {len(tokens)} tokens; raise it or "
                         f"give --max_new_tokens")
    if use_compile:
        # dynamic: the cache's length grows every token; without it each length would be a recompile
        model = torch.compile(model, dynamic=True)
    rows = generate(model, tokens, cfg.num_return_sequences, n_new, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed,
                    device, autocast_context(device, dtype))
    # An <|endoftext|> the model samples is kept and printed as "<|endoftext|>": what follows is a new
    # document, the way the model saw documents joined in training.
    for row in rows:
        print(">", enc.decode(row.tolist()), flush=True)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        run(cfg)
    except TrainError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
