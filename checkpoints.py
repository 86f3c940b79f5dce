"""Checkpoints: what a train_gpt2.py run writes to resume, and how it is read back.

log_dir/model_NNNNN.pt is the state after NNNNN optimizer steps: the weights, the optimizer's state, the
float16 loss scale, the flags, the loader's position and a record of the data (each shard's name, length
and a checksum of a few samples; and each train shard read, checksummed whole). It is written atomically
(a temporary file, flushed to disk, renamed), the oldest are pruned to keep_last, and it is read with
weights_only=True, so loading one runs no code, and memory-mapped, so the processes of one machine share
its pages. A resume takes the checkpoint's flags as its defaults, refuses what cannot continue exactly
(other optimizer, changed shards, another shuffle order), and goes on at the first token no rank has
read. A SIGTERM, SIGINT or SIGHUP (StopRequest) makes the loop write one and exit.
"""

import dataclasses
import glob
import hashlib
import os
import pickle
import re
import signal
import stat
import sys
import zlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from common import UserError, auto_or_bool, disk_full, print0, write_synced


def checkpoint_paths(log_dir):
    """Checkpoints in log_dir, oldest first."""
    if not os.path.isdir(log_dir):
        return []
    names = [n for n in os.listdir(log_dir) if re.fullmatch(r"model_\d{5,}\.pt", n)]
    return [os.path.join(log_dir, n) for n in sorted(names, key=lambda n: int(n[6:-3]))]


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint")
    try:
        # weights_only: loading runs no code. mmap: tensors are read from the file's pages as used, shared by
        # every process that loads it (the page cache), not copied into each one's memory
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        missing = {"model", "optimizer", "model_config", "config", "step"} - set(ckpt)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and found:  # weights_only met pickled objects, maybe code
            raise UserError(f"{path}: holds objects that are not plain tensors and data ({found[1]}), so it "
                            f"was refused without loading it") from None
        raise UserError(f"{path}: cannot read the checkpoint ({type(e).__name__}); it is corrupt or "
                        f"truncated: move it away and use the one before") from None
    if missing:
        raise UserError(f"{path}: not a train_gpt2.py checkpoint (no {', '.join(sorted(missing))})")
    return ckpt


def checkpoint_file(path):
    """The checkpoint path names: path itself, or for a folder (a --log_dir) its newest model_NNNNN.pt."""
    if os.path.isdir(path):
        paths = checkpoint_paths(path)
        if not paths:
            raise UserError(f"{path}: no model_NNNNN.pt checkpoint in this folder")
        return paths[-1]
    if path.endswith(".pt.tmp"):  # save_checkpoint's temporary name
        raise UserError(f"{path}: a checkpoint still being written, or cut short by a crash; pass a "
                        f"finished model_NNNNN.pt, or its folder for the newest one")
    return path


# -----------------------------------------------------------------------------
# Writing: the run's state, atomically; and the stop signals after which the loop writes it


def shard_record(path, tokens):
    """What a checkpoint records of a shard, to see later whether it changed: its name, its token count,
    and a crc32 of its first, middle and last 2048 tokens (a cheap look at a 200 MB shard)."""
    starts = (0, len(tokens) // 2, max(0, len(tokens) - 2048))
    crc = zlib.crc32(b"".join(tokens[i:i + 2048].tobytes() for i in starts))
    return [os.path.basename(path), len(tokens), crc]


def run_provenance(device):
    """What made a run, for log.txt and every checkpoint: torch's version, the device, and the first 16 hex
    digits of a sha256 over the repository's scripts and modules (every .py file beside this one)."""
    source = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py"))):
        with open(path, "rb") as f:
            source.update(f.read())
    return {"torch": str(torch.__version__), "device": device, "source_sha256": source.hexdigest()[:16]}


def peak_memory(device):
    """This process's peak memory so far, in bytes: torch.cuda.max_memory_allocated on CUDA, else the peak
    RSS (Unix)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    import resource  # Unix
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024)


def checkpoint_state(model, optimizers, scaler, cfg, step, loaders, provenance, **values):
    """What a resume needs after `step` optimizer steps (the train loader's position is the same on every
    rank; the shards' record lets a resume check its data), what made it, each rank's peak memory so far
    (for report.md), and values (val_loss, hellaswag, wandb_id) for export.py and W&B. Every rank calls it;
    under DDP or FSDP only rank 0's is whole."""
    train_loader, val_loader = loaders
    mine = peak_memory(provenance["device"])
    peaks = [mine]
    if dist.is_initialized():  # every rank is here: rank r's peak at [r]
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, mine)
    # Whole tensors, on the CPU, on rank 0 (other ranks get none): under FSDP gathered from the shards
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    data = {"dir": os.path.realpath(cfg.data_dir), "train": train_loader.record, "val": val_loader.record,
            "read": train_loader.crcs}  # each train shard read, checksummed whole (this rank's)
    weights = get_model_state_dict(model, options=full)
    if weights:  # rank 0's. FSDP gathers the tied wte/lm_head weight once per name: one again, saved once
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    return {"model": weights, "scaler": scaler.state_dict(),
            "optimizer": get_optimizer_state_dict(model, optimizers, options=full),
            "model_config": dataclasses.asdict(model.config), "config": dataclasses.asdict(cfg), "step": step,
            "loader_position": list(train_loader.position), "data": data, "provenance": provenance,
            "peak_memory": peaks, **values}


def save_checkpoint(ckpt, log_dir, keep_last):
    """Write atomically (temp file, fsync, rename), then delete all but the newest keep_last."""
    path = os.path.join(log_dir, f"model_{ckpt['step']:05d}.pt")
    try:
        write_synced(path + ".tmp", lambda f: torch.save(ckpt, f))
    except Exception as e:
        if disk_full(e):
            raise UserError(f"disk full in {log_dir}: {os.path.basename(path)} was not written and the "
                            f"checkpoints before it are untouched; free space, then continue with "
                            f"--init_from resume") from None
        raise
    os.replace(path + ".tmp", path)
    for p in checkpoint_paths(log_dir)[:-keep_last] if keep_last else []:
        os.remove(p)
    return path


class StopRequest:
    """While active, SIGTERM/SIGINT/SIGHUP (a closed terminal or ssh session) set `requested`: the loop
    finishes its step, writes a checkpoint and exits 0. A second Ctrl-C raises KeyboardInterrupt at once."""

    def __enter__(self):
        self.requested = False
        signals = {signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", signal.SIGTERM)}  # Windows: none
        self.previous = {sig: signal.signal(sig, self.handle) for sig in signals}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        # No printing here: a print interrupted by a print raises "reentrant call". The loop reports it.
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if signum == getattr(signal, "SIGHUP", None):
            # The terminal is gone: every write to it would now fail (EIO). Send them to /dev/null instead.
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(devnull, fd)


# -----------------------------------------------------------------------------
# Resuming: the checkpoint's flags, then its state, refusing what would not continue exactly


def resume_config(cfg, given, rank=0):
    """(flags, checkpoint): with --init_from resume (or --auto_resume 1 and a checkpoint there), the newest
    checkpoint in log_dir and its flags as the defaults, so `--init_from resume` alone continues the same
    run, on the data it recorded; else (cfg, None), refusing a log_dir that already holds checkpoints or an
    earlier run's log. Rank 0 (which holds log_dir) removes a checkpoint a crash left half-written and,
    under --auto_resume, moves an unreadable newest one aside for the one before."""
    for name in os.listdir(cfg.log_dir) if rank == 0 and os.path.isdir(cfg.log_dir) else []:
        if re.fullmatch(r"model_\d{5,}\.pt\.tmp", name):
            os.remove(os.path.join(cfg.log_dir, name))
            print0(f"note: removed {os.path.join(cfg.log_dir, name)}, a checkpoint a crash left half-written")
    paths, ckpt = checkpoint_paths(cfg.log_dir), None
    while cfg.auto_resume and paths and ckpt is None:  # a restart must not fail the same way every time
        try:
            ckpt = load_checkpoint(paths[-1])
        except UserError:
            if rank == 0:
                os.replace(paths[-1], paths[-1] + ".unreadable")
                print0(f"note: --auto_resume: {paths[-1]} cannot be read, so it is moved aside (kept) to "
                       f"{paths[-1]}.unreadable, and the run goes on from the one before, if any")
            paths.pop()
    if cfg.init_from != "resume" and not (cfg.auto_resume and paths):
        if paths:
            raise UserError(f"{cfg.log_dir}/ already holds checkpoints (newest {paths[-1]}): continue them "
                            f"with --init_from resume, or pick a new --log_dir")
        # A new run would overwrite log.txt and add to samples.txt. An --auto_resume run (restarting before
        # its first checkpoint, or in a folder whose checkpoints are gone) keeps them, as log.N.txt, ...
        for name in ("log.txt", "samples.txt"):
            path = os.path.join(cfg.log_dir, name)
            if os.path.isfile(path) and not cfg.auto_resume:
                raise UserError(f"{cfg.log_dir}/ already holds the {name} of an earlier run, without a "
                                f"checkpoint to resume: move it away, or pick a new --log_dir")
            if os.path.isfile(path) and rank == 0:
                stem, n = path[:-len(".txt")], 1
                while os.path.exists(f"{stem}.{n}.txt"):
                    n += 1
                os.replace(path, f"{stem}.{n}.txt")
                print0(f"note: --auto_resume: no checkpoint in {cfg.log_dir}/ to resume, so this run starts "
                       f"anew; the {name} there is kept as {stem}.{n}.txt")
        return cfg, None
    if not paths:
        raise UserError(f"--init_from resume: no model_NNNNN.pt checkpoint in {cfg.log_dir}/ to resume from")
    ckpt = ckpt or load_checkpoint(paths[-1])
    if not all(isinstance(n, str) for group in ckpt["optimizer"]["param_groups"] for n in group["params"]):
        raise UserError(f"{paths[-1]}: written by an older train_gpt2.py, whose optimizer state this one "
                        f"cannot read; continue that run with the train_gpt2.py that wrote it, or pick a "
                        f"new --log_dir")
    flags = {f.name for f in dataclasses.fields(cfg)}  # train_gpt2.TrainConfig's: what this version takes
    saved = {k: v for k, v in ckpt["config"].items() if k in flags}
    for k in {"hellaswag", "compile", "chunked_loss"} & set(saved):  # older checkpoints: text, e.g. "1"
        saved[k] = auto_or_bool(str(saved[k]))
    if "data_dir" not in given and "data" in ckpt:  # the data it read, wherever this resume is started
        saved["data_dir"] = ckpt["data"]["dir"]
        if not os.path.isdir(saved["data_dir"]):
            raise UserError(f"{paths[-1]}: its data folder {saved['data_dir']} is gone (moved or deleted); "
                            f"pass --data_dir the folder that holds those shards now")
    shape = ckpt["model_config"]  # the model's shape flags; build_model refuses given ones that differ
    cfg = type(cfg)(**{**saved, **given, **shape, "init_from": "resume"})
    if cfg.optimizer != saved.get("optimizer", "adamw"):
        raise UserError(f"--optimizer {cfg.optimizer}: {paths[-1]} holds the state of --optimizer "
                        f"{saved.get('optimizer', 'adamw')}; resume with that, or start a new run")
    if cfg.max_steps < ckpt["step"]:
        raise UserError(f"--max_steps {cfg.max_steps}: {paths[-1]} is at step {ckpt['step']} already, so "
                        f"there is nothing to train; give --max_steps above {ckpt['step']}")
    return cfg, ckpt


def first_change(then, now):
    """The first difference, in name order, between two lists of a split's shard_records: "NAME is new",
    "is missing", "has changed (...)" or "holds other tokens"; None if there is none."""
    old, new = ({name: (n, crc) for name, n, crc in records} for records in (then, now))
    for name in sorted(old.keys() | new.keys()):
        if name not in old:
            return f"{name} is new"
        if name not in new:
            return f"{name} is missing"
        (n_then, crc_then), (n_now, crc_now) = old[name], new[name]
        if n_then != n_now:
            return f"{name} has changed ({n_then} tokens then, {n_now} now)"
        if crc_then != crc_now:
            return f"{name} holds other tokens"
    return None


def restore_state(ckpt, model, optimizers, scaler, train_loader, val_loader):
    """Load a checkpoint's optimizer and loss scale (then drop its tensors), and continue at its first unread
    token, in the same data whatever B, T and the rank count; changed data is refused at its first
    difference, another --data_dir (a new corpus) read from its start."""
    # Whole tensors, as saved, into this rank's shards: under FSDP rank 0 sends each rank its part of each,
    # which is copied into the optimizer's own state, so no rank holds the whole state or two of its own
    fsdp = any(isinstance(p, DTensor) for p in model.parameters())
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=fsdp)
    set_optimizer_state_dict(model, optimizers, ckpt["optimizer"], options=options)
    del ckpt["model"], ckpt["optimizer"]  # now the model's and optimizers' own: not kept twice for the run
    if scaler.is_enabled() and ckpt.get("scaler"):  # a float16 run's loss scale (a new one after bf16/fp32)
        scaler.load_state_dict(ckpt["scaler"])
    then, data = ckpt["config"], ckpt["data"]
    data_dir = os.path.dirname(train_loader.paths[0])
    now = {"train": train_loader.record, "val": val_loader.record}
    if os.path.realpath(data_dir) != data["dir"] and [data["train"], data["val"]] != list(now.values()):
        print0(f"note: --data_dir {data_dir} is not the data of the checkpoint ({then['data_dir']}): its "
               f"train split is read from its beginning, and val loss measured on its val split")
        return  # a new corpus; a copy of the same data continues where the checkpoint stopped
    change = first_change(data["val"], now["val"])
    if change:  # val has no position to lose, only its curve's comparability
        print0(f"note: --data_dir {data_dir}: val shard {change} since the checkpoint, so val loss from "
               f"here on is measured on other tokens than before")
    change = first_change(data["train"], now["train"])
    if change:
        raise UserError(f"--data_dir {data_dir}: train shard {change} since the checkpoint, so its "
                        f"position would read other tokens; restore the shards, or resume with the "
                        f"changed data under another --data_dir to read it from its beginning")
    b, t, shuffle = then["micro_batch_size"], then["seq_len"], then["shuffle"]
    if shuffle != train_loader.shuffle:
        raise UserError(f"--shuffle {int(train_loader.shuffle)}: the checkpoint's run read its data in "
                        f"{'shuffled' if shuffle else 'sorted'} order and its position holds in that order "
                        f"only; keep --shuffle {int(shuffle)}")
    if shuffle and b * t != train_loader.B * train_loader.T:
        raise UserError(f"--micro_batch_size {train_loader.B} --seq_len {train_loader.T}: a shuffled run's "
                        f"position holds for micro-batches of its size only; keep --micro_batch_size {b} "
                        f"--seq_len {t}")
    train_loader.position = tuple(ckpt["loader_position"])
    train_loader.expected = data.get("read", {})  # each shard is checked whole when first read again
