"""Train GPT-2 (124M by default) from scratch, or fine-tune OpenAI's GPT-2 weights.

    python train_gpt2.py                                              # 1 GPU (or CPU)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py            # 8 GPUs
    python train_gpt2.py --help                                       # every flag

One file, read top to bottom: the model, GPT-2 weight loading, the data loader, the flags, then the
training loop (cosine-warmup AdamW, gradient accumulation, bf16 or float16 autocast, torch.compile, DDP
or FSDP, activation checkpointing). Beside it, each in the file named for it: common.py (the error,
flags, tokenizer and disk writes every script shares), fineweb.py (the token shards), checkpoints.py
(what a run writes to resume, and the signals that stop it), hellaswag.py (the eval) and plot.py (log.txt
and loss.png). Importing it runs nothing; generate.py, hellaswag.py and export.py import it to load a model.
"""

import contextlib
import datetime
import gc
import importlib.util
import itertools
import json
import math
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from checkpoints import (StopRequest, checkpoint_file, checkpoint_paths, checkpoint_state, load_checkpoint,
                         peak_memory, restore_state, resume_config, run_provenance, save_checkpoint,
                         shard_record)
from common import (GPT2_VOCAB_SIZE, PRETRAINED, UserError, check_flags, config_parser, format_bytes,
                    gpt2_tokenizer, hold_folder, option, print0)
from fineweb import find_shards, open_shard  # the shard format, read back beside its writer
from hellaswag import hellaswag_share, score
# the run's log: log.txt (started, trimmed on resume), the step line with its ETA, W&B, loss.png (matplotlib
# if there) and, at the end, report.md
from plot import ETA, attempt_record, end_log, log_values, refresh_plot, start_log, start_wandb, step_line


# -----------------------------------------------------------------------------
# The model: it uses nothing below it; its errors are ValueErrors, which the scripts turn into one line


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # GPT-2's tokens
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class KVCache:
    """Each layer's keys and values of the positions seen so far: with it, generating a token costs one
    token's forward instead of the whole prefix's."""

    def __init__(self, config, batch_size):
        self.shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k, self.v = {}, {}  # by attention layer (the module)
        self.pos = 0  # positions filled; GPT.forward advances it

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at positions pos..pos+T-1; return the keys and values of 0..pos+T-1."""
        if layer not in self.k:  # allocated at first use, in the dtype autocast gives k and v
            self.k[layer] = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros_like(self.k[layer])
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention where available
        else:  # new positions past..past+T-1 attend to every cached position and causally among themselves
            past = kv_cache.pos
            k, v = kv_cache.update(self, k, v)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream is never normalised, only each branch's input."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# The chunked loss's chunk: 256 x 50304 float32 logits are 52 MB; without a chunk size, PyTorch's own pick
# was 4-8x slower on CPU (BENCHMARKS.md)
LOSS_CHUNK_TOKENS = 256


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        # Training-run settings, not the model's shape: not in GPTConfig, so not in checkpoints' model_config
        self.chunked_loss = False
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # Each block adds two branches (attn, mlp) to the residual stream; scaling their output projections
        # by 1/sqrt(2*n_layer) keeps the stream's variance from growing with depth (GPT-2 paper).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, kv_cache=None, return_logits=False):
        """(logits (B, T, vocab_size), the mean cross-entropy against targets or None). With chunked_loss
        and targets, the logits are None unless asked for. With a KVCache, idx continues its sequence."""
        T = idx.size(1)
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)  # redone in backward
            else:
                x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None and self.chunked_loss and not return_logits:
            # PyTorch's fused head + loss: the N x vocab logits and their gradient are made a chunk at a time,
            # never whole (at GPT-2's vocabulary most of a step's memory, and on CPU their allocation most of
            # its time); each chunk's gradients are made in forward, so nothing is recomputed in backward
            # allow_retain_graph: what torch.compile needs of it (else PyTorch warns and breaks the graph).
            # In float32 always: autocast does not cover it, but FSDP's 16-bit policy hands it 16-bit weights.
            options = nn.LinearCrossEntropyOptions(batch_chunk_size=LOSS_CHUNK_TOKENS,
                                                   allow_retain_graph=torch.compiler.is_compiling())
            return None, F.linear_cross_entropy(x.flatten(0, 1).float(), self.lm_head.weight.float(),
                                                targets.reshape(-1), options=options)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:  # any layout, e.g. x[:, 1:]
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, forward + backward (PaLM appendix B): 6 per weight for the matmuls
        (wpe is a lookup, not a matmul; the tied wte is counted once, as lm_head), plus 12*L*T*d
        for attention's QK^T and AV. Causal masking is not discounted, as is the convention."""
        n = sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * self.config.n_layer * seq_len * self.config.n_embd

    # GPT-2 checkpoints use Conv1D layers, which store these weights as (in, out): transpose them.
    CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """GPT-2 weights: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' from the Hugging Face Hub,
        or a local folder in Hugging Face GPT-2 format (config.json + model.safetensors or .bin)."""
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
        config_file = os.path.join(name_or_dir, "config.json")
        # A folder: transformers would load another model type as a random GPT-2
        if os.path.isfile(config_file):
            with open(config_file) as f:
                model_type = json.load(f).get("model_type")
            if model_type != "gpt2":
                raise ValueError(f"{name_or_dir}: a {model_type} model, not GPT-2 (config.json's model_type)")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its table of missing tensors: the one line below says it
        try:
            hf, info = GPT2LMHeadModel.from_pretrained(name_or_dir, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        # transformers fills missing tensors with random ones: that would be no fine-tune at all
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if info.get(kind):
                raise ValueError(f"{name_or_dir}: not a complete GPT-2 checkpoint: {len(info[kind])} "
                                 f"{kind.replace('_', ' ')} (e.g. {sorted(map(str, info[kind]))[0]})")
        c = hf.config
        architecture = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                        "n_inner": (None, 4 * c.n_embd), "layer_norm_epsilon": (1e-5,),
                        "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                        "tie_word_embeddings": (True,)}
        for key, allowed in architecture.items():
            if getattr(c, key) not in allowed:
                raise ValueError(f"{name_or_dir}: {key}={getattr(c, key)} is not the GPT-2 architecture this "
                                 f"model implements")
        # One copy of the weights, not two: transformers' tensors become ours (assign), each transposed one
        # made as the one it replaces is freed; the model is built on the meta device, with no weights at all
        state = hf.state_dict()
        del hf
        for k in [k for k in state if k.endswith(cls.CONV1D_WEIGHTS)]:
            state[k] = state.pop(k).t().contiguous()
        with torch.device("meta"):
            model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                                  n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
        model.load_state_dict(state, assign=True)
        model.transformer.wte.weight = model.lm_head.weight  # assign made them two Parameters: one again
        return model

    def configure_optimizers(self, weight_decay, learning_rate, device_type, name="adamw"):
        """[AdamW], or with name "muon" [Muon for the blocks' matrices, AdamW for the rest]."""
        hidden = [p for p in self.transformer.h.parameters() if p.dim() == 2] if name == "muon" else []
        params = [p for p in self.parameters() if p.requires_grad and all(p is not h for h in hidden)]
        # Decay the matmul weights and embeddings (every tensor of dim >= 2), not biases or LayerNorm gains.
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                  fused=device_type == "cuda")
        if not hidden:
            return [adamw]
        # match_rms_adamw scales each matrix's orthogonalized update to AdamW's RMS: one lr drives both
        return [torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay,
                                 adjust_lr_fn="match_rms_adamw"), adamw]

    @torch.no_grad()
    def generate(self, tokens, num_return_sequences, max_new_tokens, temperature=1.0, top_k=50, top_p=1.0,
                 seed=42, autocast=contextlib.nullcontext(), recompute=False, n_vocab=None):
        """num_return_sequences continuations of the prompt `tokens` (a list of ids), prompt included, up to
        block_size: a LongTensor on the model's device, the same for the same arguments. recompute=True: the
        baseline without the KVCache. n_vocab: the tokenizer's size; a padded vocabulary's ids past it cannot
        be decoded, so are never sampled."""
        block_size = self.config.block_size
        if not 0 < len(tokens) <= block_size:
            raise ValueError(f"the prompt has {len(tokens)} tokens; the model takes 1 to {block_size} "
                             f"(its context, block_size)")
        device = self.lm_head.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        seq = torch.as_tensor(tokens, dtype=torch.long, device=device).repeat(num_return_sequences, 1)
        cache = None if recompute else KVCache(self.config, num_return_sequences)
        for _ in range(min(max_new_tokens, block_size - len(tokens))):
            with autocast:  # with the cache, only what it has not seen: the prompt, then the newest token
                logits, _ = self(seq if recompute else seq[:, cache.pos:], kv_cache=cache)
            new = sample_next(logits[:, -1, :n_vocab].float(), temperature, top_k, top_p, generator)
            seq = torch.cat([seq, new], dim=1)
        return seq


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


# -----------------------------------------------------------------------------
# The data: micro-batches from uint16 token shards (fineweb.py's .npy or llm.c's .bin, which
# fineweb.find_shards and fineweb.open_shard find and read)


class DataLoaderLite:
    """Micro-batches (x, y) of B x T tokens, y being x shifted by one, from one split's shards.

    The shards, in sorted order, form one stream that wraps around at its end (a new epoch); micro-batch
    i of a shard is its tokens [i*B*T, (i+1)*B*T + 1). With shuffle, each epoch reads the shards, and each
    shard's micro-batches, in a new order drawn from the seed and the epoch (as llm.c does). Rank r of W
    reads micro-batches r, r+W, r+2W, ...: W ranks accumulating A micro-batches each read what one process
    accumulating W*A reads. The whole state is `position`, the same on every rank: (epoch, k, tokens) where
    the first micro-batch no rank has read begins, `tokens` into the epoch's k-th shard. A loader of
    another B, T or W restored there continues at that token (shuffled, only one of the same B*T: `tokens`
    then counts the shard's micro-batches read).
    """

    def __init__(self, data_dir, split, B, T, process_rank=0, num_processes=1, vocab_size=50304,
                 shuffle=False, seed=1337):
        self.B, self.T = B, T
        # GPT-2's ids end at 50256: 50257..50303 only pad --vocab_size 50304 to a multiple of 128
        self.vocab_size = GPT2_VOCAB_SIZE if vocab_size == 50304 else vocab_size
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shuffle, self.seed = shuffle, seed
        self.paths = find_shards(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        self.counts = [max(0, len(s) - 1) // (B * T) for s in self.shards]  # a shard too short adds none
        self.batches_per_epoch = sum(self.counts)
        if self.batches_per_epoch == 0:
            raise UserError(f"no {split} shard in {data_dir}/ holds one micro-batch of {B}x{T}+1 tokens "
                            f"(largest has {max(map(len, self.shards))}); lower --micro_batch_size or "
                            f"--seq_len")
        self.record = [shard_record(p, s) for p, s in zip(self.paths, self.shards)]  # for checkpoints
        self.crcs = {}  # name: crc32 of the whole shard, of each shard read, when first read
        self.expected = {}  # the same, of the shards the checkpoint's run read (restore_state sets it)
        self.orders = {}  # the shuffle's orders, each drawn once: ~12 KB per FineWeb shard per epoch
        self.position = (0, 0, 0)

    def order(self, n, *key):
        """A permutation of range(n) drawn from the seed and key: (epoch,) for the shards, (epoch, shard)
        for one shard's micro-batches."""
        if key not in self.orders:
            self.orders[key] = np.random.default_rng([self.seed, *key]).permutation(n)
        return self.orders[key]

    def shard_order(self, epoch):
        return self.order(len(self.shards), epoch) if self.shuffle else range(len(self.shards))

    def locate(self, n):
        """The position (epoch, k, tokens) of micro-batch n of the stream from self.position."""
        epoch, k, start = self.position
        while True:
            shard = self.shards[self.shard_order(epoch)[k]]
            left = max(0, len(shard) - 1 - start) // (self.B * self.T)  # micro-batches not yet read
            if n < left:
                return epoch, k, start + n * self.B * self.T
            n, k, start = n - left, k + 1, 0
            if k == len(self.shards):
                epoch, k = epoch + 1, 0

    def shard(self, i):
        """Shard i's tokens. Read whole once, when first needed, to check its ids against vocab_size and
        its checksum against the checkpoint's: nothing is trained on that is not what the run read."""
        name = os.path.basename(self.paths[i])
        if name not in self.crcs:
            top = int(self.shards[i].max())
            if top >= self.vocab_size:
                limit = f"GPT-2's {GPT2_VOCAB_SIZE} ids" if self.vocab_size == GPT2_VOCAB_SIZE \
                    else f"the model's vocab_size {self.vocab_size}"
                raise UserError(f"{self.paths[i]}: token id {top} is past {limit}; the shard was made with "
                                f"another tokenizer")
            self.crcs[name] = zlib.crc32(self.shards[i])
            if self.expected.get(name, self.crcs[name]) != self.crcs[name]:
                raise UserError(f"{self.paths[i]}: other tokens than when the checkpoint's run read it (its "
                                f"checksum differs), so its position would read other tokens; restore the "
                                f"shard, or resume with the changed data under another --data_dir")
        return self.shards[i]

    def next_batch(self):
        B, T = self.B, self.T
        epoch, k, start = self.locate(self.process_rank)
        i = self.shard_order(epoch)[k]
        if self.shuffle:
            start = self.order(self.counts[i], epoch, i)[start // (B * T)] * B * T
        buf = torch.from_numpy(self.shard(i)[start: start + B * T + 1].astype(np.int64))
        self.position = self.locate(self.num_processes)
        return buf[:-1].view(B, T), buf[1:].view(B, T)


# -----------------------------------------------------------------------------
# Run configuration: one dataclass; its fields are the command-line flags


@dataclass
class TrainConfig:
    log_dir: str = option("log", "where log.txt and model_NNNNN.pt checkpoints go",
                          group="I/O: where the run starts from, where it writes")
    init_from: str = option("scratch", "scratch, resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a "
                                       "Hugging Face GPT-2 folder")
    auto_resume: bool = option(False, "continue from log_dir's newest checkpoint if any, else as --init_from "
                                      "says (for torchrun --max-restarts and requeued jobs)")
    ckpt_interval: int = option(5000, "steps between checkpoints (one is always written at the end)")
    keep_last: int = option(3, "checkpoints kept in log_dir, newest first (0 = keep all)")
    data_dir: str = option("edu_fineweb10B", "folder of *train*/*val* token shards (.npy or llm.c .bin)",
                           group="data")
    micro_batch_size: int = option(64, "sequences per forward pass per GPU; lower it if out of memory")
    seq_len: int = option(1024, "tokens per sequence")
    total_batch_size: int = option(524288, "tokens per optimizer step over all GPUs (2**19, as GPT-3 small)")
    shuffle: bool = option(False, "shuffle the train shards and each one's micro-batches, every epoch")
    block_size: int = option(1024, "context length", group="model: GPT-2 124M (the shape of a run from "
                                                           "scratch; weights and checkpoints bring theirs)")
    n_layer: int = option(12, "transformer blocks")
    n_head: int = option(12, "attention heads")
    n_embd: int = option(768, "model width")
    vocab_size: int = option(50304, "50257 padded to a multiple of 128, for faster matmuls")
    max_steps: int = option(19073, "optimizer steps (19073 x 524288 tokens = 10B tokens)",
                            group="optimizer: AdamW, linear warmup then cosine decay")
    warmup_steps: int = option(715, "steps of linear LR warmup (375M tokens, as GPT-3)")
    max_lr: float = option(6e-4, "peak learning rate")
    min_lr: float = option(6e-5, "learning rate at and after max_steps (cosine decay)")
    weight_decay: float = option(0.1, "AdamW weight decay, on tensors of dim >= 2 only")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")
    optimizer: str = option("adamw", "adamw (the GPT-2 recipe), or muon: torch.optim.Muon for the blocks' "
                                     "2-D weights, AdamW for the rest, one lr schedule for both")
    eval_interval: int = option(250, "steps between val-loss evaluations",
                                group="evaluation: val loss, HellaSwag, samples")
    val_tokens: int = option(20 * 64 * 1024 * 8, "val tokens per evaluation, the same whatever the "
                                                 "micro-batch size and rank count (build-nanogpt's 8 GPUs' "
                                                 "20 x 64 x 1024)")
    val_steps: int = option(0, "the older form of --val_tokens: N means N x micro_batch_size x seq_len")
    hellaswag: str | bool = option("auto", "HellaSwag acc_norm at every eval: auto (on for CUDA), 1 or 0")
    hellaswag_dir: str = option("", "folder of hellaswag_val.jsonl ('' = download to hellaswag.py's cache)")
    hellaswag_limit: int = option(0, "HellaSwag val examples per eval (0 = all 10042)")
    sample_interval: int = option(250, "steps between 4 samples printed and added to samples.txt (0 = never)")
    device: str = option("auto", group="system")
    dtype: str = "auto"
    compile: str | bool = "auto"
    chunked_loss: str | bool = option("auto", "the loss in chunks (in float32), never the whole B x T x "
                                              "vocab logits: auto (on for CPU only, where it was measured "
                                              "faster), 1 or 0")
    fsdp: bool = option(False, "shard weights, gradients and AdamW state over the ranks (FSDP2, under "
                               "torchrun), for models whose 16 bytes per parameter do not fit one GPU")
    activation_checkpointing: bool = option(False, "recompute activations in backward: less memory, slower")
    seed: int = option(1337, "random seed for the init and the data shuffle")
    dist_timeout: int = option(600, "seconds a collective waits for the other ranks (one frozen or dead) "
                                    "before the run ends with an error; NCCL's own default")
    plot: bool = option(True, "redraw log_dir/loss.png at every eval (needs matplotlib)", group="logging")
    wandb: bool = option(False, "also log to Weights & Biases (pip install wandb; WANDB_MODE=offline needs "
                                "no network)")
    wandb_project: str = option("gpt2-repro", "W&B project")
    wandb_run_name: str = option("", "W&B run name ('' = W&B picks one)")


MODEL_FLAGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
POSITIVE_FLAGS = ("micro_batch_size", "seq_len", "total_batch_size", "max_steps", "eval_interval",
                  "val_tokens", "ckpt_interval", "dist_timeout") + MODEL_FLAGS
NON_NEGATIVE_FLAGS = ("val_steps", "warmup_steps", "keep_last", "min_lr", "weight_decay", "grad_clip",
                      "hellaswag_limit", "sample_interval")


# --preset NAME is short for its flags; flags given as well override them (as fineweb.py's --preset)
PRESETS = {
    # the README's quick start: GPT-2's recipe on Tiny Shakespeare (python fineweb.py --preset shakespeare)
    # at a size a CPU trains in minutes
    "shakespeare": dict(data_dir="shakespeare", n_layer=2, n_head=4, n_embd=64, block_size=64, seq_len=64,
                        micro_batch_size=8, total_batch_size=512, max_steps=300, warmup_steps=20, max_lr=3e-3,
                        min_lr=3e-4, eval_interval=100, val_tokens=4096),
}


def parse_args(argv=None):
    """The run's flags, and those given on the command line (by name), a --preset's included: they
    override a checkpoint's on --init_from resume, as if typed."""
    parser = config_parser(TrainConfig, "train_gpt2.py", __doc__)
    presets = "; ".join(f"{name} = " + " ".join(f"--{k} {v}" for k, v in flags.items())
                        for name, flags in PRESETS.items())
    parser.add_argument("--preset", choices=PRESETS,
                        help=f"short for flags, which flags given as well override: {presets}")
    given = vars(parser.parse_args(argv))
    given = {**PRESETS.get(given.pop("preset", None), {}), **given}
    return TrainConfig(**given), given


def check_train_flags(cfg):
    outputs = [os.path.join(cfg.log_dir, n) for n in ("log.txt", "samples.txt", "loss.png")]
    blocked = [p for p in outputs if os.path.exists(p) and not os.path.isfile(p)]  # would fail mid-run
    init_from = cfg.init_from in ("scratch", "resume") + PRETRAINED or os.path.isdir(cfg.init_from)
    check_flags(cfg, [("init_from", init_from, f"expected scratch, resume, {', '.join(PRETRAINED)} or a "
                                               f"Hugging Face GPT-2 folder"),
                      ("log_dir", not blocked, f"{blocked[0] if blocked else ''} is not a file, and this run "
                                               f"writes there; move it away or pick another --log_dir"),
                      ("seed", 0 <= cfg.seed < 2**64, "must be in [0, 2**64), as torch and numpy need"),
                      ("dist_timeout", cfg.dist_timeout <= 365 * 86400, "must be at most a year, 31536000")]
                + [(name, getattr(cfg, name) > 0, "must be a positive integer") for name in POSITIVE_FLAGS]
                + [(name, getattr(cfg, name) >= 0, "must be >= 0") for name in NON_NEGATIVE_FLAGS]
                + [("max_lr", cfg.max_lr > 0, "must be > 0"),
                   ("min_lr", cfg.min_lr <= cfg.max_lr, f"must be <= --max_lr {cfg.max_lr}"),
                   ("n_embd", cfg.n_embd % cfg.n_head == 0, f"must be divisible by --n_head {cfg.n_head}"),
                   ("optimizer", cfg.optimizer in ("adamw", "muon"), "expected adamw or muon"),
                   ("optimizer", cfg.optimizer != "muon" or not cfg.fsdp, "Muon orthogonalizes whole "
                    "matrices, which --fsdp 1 shards over the ranks; with muon use DDP (--fsdp 0)"),
                   ("fsdp", not cfg.fsdp or "RANK" in os.environ,
                    "shards over the ranks of a torchrun launch (torchrun --standalone --nproc_per_node=N "
                    "train_gpt2.py --fsdp 1 ...); without torchrun, --fsdp 0"),
                   ("wandb", not cfg.wandb or importlib.util.find_spec("wandb") is not None,
                    "wandb is not installed: pip install wandb, or drop the flag")])


def get_lr(step, cfg):
    """Linear warmup to max_lr over warmup_steps, cosine decay to min_lr at max_steps, min_lr after."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    decay_ratio = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.max_lr - cfg.min_lr)


# -----------------------------------------------------------------------------
# The model to train or sample: from scratch, GPT-2's weights, or a checkpoint (which checkpoints.py reads)


def model_from_checkpoint(ckpt):
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def load_model(init_from):
    """A GPT from GPT-2 weights (gpt2, ..., gpt2-xl, a Hugging Face folder) or a checkpoint (a
    model_NNNNN.pt, or a --log_dir: its newest), as generate.py and hellaswag.py take them."""
    if init_from.endswith((".pt", ".pt.tmp")) or checkpoint_paths(init_from):
        return model_from_checkpoint(load_checkpoint(checkpoint_file(init_from)))
    if os.path.isdir(init_from) and not os.path.exists(os.path.join(init_from, "config.json")):
        raise UserError(f"{init_from}: neither a Hugging Face GPT-2 folder (no config.json) nor a "
                        f"train_gpt2.py --log_dir (no model_NNNNN.pt checkpoint)")
    print0(f"loading GPT-2 weights from {init_from}")
    try:
        return GPT.from_pretrained(init_from)
    except (OSError, ValueError) as e:  # no such folder, no weights (offline), not GPT-2: transformers says
        raise UserError(f"{init_from}: {str(e).strip().splitlines()[0]}") from None


def build_model(cfg, given, ckpt, rank=0):
    """(model, its GPTConfig): from the checkpoint, GPT-2 weights or scratch. Under --fsdp 1 only rank 0
    builds it (the others get None and its shape, to be sent their shards of its weights). Shape flags given
    must agree with loaded weights; cfg then records the shape the run really has."""
    source = f"the checkpoint in {cfg.log_dir}" if ckpt else cfg.init_from
    model = config = None
    if rank == 0 or not cfg.fsdp:
        try:
            if ckpt is not None:
                model = model_from_checkpoint(ckpt)
            elif cfg.init_from == "scratch":
                model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in MODEL_FLAGS}))
            else:
                model = load_model(cfg.init_from)
            config = model.config
        except UserError as e:
            config = f"--init_from {e}"
    if cfg.fsdp and dist.is_initialized():  # the others learn rank 0's outcome: the model's shape, or why not
        sent = [config]
        dist.broadcast_object_list(sent, src=0)
        config = sent[0]
    if isinstance(config, str):
        raise UserError(config)
    for k in MODEL_FLAGS:
        if k in given and given[k] != getattr(config, k):
            raise UserError(f"--{k} {given[k]} contradicts {source} ({k} {getattr(config, k)}); drop the "
                            f"flag")
        setattr(cfg, k, getattr(config, k))
    if cfg.seq_len > config.block_size:
        raise UserError(f"--seq_len {cfg.seq_len}: must be <= the model's block_size {config.block_size}")
    return model, config


# -----------------------------------------------------------------------------
# The machine: --device, --dtype and --compile (every script's), DDP, peak FLOP/s


def resolve_system(device, dtype, compile):
    """Every script's --device, --dtype and --compile (as auto_or_bool parsed it), checked and resolved as
    common.SHARED_FLAGS_HELP says: (device, autocast dtype or None for float32, whether to torch.compile, the
    autocast context). Where Triton cannot run, --compile auto is off with a note, and 1 is an error."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise UserError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype}: expected auto, bfloat16, float16 or float32")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if device == "auto":
        device = next(d for d, ok in available.items() if ok)
    elif not available[device.split(":")[0]]:
        raise UserError(f"--device {device}: not available on this machine")
    cuda = device.startswith("cuda")
    # including_emulation=False: emulated bfloat16 "works" on a T4, many times slower than float16
    native_bf16 = cuda and dtype != "float32" and torch.cuda.is_bf16_supported(including_emulation=False)
    if dtype == "bfloat16" and cuda and not native_bf16:
        raise UserError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 (GPUs have "
                        f"it from Ampere on); use --dtype float16")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None,
             "auto": (torch.bfloat16 if native_bf16 else torch.float16) if cuda else None}[dtype]
    use_compile = cuda if compile == "auto" else compile
    problem = None
    capability = torch.cuda.get_device_capability(device) if use_compile and cuda else (7, 0)
    if use_compile and cuda and importlib.util.find_spec("triton") is None:
        problem = ("torch.compile needs Triton for CUDA and it is not installed (pip install triton; on "
                   "Windows, use WSL)")
    elif capability < (7, 0):
        problem = (f"torch.compile's Triton needs a GPU of compute capability 7.0 or newer; "
                   f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
    if problem:
        if compile != "auto":
            raise UserError(f"--compile 1: {problem}; use --compile 0")
        print0(f"note: --compile auto is off: {problem}")
    autocast = torch.autocast(device.split(":")[0], dtype) if dtype else contextlib.nullcontext()
    return device, dtype, use_compile and not problem, autocast


def setup_distributed(device, timeout):
    """(rank, local_rank, world_size, device); DDP where torchrun set RANK, LOCAL_RANK and WORLD_SIZE, on NCCL
    for CUDA where this PyTorch has it (native Windows builds do not: gloo then, with a note), gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
            os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":  # PyTorch #135712, #167288
        raise UserError("torchrun --max-restarts: the restarted ranks would read the previous attempt's "
                        "addresses from torchrun's shared store and fail to connect; run torchrun with "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (and --standalone or "
                        "--rdzv-backend c10d)")
    backend = "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        if backend == "gloo":
            print0("note: this PyTorch has no NCCL (native Windows builds have none): DDP runs on gloo, "
                   "which is slower")
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return rank, local_rank, world_size, device


def peak_flops(device):
    """For MFU: the GPU's dense 16-bit tensor-core peak FLOP/s from the vendors' spec sheets (bf16, or fp16
    on GPUs without it: equal where a GPU has both), first match wins; None on a CPU or an unlisted GPU."""
    if not device.startswith("cuda"):
        return None
    peaks = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
             ("V100", 125e12), ("T4", 65e12))
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in peaks if key in name), None)


# -----------------------------------------------------------------------------
# What the loop calls: evaluations and samples


def estimate_val_loss(model, val_loader, val_tokens, device, autocast, rank, world_size):
    """The mean loss over the val set: the val split's first val_tokens // T sequences of T tokens (each
    target the token after), the same tokens whatever B and the rank count. Rank r scores sequences r,
    r+W, ..., B a forward; every rank runs as many forwards (under FSDP each one all-gathers the weights,
    which every rank must join), rows past its share padding whose targets are ignored."""
    B, T = val_loader.B, val_loader.T
    windows = ((i, t) for i, shard in enumerate(val_loader.shards) for t in range(0, len(shard) - T, T))
    windows = list(itertools.islice(windows, val_tokens // T))
    mine, totals = windows[rank::world_size], torch.zeros(2, device=device)  # summed loss, tokens
    model.eval()
    with torch.no_grad(), autocast:
        for start in range(0, math.ceil(len(windows) / world_size / B) * B, B):
            rows = torch.zeros(B, T + 1, dtype=torch.long)
            for j, (i, t) in enumerate(mine[start:start + B]):
                rows[j] = torch.from_numpy(val_loader.shard(i)[t:t + T + 1].astype(np.int64))
            n = min(B, max(0, len(mine) - start))
            x, y = rows[:, :-1], rows[:, 1:].clone()
            y[n:] = -100  # padding rows: ignored (cross_entropy's ignore_index)
            _, loss = model(x.to(device), y.to(device))
            if n:
                totals += torch.stack([loss.float() * n * T, torch.tensor(n * T, device=device)])
    if world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return (totals[0] / totals[1]).item()


def check_finite(step, log_dir, **values):
    """A NaN/inf loss stops the run before it can overwrite a good checkpoint."""
    if not all(math.isfinite(v) for v in values.values()):
        newest = (checkpoint_paths(log_dir) or ["none"])[-1]
        raise UserError(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in values.items()) + ": the run "
                        f"diverged; stopping without a checkpoint (newest good one: {newest}). Lower "
                        f"--max_lr or check the data")


SAMPLE_PROMPT = "Hello, I'm a language model,"


def write_samples(model, enc, prompt, step, log_dir, autocast, rank):
    """4 samples continuing `prompt` (tokens; 32 in all, seed 42), printed and added to samples.txt by
    rank 0. Every rank generates them, since under FSDP each forward all-gathers the weights, which every
    rank must join."""
    rows = model.generate(prompt, 4, max_new_tokens=32 - len(prompt), seed=42, autocast=autocast,
                          n_vocab=enc.n_vocab)
    if rank == 0:
        with open(os.path.join(log_dir, "samples.txt"), "a") as f:
            for i, row in enumerate(rows):
                text = enc.decode(row.tolist())
                print0(f"step {step:5d} | sample {i}: {text}")
                f.write(f"{step} sample {i}: {text!r}\n")


# -----------------------------------------------------------------------------
# TRAINING SECTION: the set-up, then the loop


def train(cfg, given, ckpt):
    check_train_flags(cfg)
    device, dtype, use_compile, autocast = resolve_system(cfg.device, cfg.dtype, cfg.compile)
    for split in ("train", "val"):  # fail on a wrong --data_dir before loading or downloading any weights
        find_shards(cfg.data_dir, split)
    rank, local_rank, world_size, device = setup_distributed(device, cfg.dist_timeout)
    ddp, device_type = dist.is_initialized(), device.split(":")[0]
    B, T = cfg.micro_batch_size, cfg.seq_len
    if cfg.total_batch_size % (B * T * world_size):
        raise UserError(f"--total_batch_size {cfg.total_batch_size} must be divisible by micro_batch_size * "
                        f"seq_len * world_size = {B} * {T} * {world_size} = {B * T * world_size}; change "
                        f"--total_batch_size or --micro_batch_size")
    grad_accum_steps = cfg.total_batch_size // (B * T * world_size)
    use_hellaswag = device_type == "cuda" if cfg.hellaswag == "auto" else cfg.hellaswag
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    provenance = run_provenance(device)  # what made this run, in log.txt and every checkpoint

    # The model, its optimizer and the data; on resume, all as the checkpoint left them
    torch.manual_seed(cfg.seed)  # on every device
    whole, config = build_model(cfg, given, ckpt, rank)
    if cfg.fsdp:  # FSDP2, before the optimizer, which then holds this rank's shards only
        # Each Block, then the root with the rest (lm_head's weight is wte's: sharded once, so the tying
        # survives), of a copy on the meta device, given memory for this rank's shards only; rank 0 then
        # sends each rank its shards of its whole model, a tensor at a time, and frees it.
        # Under autocast the weights are all-gathered in its dtype, the gradients reduced in float32.
        with torch.device("meta"):
            raw_model = GPT(config)
        mesh = init_device_mesh(device_type, (world_size,))
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        for module in (*raw_model.transformer.h, raw_model):
            fully_shard(module, mesh=mesh, mp_policy=policy)
        raw_model.to_empty(device=device)
        set_model_state_dict(raw_model, whole.state_dict() if whole else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del whole
    else:
        raw_model = whole.to(device)
    raw_model.chunked_loss = device_type == "cpu" if cfg.chunked_loss == "auto" else cfg.chunked_loss
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    optimizers = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, device_type, cfg.optimizer)
    decay, no_decay = (group["params"] for group in optimizers[-1].param_groups)  # AdamW's
    print0(f"decayed tensors: {len(decay)} ({sum(p.numel() for p in decay):,} parameters), "
           f"not decayed: {len(no_decay)} ({sum(p.numel() for p in no_decay):,} parameters)")
    if cfg.optimizer == "muon":
        hidden = optimizers[0].param_groups[0]["params"]
        print0(f"muon: {len(hidden)} block matrices ({sum(p.numel() for p in hidden):,} parameters)")
    # float16 (GPUs without bfloat16): gradients as small as float16's 6e-8 would round to 0, so the loss
    # is scaled up before backward and the gradients back down before clipping. A step whose gradients
    # overflow is skipped and the scale halved; it doubles again after 2000 good steps.
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    train_loader = DataLoaderLite(cfg.data_dir, "train", B, T, rank, world_size, cfg.vocab_size, cfg.shuffle,
                                  cfg.seed)
    val_loader = DataLoaderLite(cfg.data_dir, "val", B, T, rank, world_size, cfg.vocab_size)
    if cfg.val_steps:  # once: the checkpoint then records val_tokens, which a resume of another B keeps
        print0(f"note: --val_steps {cfg.val_steps} is read as --val_tokens {cfg.val_steps * B * T} ({B}x{T} "
               f"each)")
        cfg.val_tokens, cfg.val_steps = cfg.val_steps * B * T, 0
    val_seqs = min(cfg.val_tokens // T, sum((len(s) - 1) // T for s in val_loader.shards))
    print0(f"val loss: {val_seqs * T:,} tokens ({val_seqs} sequences of {T}) at every eval, split over the "
           f"ranks" + ("" if val_seqs * T >= cfg.val_tokens else f", all the val split holds of --val_tokens "
                                                                  f"{cfg.val_tokens:,}"))
    start_step = 0 if ckpt is None else ckpt["step"]
    if ckpt is not None:
        restore_state(ckpt, raw_model, optimizers, scaler, train_loader, val_loader)
        print0(f"resuming from {checkpoint_paths(cfg.log_dir)[-1]} at step {start_step}")
    # One static graph per input shape (train, val, HellaSwag): with dynamic shapes, the second shape
    # seen would recompile everything, the training step too, into a slower dynamic-shape graph.
    eval_model = torch.compile(raw_model, dynamic=False) if use_compile and not cfg.fsdp else raw_model
    if use_compile and cfg.fsdp:  # the root's FSDP hooks would send its whole forward back to eager: by block
        for block in raw_model.transformer.h:
            block.compile(dynamic=False)
    model = eval_model  # DDP wraps it only for training: evaluations have no gradients to all-reduce
    if ddp and not cfg.fsdp:  # FSDP's modules reduce their gradients themselves
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda"
                                                    else None)

    # What the loop scores (HellaSwag) and writes (samples, log.txt, loss.png, W&B); the log is started last,
    # so that a refusal here leaves no log.txt in the way of the corrected command
    samples = cfg.sample_interval > 0 and raw_model.config.vocab_size >= GPT2_VOCAB_SIZE  # GPT-2 text only
    enc = gpt2_tokenizer() if samples or use_hellaswag else None
    prompt = enc.encode(SAMPLE_PROMPT) if samples else []  # empty: no samples
    if len(prompt) >= raw_model.config.block_size:
        print0(f"note: no samples: their prompt has {len(prompt)} tokens and the model's context "
               f"(block_size) {raw_model.config.block_size}; --sample_interval 0 hides this note")
        prompt = []
    if use_hellaswag:
        hella_examples, hella_len = hellaswag_share(cfg.hellaswag_dir, cfg.hellaswag_limit, enc, raw_model,
                                                    rank, world_size)
    attempt = attempt_record(cfg, provenance, world_size, sys.argv)  # log.txt's line for this attempt
    log_file = start_log(cfg.log_dir, start_step if ckpt else None, attempt) if rank == 0 else None
    wandb_run = start_wandb(cfg, ckpt) if cfg.wandb and rank == 0 else None
    plots = rank == 0 and cfg.plot
    flops_per_step = raw_model.flops_per_token(T) * cfg.total_batch_size
    eta = ETA(start_step, cfg.max_steps, (cfg.eval_interval, cfg.ckpt_interval, cfg.sample_interval))
    peak = peak_flops(device)
    print0(f"{sum(p.numel() for p in raw_model.parameters()):,} parameters | {world_size} process(es) on "
           f"{device} | {str(dtype or torch.float32).removeprefix('torch.')} | compile "
           f"{'on' if use_compile else 'off'} | chunked loss {'on' if raw_model.chunked_loss else 'off'} | "
           f"{cfg.total_batch_size:,} tokens per step = {B} x {T} x {world_size} x {grad_accum_steps} "
           f"accumulation steps")
    # What training keeps per rank before any activation: the weights, gradients (as many) and AdamW's
    # two moments (twice as many), counted from this rank's own tensors (its shards under FSDP)
    weights = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in raw_model.parameters())
    held = f"sharded over {world_size} ranks" if cfg.fsdp else "a full copy on every rank"
    print0(f"memory per rank: weights {format_bytes(weights)}, gradients {format_bytes(weights)}, AdamW "
           f"state {format_bytes(2 * weights)} = {format_bytes(4 * weights)}, {held}, before activations")

    with StopRequest() as stop:
        stopping = False
        for step in range(start_step, cfg.max_steps + 1):
            # Evaluate, sample and checkpoint the model as `step` updates left it, then update it. A stop
            # request only checkpoints; the resume evaluates what it skipped (a checkpoint without val_loss).
            last = step == cfg.max_steps or stopping
            val_loss = acc_norm = None
            if (step % cfg.eval_interval == 0 or step % cfg.ckpt_interval == 0 or last) and not stopping \
                    and not (step == start_step and ckpt is not None and ckpt.get("val_loss") is not None):
                val_loss = estimate_val_loss(eval_model, val_loader, cfg.val_tokens, device, autocast, rank,
                                             world_size)
                check_finite(step, cfg.log_dir, val_loss=val_loss)
                print0(f"step {step:5d} | val loss {val_loss:.4f}")
                if use_hellaswag:
                    _, correct_norm, n = score(eval_model, hella_examples, enc, device, max(1, B // 4),
                                               autocast, hella_len, world_size=world_size)
                    acc_norm = correct_norm / n
                    print0(f"step {step:5d} | hellaswag acc_norm {acc_norm:.4f}")
                log_values(log_file, wandb_run, step, val=val_loss, hella=acc_norm)
                if plots:
                    plots = refresh_plot(log_file, os.path.join(cfg.log_dir, "loss.png"))
            if prompt and step > start_step and (step % cfg.sample_interval == 0 or step == cfg.max_steps):
                write_samples(raw_model, enc, prompt, step, cfg.log_dir, autocast, rank)
            # A resume's first step writes its checkpoint again, now with the val loss it lacked
            remeasured = ckpt is not None and val_loss is not None
            if (step > start_step or remeasured) and (step % cfg.ckpt_interval == 0 or last):
                state = checkpoint_state(raw_model, optimizers, scaler, cfg, step, (train_loader, val_loader),
                                         provenance, val_loss=val_loss, hellaswag=acc_norm,
                                         wandb_id=wandb_run.id if wandb_run else None)
                if rank == 0:
                    print0(f"wrote {save_checkpoint(state, cfg.log_dir, cfg.keep_last)}")
            if last:
                break

            # One optimizer step: total_batch_size tokens, grad_accum_steps micro-batches on each rank
            t0 = time.time()
            model.train()
            # Not model.zero_grad(): after an eval, FSDP's root module holds its unsharded parameters
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss_accum = torch.zeros((), device=device)
            for micro_step in range(grad_accum_steps):
                x, y = train_loader.next_batch()
                # Under DDP or FSDP, reduce the gradients only after the last micro-step's backward
                sync = micro_step == grad_accum_steps - 1
                if cfg.fsdp:
                    raw_model.set_requires_gradient_sync(sync)
                elif ddp:
                    model.require_backward_grad_sync = sync  # as build-nanogpt does; what no_sync() sets
                with autocast:
                    _, loss = model(x.to(device), y.to(device))
                loss = loss / grad_accum_steps  # the whole batch's mean, not a sum of micro-batch means
                loss_accum += loss.detach()
                scaler.scale(loss).backward()  # scaled in float16 only
            # One all-reduce and one host sync per step: the mean loss, and whether any rank was signalled.
            stop_flag = torch.tensor(float(stop.requested), device=device)
            stats = torch.stack([loss_accum, stop_flag])
            if ddp:
                dist.all_reduce(stats, op=dist.ReduceOp.AVG)
            for opt in optimizers:
                scaler.unscale_(opt)  # float16: the true gradients again, for clipping
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            if isinstance(norm, DTensor):  # FSDP: each rank's part of the norm of its gradient shards
                norm = norm.full_tensor()
            loss_value, stop_value, norm_value = torch.cat([stats, norm.to(stats.dtype).view(1)]).tolist()
            check_finite(step, cfg.log_dir, loss=loss_value)
            if not scaler.is_enabled():  # in float16, inf/nan gradients are an overflow: the step is skipped
                check_finite(step, cfg.log_dir, grad_norm=norm_value)
            skipped = not math.isfinite(norm_value)  # float16 overflow anywhere: every optimizer skips
            lr = get_lr(step, cfg)
            loss_scale = scaler.get_scale() if scaler.is_enabled() else None
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
                if not skipped:
                    scaler.step(opt)  # opt.step(), after unscale_ above
            scaler.update()  # float16: the scale halved after an overflow
            if device_type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0

            mfu = 100 * flops_per_step / dt / (peak * world_size) if peak else None
            print0(step_line(step, loss_value, lr, norm_value, dt, cfg.total_batch_size, mfu, loss_scale,
                             skipped, eta.update(step, t0 + dt)))
            if step == start_step:
                print0(f"peak memory after the first step: {format_bytes(peak_memory(device))} "
                       f"({'CUDA, rank 0' if device_type == 'cuda' else 'peak RSS of rank 0'})")
            log_values(log_file, wandb_run, step, train=loss_value, lr=lr, grad_norm=norm_value, mfu=mfu,
                       tokens_per_sec=cfg.total_batch_size / dt, loss_scale=loss_scale, skipped=skipped,
                       time=t0 + dt)
            stopping = stop_value > 0
            if stopping:
                print0("stop requested (SIGTERM/SIGINT/SIGHUP): writing a checkpoint, then exiting "
                       "(Ctrl-C again to abort)")

    if rank == 0:  # the attempt's end in log.txt, then log_dir/report.md from log.txt and the checkpoint
        print0(f"wrote {end_log(log_file, step)}")
    if wandb_run is not None:
        wandb_run.finish()


def main(argv=None):
    cfg, given = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        # rank 0, the only rank that writes in log_dir, holds it for the run's life
        with hold_folder(cfg.log_dir, "--log_dir", create=cfg.init_from != "resume") if rank == 0 \
                else contextlib.nullcontext():
            cfg, ckpt = resume_config(cfg, given, rank)
            train(cfg, given, ckpt)
        if dist.is_initialized():
            # Only once train()'s DDP/FSDP modules are freed (FSDP's in reference cycles): a process group
            # they outlive is torn down by them, or at exit, while gloo's threads may still free a tensor
            # that needs the GIL: a hang or a SIGABRT instead of exit 0.
            gc.collect()
            dist.destroy_process_group()
    except UserError as e:
        if rank == 0:
            print(f"train_gpt2.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, RuntimeError) as e:
        last = (checkpoint_paths(cfg.log_dir) or ["none"])[-1]
        # Ctrl-C before the loop, or a second one in it (in torch.save's writing: a RuntimeError then)
        if KeyboardInterrupt in (type(e), type(e.__context__)):
            if rank == 0:
                print(f"train_gpt2.py: aborted by Ctrl-C; the last good checkpoint is {last}",
                      file=sys.stderr)
            sys.exit(130)
        # A peer's death or a collective's timeout: gloo raises these; NCCL aborts
        lost = re.search(r"timed out|timeout|connection (reset|closed) by peer", str(e), re.IGNORECASE)
        if not (dist.is_initialized() and lost):
            raise
        why = "another rank closed its connection: it died"
        if "time" in lost[0].lower():
            why = (f"a collective waited more than --dist_timeout {cfg.dist_timeout} s for the other "
                   f"ranks, so one is frozen or dead")
        print(f"train_gpt2.py: error: rank {rank}: {why}; the last checkpoint is {last}", file=sys.stderr,
              flush=True)
        # Now, without Python's exit: that would tear down the process group mid-collective (SIGABRT)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
