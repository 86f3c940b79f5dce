"""Turn a train_gpt2.py checkpoint into a Hugging Face model folder: weights, GPT-2's tokenizer, a model card.

    python export.py                                    # newest checkpoint in log/ -> log/hf_model_NNNNN/
    python export.py --checkpoint log/model_19073.pt --out_dir gpt2-repro
    python export.py --push_to_hub user/name            # then upload it (token: HF_TOKEN or `hf auth login`)
    python export.py --help                             # every flag

The folder holds config.json + model.safetensors (GPT2LMHeadModel; the vocabulary's padding rows past
GPT-2's 50257 tokens are dropped), GPT-2's tokenizer files (made from OpenAI's encoder.json + vocab.bpe
in data/, so exporting needs no network) and a README.md model card with the run's
step, tokens seen, val loss and HellaSwag score (report.md's table; with the best val loss from the log.txt
beside the checkpoint); transformers.pipeline("text-generation", model=folder)
loads it. It is written to a temporary folder beside out_dir and renamed when complete, so an
interrupted export leaves nothing half-written, and an existing non-empty out_dir is never touched.
"""

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass

from checkpoints import checkpoint_file, load_checkpoint
from common import DATA_DIR, GPT2_EOT, GPT2_VOCAB_SIZE, UserError, config_parser, disk_full, option
from plot import read_log, results_table
from train_gpt2 import GPT, model_from_checkpoint

EOT = "<|endoftext|>"  # GPT-2's only special token, id GPT2_EOT: its bos, eos and unk token
CARD_FLAGS = ("data_dir", "init_from", "max_steps", "total_batch_size", "seq_len", "max_lr", "min_lr",
              "warmup_steps", "weight_decay", "grad_clip", "shuffle", "seed")


@dataclass
class ExportConfig:
    checkpoint: str = option("log", "a train_gpt2.py checkpoint (log/model_NNNNN.pt), or a folder: its "
                                    "newest one")
    out_dir: str = option("", "the folder to write, which must not exist or be empty ('' = hf_model_NNNNN "
                              "beside the checkpoint)")
    tokenizer: str = option("", "'' = GPT-2's, from OpenAI's encoder.json + vocab.bpe shipped in data/; or a "
                                "Hugging Face tokenizer folder, or another folder holding encoder.json + "
                                "vocab.bpe")
    push_to_hub: str = option("", "then upload the folder to this Hugging Face model repo, user/name "
                                  "(created if missing); the token comes from HF_TOKEN or `hf auth login`")
    private: bool = option(False, "create the --push_to_hub repo as private")


def parse_args(argv=None):
    return ExportConfig(**vars(config_parser(ExportConfig, "export.py", __doc__).parse_args(argv)))


def reason(e):
    """An exception as one short line: its type and the first sentence of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0].split('. ')[0].rstrip('.') if lines else ''}"


def load_tokenizer(source, block_size):
    """GPT-2's tokenizer for transformers, from OpenAI's encoder.json + vocab.bpe (in data/ when source is '')
    or a Hugging Face tokenizer folder; checked to be GPT-2's 50257 tokens, since a folder without
    tokenizer files loads as an (almost) empty tokenizer rather than failing."""
    from transformers import GPT2TokenizerFast
    special = dict(bos_token=EOT, eos_token=EOT, unk_token=EOT, model_max_length=block_size)
    source = source or DATA_DIR
    if not os.path.isdir(source):
        raise UserError(f"--tokenizer {source}: no such folder; expected a Hugging Face tokenizer folder or "
                        f"a folder holding OpenAI's encoder.json + vocab.bpe ('' for the ones in "
                        f"{DATA_DIR})")
    encoder, bpe = os.path.join(source, "encoder.json"), os.path.join(source, "vocab.bpe")
    try:
        if os.path.isfile(encoder) and os.path.isfile(bpe):
            with open(encoder, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(bpe, encoding="utf-8") as f:
                lines = f.read().split("\n")[1:]  # [0]: "#version: 0.2"
                merges = [tuple(line.split(" ")) for line in lines if line]
            # The loaded vocab and merges, not their paths: GPT2TokenizerFast(vocab_file=..., merges_file=...)
            # silently builds an empty tokenizer in transformers 5.
            tok = GPT2TokenizerFast(vocab=vocab, merges=merges, **special)
        else:
            tok = GPT2TokenizerFast.from_pretrained(source, **special)
    except Exception as e:  # corrupt files: json, tokenizers and transformers each raise their own types
        raise UserError(f"--tokenizer {source}: cannot read the tokenizer ({reason(e)})") from None
    if len(tok) != GPT2_VOCAB_SIZE or tok.convert_tokens_to_ids(EOT) != GPT2_EOT:
        raise UserError(f"--tokenizer {source}: no GPT-2 tokenizer there (vocabulary of {len(tok)}, not "
                        f"{GPT2_VOCAB_SIZE} ending in {EOT}); expected a folder holding tokenizer.json, "
                        f"vocab.json + merges.txt, or OpenAI's encoder.json + vocab.bpe")
    return tok


def save_pretrained(model, out_dir, vocab_size):
    """Write model as a Hugging Face GPT-2 folder (config.json + model.safetensors) of its first vocab_size
    tokens: the rows past GPT-2's 50257 are padding that no token id reaches."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    eot = GPT2_EOT if vocab_size == GPT2_VOCAB_SIZE else None  # <|endoftext|>, if the vocab has it
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                    bos_token_id=eot, eos_token_id=eot))
    sd = {k: (w.t() if k.endswith(GPT.CONV1D_WEIGHTS) else w) for k, w in model.state_dict().items()}
    for k in ("transformer.wte.weight", "lm_head.weight"):
        sd[k] = sd[k][:vocab_size]
    hf.load_state_dict({k: w.detach().cpu().float().contiguous() for k, w in sd.items()})
    hf.save_pretrained(out_dir)


def model_card(ckpt, model_id, checkpoint_name, n_params, vocab_size, has_tokenizer, series=None):
    """README.md: the Hub's metadata, then what the model is, how it scores next to GPT-2 124M (report.md's
    table: plot.results_table, with the run's log.txt series where there is one), and how to use it."""
    run, c = ckpt["config"], ckpt["model_config"]
    vocab, padding = f"{vocab_size}", c["vocab_size"] - vocab_size
    if padding:
        vocab += (f" (trained with {c['vocab_size']}; the {padding} padding rows, which no token reaches, "
                  f"are dropped)")
    flags = "\n".join(f"| `--{k}` | `{run[k]}` |" for k in CARD_FLAGS if k in run)
    if has_tokenizer:
        usage = f"""```python
from transformers import pipeline

generator = pipeline("text-generation", model="{model_id}")
out = generator("Hello, I'm a language model,", max_new_tokens=30, do_sample=True, top_k=50)
print(out[0]["generated_text"])
```"""
    else:
        usage = (f"Its vocabulary is not GPT-2's, so it comes without a tokenizer: load it with "
                 f'`GPT2LMHeadModel.from_pretrained("{model_id}")` and give it token ids.')
    return f"""---
library_name: transformers
pipeline_tag: text-generation
license: mit
tags:
- gpt2
---

# {os.path.basename(model_id)}

A GPT-2-architecture language model ({n_params / 1e6:.1f}M parameters) trained with `train_gpt2.py`, a
PyTorch reproduction of GPT-2 (124M): its checkpoint `{checkpoint_name}`. It is a base model: it
continues text, with the biases of its training data, and follows no instructions.

## Results

{results_table(ckpt, series)}

## Model

GPT-2's architecture (pre-LayerNorm transformer, tanh GELU, tied input and output embeddings); it
loads as `GPT2LMHeadModel`.

| n_layer | n_head | n_embd | block_size (context) | vocab_size |
| --- | --- | --- | --- | --- |
| {c["n_layer"]} | {c["n_head"]} | {c["n_embd"]} | {c["block_size"]} | {vocab} |

## Training

| flag | value |
| --- | --- |
{flags}

## Usage

{usage}
"""


def run_log(path):
    """The series of the log.txt beside checkpoint `path` (plot.read_log), or None where there is none or it
    cannot be read: a model card without the run's best values, rather than no export."""
    try:
        return read_log(os.path.join(os.path.dirname(path), "log.txt"))
    except UserError:
        return None


def push(folder, repo_id, private):
    from huggingface_hub import HfApi
    api = HfApi()  # the token: HF_TOKEN, or the one `hf auth login` saved
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder,
                          commit_message=f"export.py: {os.path.basename(folder)}")
    except Exception as e:  # offline, no network, no or bad token, no rights: many exception types
        private_flag = " --private" if private else ""
        raise UserError(f"--push_to_hub {repo_id}: {reason(e)}; the folder is saved in {folder}: upload it "
                        f"later with `hf upload {repo_id} {folder}{private_flag}`") from None
    print(f"pushed to {url}")


def export(cfg):
    if cfg.push_to_hub and not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.push_to_hub):
        raise UserError(f"--push_to_hub {cfg.push_to_hub}: expected a Hugging Face repo id, user/name")
    if cfg.private and not cfg.push_to_hub:
        raise UserError("--private: only means something with --push_to_hub user/name")
    try:
        path = checkpoint_file(cfg.checkpoint)
        ckpt = load_checkpoint(path)
    except UserError as e:
        raise UserError(f"--checkpoint {e}") from None
    default_dir = os.path.join(os.path.dirname(path), f"hf_model_{ckpt['step']:05d}")
    out_dir = os.path.normpath(cfg.out_dir or default_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"--out_dir {out_dir}: already exists and is not an empty folder; pick another "
                        f"--out_dir or delete it")

    model = model_from_checkpoint(ckpt)
    vocab_size = min(model.config.vocab_size, GPT2_VOCAB_SIZE)  # the padding rows past GPT-2's go
    tokenizer = None
    if vocab_size == GPT2_VOCAB_SIZE:
        tokenizer = load_tokenizer(cfg.tokenizer, model.config.block_size)
    else:
        print(f"note: the model's vocabulary has {vocab_size} tokens, fewer than GPT-2's {GPT2_VOCAB_SIZE}, "
              f"so GPT-2's tokenizer cannot go with it: exporting the weights without tokenizer files")
    padding = (model.config.vocab_size - vocab_size) * model.config.n_embd  # the rows save_pretrained drops
    n_params = sum(p.numel() for p in model.parameters()) - padding

    tmp = f"{out_dir}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        save_pretrained(model, tmp, vocab_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json
            tokenizer.backend_tokenizer.model.save(tmp)  # vocab.json + merges.txt, for tools that read those
        card = model_card(ckpt, cfg.push_to_hub or out_dir, os.path.basename(path), n_params, vocab_size,
                          tokenizer is not None, run_log(path))
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        os.replace(tmp, out_dir)  # replaces an empty out_dir; fails, touching nothing, on a non-empty one
    except Exception as e:
        if disk_full(e):
            raise UserError(f"disk full in {os.path.dirname(os.path.abspath(out_dir))}: {out_dir} was not "
                            f"written; free space and export again") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"saved {out_dir}")
    if tokenizer is not None:
        print(f'load it with: transformers.pipeline("text-generation", model="{out_dir}")')
    else:
        print(f'load it with: transformers.GPT2LMHeadModel.from_pretrained("{out_dir}")')
    if cfg.push_to_hub:
        push(out_dir, cfg.push_to_hub, cfg.private)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        export(cfg)
    except UserError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
