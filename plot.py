"""Plot train loss, val loss and HellaSwag acc_norm against step from a train_gpt2.py log.

    python plot.py                                                  # log/log.txt -> log/loss.png
    python plot.py --log_file run2/log.txt --out run2.png --references 0
    python plot.py --help                                           # every flag

This file owns what a run logs: train_gpt2.py starts (or, on resume, trims) log.txt with start_log(),
writes its lines (and W&B's, with --wandb 1) with log_values(), prints step_line() after every step, and
calls refresh_plot() at every eval, so log/loss.png follows a run as it trains (when matplotlib is
installed). The dashed lines are OpenAI's GPT-2 124M on the same evals: val loss 3.2924 on the
FineWeb-Edu val shard, and HellaSwag acc_norm 0.2955 (hellaswag.py --model gpt2).
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

from common import UserError, config_parser, option, write_synced

# OpenAI's GPT-2 124M evaluated as train_gpt2.py evaluates (build-nanogpt's numbers): the reference lines
# here and the reference column of export.py's model card
GPT2_124M_VAL_LOSS = 3.2924  # on the FineWeb-Edu val shard
GPT2_124M_HELLASWAG = 0.2955  # acc_norm on the 10,042 val tasks


def parse_line(line):
    """A log.txt line as (step, kind, value): `STEP KIND VALUE`, or `# STEP {provenance}` as (STEP, "#",
    the provenance's text). Any other line is a ValueError."""
    first, second, rest = line.split(maxsplit=2)
    if line.startswith("# "):
        return int(second), "#", rest.strip()
    return int(first), second, float(rest)


def read_log(log_file):
    """log.txt's `STEP KIND VALUE` lines as {kind: ([steps], [values])}, in file order. Every kind is
    kept, not only train, val and hella; plot_log() draws those three and ignores the rest. `# ` lines
    (the run's provenance: torch, device, source hash) are not data."""
    if not os.path.exists(log_file):
        raise UserError(f"{log_file} not found; pass --log_file")
    if os.path.isdir(log_file):
        raise UserError(f"{log_file} is a folder; pass --log_file its log.txt")
    with open(log_file, "rb") as f:
        try:
            text = f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{log_file}: not a text log (byte {e.object[e.start]:#04x} at offset "
                            f"{e.start})") from None
    series = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("# "):
            continue
        try:
            step, kind, value = parse_line(line)
        except ValueError:
            raise UserError(f"{log_file} line {n}: expected STEP KIND VALUE, e.g. '250 val 3.2924', "
                            f"got {line.strip()!r}") from None
        steps, values = series.setdefault(kind, ([], []))
        steps.append(step)
        values.append(value)
    if not series:
        raise UserError(f"{log_file}: no log lines yet")
    return series


def start_log(log_dir, resume_step, provenance):
    """log_dir/log.txt, new; or, resuming at resume_step, without the lines a crashed run wrote after
    its checkpoint (train line N is the update after N), nor damaged lines (torn by a crash mid-write,
    bytes that are not text: dropped with a note). Then `# STEP {provenance}`, unless the run's last such
    line says the same: a resume with other code, torch or device says so where it starts."""
    log_file = os.path.join(log_dir, "log.txt")  # in log_dir, made by main() (hold_folder)
    lines = []
    if resume_step is not None and os.path.exists(log_file):
        try:
            with open(log_file, "rb") as f:
                lines = f.readlines()
        except OSError as e:  # e.g. a folder named log.txt
            raise UserError(f"--log_dir {log_dir}: cannot read {log_file} ({e.strerror}); move it away or "
                            f"pick another --log_dir") from None
    kept, damaged, made_by = [], [], None
    for n, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8")
            step, kind, value = parse_line(text)
        except ValueError:  # UnicodeDecodeError is a ValueError too
            if raw.strip():
                damaged.append(n)
            continue
        if step < resume_step or (step == resume_step and kind != "train"):
            kept.append(text.rstrip("\n") + "\n")
            if kind == "#":
                made_by = value
    if made_by != json.dumps(provenance):
        kept.append(f"# {resume_step or 0} {json.dumps(provenance)}\n")
    try:  # rewritten atomically: a crash here loses nothing
        write_synced(log_file + ".tmp", lambda f: f.write("".join(kept).encode()))
        os.replace(log_file + ".tmp", log_file)
    except OSError as e:  # a full disk
        raise UserError(f"--log_dir {log_dir}: cannot write {log_file} there ({e.strerror}); pick another "
                        f"--log_dir") from None
    if damaged:
        print(f"note: {log_file}: dropped {len(damaged)} damaged line(s) (line "
              f"{', '.join(map(str, damaged[:5]))}{', ...' if len(damaged) > 5 else ''}), e.g. torn by a "
              f"crash mid-write; every other line is kept", flush=True)
    return log_file


def start_wandb(cfg, ckpt):
    """A W&B run for this run; a resumed run continues the checkpoint's W&B run."""
    import wandb
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, dir=cfg.log_dir,
                      config=dataclasses.asdict(cfg), id=ckpt and ckpt.get("wandb_id"), resume="allow")


def log_values(log_file, wandb_run, step, **values):
    """The val, hella and train values as log.txt lines, and every value but None to W&B (log_file and
    wandb_run None, as on ranks but 0: neither)."""
    values = {k: v for k, v in values.items() if v is not None}
    if log_file is not None:
        with open(log_file, "a") as f:
            for kind in ("val", "hella", "train"):
                if kind in values:
                    f.write(f"{step} {kind} {values[kind]:.{6 if kind == 'train' else 4}f}\n")
    if wandb_run is not None:
        wandb_run.log(values, step=step)


def step_line(step, loss, lr, norm, dt, tokens, mfu, loss_scale, skipped):
    """The line printed after each optimizer step (loss_scale None: not float16)."""
    return (f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {1000 * dt:.0f}ms"
            f" | tok/sec {tokens / dt:,.0f}" + (f" | mfu {mfu:.1f}%" if mfu else "")
            + (f" | loss scale {loss_scale:g}" if loss_scale is not None else "")
            + (" | skipped: float16 gradients overflowed, loss scale halved" if skipped else ""))


def plot_log(log_file, out_png, references=True):
    """Draw log_file's losses, and in a second panel its HellaSwag acc_norm if it has any, into out_png;
    returns out_png. Raises UserError for a bad log, and ImportError without matplotlib (imported here, so
    that training runs without it)."""
    from matplotlib.figure import Figure

    if os.path.isdir(out_png):
        raise UserError(f"{out_png} is a folder; pass --out a .png file's path")
    series = read_log(log_file)
    panels = 2 if "hella" in series else 1  # no empty HellaSwag panel for a run without its evals (off CUDA)
    fig = Figure(figsize=(6 * panels, 4.5), dpi=100, layout="constrained")
    last_step = max(max(steps) for steps, _ in series.values())
    fig.suptitle(f"{log_file}, step {last_step}")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    loss_ax = axes[0]

    if "train" in series:
        loss_ax.plot(*series["train"], linewidth=0.8, alpha=0.7, color="C0", label="train loss")
    if "val" in series:
        loss_ax.plot(*series["val"], "o-", markersize=3, color="C1", label="val loss")
    if references:
        loss_ax.axhline(GPT2_124M_VAL_LOSS, color="gray", linestyle="--",
                        label=f"OpenAI GPT-2 124M val loss ({GPT2_124M_VAL_LOSS}, FineWeb-Edu val shard)")
    loss_ax.set(xlabel="step", ylabel="loss", title="train and val loss")
    if loss_ax.lines:  # a log of HellaSwag lines only, drawn with references=False, has none
        loss_ax.legend()

    if "hella" in series:
        hella_ax = axes[1]
        hella_ax.plot(*series["hella"], "o-", markersize=3, color="C2", label="HellaSwag acc_norm")
        if references:
            hella_ax.axhline(GPT2_124M_HELLASWAG, color="gray", linestyle="--",
                             label=f"OpenAI GPT-2 124M acc_norm ({GPT2_124M_HELLASWAG})")
        hella_ax.legend()
        hella_ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
    for ax in axes:
        ax.grid(alpha=0.3)

    # Saved beside out_png, then renamed over it: someone viewing loss.png mid-run never sees half a file.
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    tmp = f"{out_png}.{os.getpid()}.tmp"
    write_synced(tmp, lambda f: fig.savefig(f, format="png"))
    os.replace(tmp, out_png)
    return out_png


def refresh_plot(log_file, out_png):
    """Redraw out_png from log_file; whether to go on plotting. Plots are optional: without matplotlib (or
    on any plotting error) this says so, once, and training goes on."""
    try:
        plot_log(log_file, out_png)
        return True
    except ImportError:
        print("matplotlib is not installed, so no loss.png: pip install matplotlib, or --plot 0 to hide "
              "this", flush=True)
    except Exception as e:
        print(f"plotting loss.png failed ({type(e).__name__}: {e}); training goes on without plots",
              flush=True)
    return False


@dataclass
class PlotConfig:
    log_file: str = option("log/log.txt", "train_gpt2.py's log: STEP KIND VALUE lines, KIND train, val or "
                                          "hella")
    out: str = option("", "PNG to write ('' = loss.png beside --log_file)")
    references: bool = option(True, "draw OpenAI GPT-2 124M's val loss and acc_norm as dashed lines")


def parse_args(argv=None):
    return PlotConfig(**vars(config_parser(PlotConfig, "plot.py", __doc__).parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    out = cfg.out or os.path.join(os.path.dirname(cfg.log_file), "loss.png")
    try:
        print(plot_log(cfg.log_file, out, cfg.references))
    except UserError as e:
        sys.exit(f"plot.py: error: {e}")
    except ImportError as e:
        sys.exit(f"plot.py: error: matplotlib could not be imported ({e}); pip install matplotlib")


if __name__ == "__main__":
    main()
