"""Plot train loss, val loss and HellaSwag acc_norm against step from a train_gpt2.py log, or write a run's
report.md.

    python plot.py                                                  # log/log.txt -> log/loss.png
    python plot.py --log_file run2/log.txt --out run2.png --references 0
    python plot.py --report log                                     # log/'s log.txt, checkpoint -> report.md
    python plot.py --help                                           # every flag

This file owns what a run logs: train_gpt2.py starts (or, on resume, trims) log.txt with start_log(),
writes its lines (and W&B's, with --wandb 1) with log_values(), prints step_line() after every step (with
the tokens trained and ETA's time left), calls refresh_plot() at every eval, so log/loss.png follows a run
as it trains (when matplotlib is installed), and at its end or stop end_log(), which writes report.md:
what ran, on which data, the result and its cost, from log.txt and the newest checkpoint only. The dashed
lines are OpenAI's GPT-2 124M on the same evals: val loss 3.2924 on the FineWeb-Edu val shard, and
HellaSwag acc_norm 0.2955 (hellaswag.py --model gpt2).
"""

import ast
import bisect
import collections
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

from common import UserError, config_parser, format_bytes, option, write_synced

# OpenAI's GPT-2 124M evaluated as train_gpt2.py evaluates (build-nanogpt's numbers): the reference lines
# here and the reference column of export.py's model card
GPT2_124M_VAL_LOSS = 3.2924  # on the FineWeb-Edu val shard
GPT2_124M_HELLASWAG = 0.2955  # acc_norm on the 10,042 val tasks
HELLASWAG_VAL_EXAMPLES = 10042


def parse_line(line):
    """A log.txt line as (step, kind, value): `STEP KIND VALUE`, or `# STEP {provenance}` as (STEP, "#",
    the provenance's text). Any other line is a ValueError."""
    first, second, rest = line.split(maxsplit=2)
    if line.startswith("# "):
        return int(second), "#", rest.strip()
    return int(first), second, float(rest)


def read_attempts(log_file):
    """log.txt as the attempts of its run (its first start, then each resume), in order: (record, lines),
    the record being the `# STEP {...}` line that starts the attempt (attempt_record's dict, with "step":
    STEP; older logs record torch, device and source hash only, and lines before any such line get {}),
    and lines its `STEP KIND VALUE` lines as (step, kind, value)."""
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
    attempts = [({}, [])]
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("# "):
            try:
                step, _, record = parse_line(line)
                attempts.append(({**json.loads(record), "step": step}, []))
            except (ValueError, TypeError):  # another comment: not an attempt's record
                pass
            continue
        if not line.strip():
            continue
        try:
            attempts[-1][1].append(parse_line(line))
        except ValueError:
            raise UserError(f"{log_file} line {n}: expected STEP KIND VALUE, e.g. '250 val 3.2924', "
                            f"got {line.strip()!r}") from None
    if not any(lines for _, lines in attempts):
        raise UserError(f"{log_file}: no log lines yet")
    return [(record, lines) for record, lines in attempts if record or lines]


def read_log(log_file):
    """log.txt's `STEP KIND VALUE` lines as {kind: ([steps], [values])}, in file order. Every kind is
    kept, not only train, val and hella; plot_log() draws those three and ignores the rest. `# ` lines
    (each attempt's record: read_attempts) are not data."""
    series = {}
    for _, lines in read_attempts(log_file):
        for step, kind, value in lines:
            steps, values = series.setdefault(kind, ([], []))
            steps.append(step)
            values.append(value)
    return series


def attempt_record(cfg, provenance, world_size, argv):
    """What log.txt's `# STEP {...}` line records of one attempt of a run (the first start, or a resume):
    what made it (provenance: torch, device, source hash), its command line, the world size, the flags
    that differ from their defaults (cfg's dataclass's), and when it started (Unix time)."""
    flags = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if getattr(cfg, f.name) != f.default}
    return {**provenance, "world_size": world_size, "argv": list(argv), "flags": flags,
            "started": time.time()}


def start_log(log_dir, resume_step, attempt):
    """log_dir/log.txt, new; or, resuming at resume_step, without the lines a crashed run wrote after
    its checkpoint (train line N is the update after N), nor damaged lines (torn by a crash mid-write,
    bytes that are not text: dropped with a note). Then `# STEP {attempt}`: each attempt of the run says
    where it starts, what made it and how (attempt_record)."""
    log_file = os.path.join(log_dir, "log.txt")  # in log_dir, made by main() (hold_folder)
    lines = []
    if resume_step is not None and os.path.exists(log_file):
        try:
            with open(log_file, "rb") as f:
                lines = f.readlines()
        except OSError as e:  # e.g. a folder named log.txt
            raise UserError(f"--log_dir {log_dir}: cannot read {log_file} ({e.strerror}); move it away or "
                            f"pick another --log_dir") from None
    kept, damaged = [], []
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
    kept.append(f"# {resume_step or 0} {json.dumps(attempt, default=str)}\n")
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


# What log.txt keeps of log_values()'s values, with how many decimals: build-nanogpt's val, hella and train,
# and what report.md needs: the MFU, the Unix time at which a step ended, and a float16 step's skip (1)
LOGGED = {"val": 4, "hella": 4, "train": 6, "mfu": 2, "time": 2, "skipped": 0}


def log_values(log_file, wandb_run, step, **values):
    """The values LOGGED names as log.txt lines, and every value but None, False and time to W&B (which
    times its lines itself); log_file and wandb_run None, as on ranks but 0: neither."""
    values = {k: v for k, v in values.items() if v is not None and v is not False}
    if log_file is not None:
        with open(log_file, "a") as f:
            for kind, decimals in LOGGED.items():
                if kind in values:
                    f.write(f"{step} {kind} {values[kind]:.{decimals}f}\n")
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in values.items() if k != "time"}, step=step)


def format_count(n):
    """A count, compact: 256, 524k, 12.6M, 1.2B."""
    for e, unit in ((9, "B"), (6, "M"), (3, "k")):
        if n >= 10**e:
            return f"{n / 10**e:.{0 if n >= 100 * 10**e else 1}f}{unit}"
    return f"{n}"


def format_duration(seconds):
    """45s, 12m05s, 1h23m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def step_line(step, loss, lr, norm, dt, tokens, mfu, loss_scale, skipped, eta):
    """The line printed after each optimizer step of `tokens` tokens: the tokens trained after it, and eta,
    the seconds left (ETA.update; None: not known yet); loss_scale None: not float16."""
    return (f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {1000 * dt:.0f}ms"
            f" | tok/sec {tokens / dt:,.0f}" + (f" | mfu {mfu:.1f}%" if mfu else "")
            + f" | {format_count((step + 1) * tokens)} tok"
            + (f" | eta {format_duration(eta)}" if eta is not None else "")
            + (f" | loss scale {loss_scale:g}" if loss_scale is not None else "")
            + (" | skipped: float16 gradients overflowed, loss scale halved" if skipped else ""))


class ETA:
    """The time left to max_steps at the recent pace, from the times at which a run's steps end. Between two
    step ends lies one update, and on the steps where an eval, a checkpoint or samples come first (every
    multiple of one of `intervals`: eval_interval, ckpt_interval, sample_interval; and max_steps) that work
    too. The pace is the mean of the last `window` plain steps; what those other steps cost beyond it is
    their mean over the run so far, counted for each such step still to come, so the estimate does not
    swing after each eval. The first step after a (re)start has nothing before it to time: it compiles, and
    is left out. A resumed run starts a new one at its checkpoint's step."""

    def __init__(self, start_step, max_steps, intervals, window=100):
        self.max_steps = max_steps
        self.busy = [s for s in range(start_step, max_steps + 1)
                     if s == max_steps or any(i and s % i == 0 for i in intervals)]
        self.plain = collections.deque(maxlen=window)  # the last plain steps' times
        self.extra = []  # what each busy step took beyond its update (at the pace then)
        self.last_end = None

    def update(self, step, end):
        """After step `step`'s update ended at time `end` (seconds): the seconds left to the run's end (the
        last eval and checkpoint included), or None before a pace is known."""
        if self.last_end is not None:
            seconds = end - self.last_end
            i = bisect.bisect_left(self.busy, step)
            if i < len(self.busy) and self.busy[i] == step:
                if self.plain:  # a busy step before any plain one has no pace to count its work from
                    self.extra.append(seconds - sum(self.plain) / len(self.plain))
            else:
                self.plain.append(seconds)
        self.last_end = end
        if not self.plain:
            return None
        busy_left = len(self.busy) - bisect.bisect_right(self.busy, step)
        extra = sum(self.extra) / len(self.extra) if self.extra else 0.0
        return (self.max_steps - 1 - step) * sum(self.plain) / len(self.plain) + busy_left * extra


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


# -----------------------------------------------------------------------------
# report.md: what a run did, from what it recorded (log.txt, the newest checkpoint, samples.txt, loss.png)


def results_table(ckpt, series=None):
    """The results beside GPT-2 124M's, as a Markdown table: the checkpoint's step, tokens, val loss and
    HellaSwag acc_norm, and with its run's log.txt series, the best val loss (and acc_norm) of the run.
    report.md and export.py's model card both show it, so the two never disagree."""
    run, step = ckpt["config"], ckpt["step"]
    batch = run["total_batch_size"]
    val_loss, hellaswag = ckpt.get("val_loss"), ckpt.get("hellaswag")  # None where not measured
    val_loss = "not measured" if val_loss is None else (f"{val_loss:.4f} on the val split of "
                                                        f"`{run['data_dir']}`")
    hellaswag_n = run.get("hellaswag_limit") or HELLASWAG_VAL_EXAMPLES
    hellaswag = "not measured" if hellaswag is None else f"{hellaswag:.4f} on {hellaswag_n:,} val examples"
    rows = ["| | this model | GPT-2 124M |", "| --- | --- | --- |",
            f"| step | {step:,} of {run['max_steps']:,} | |",
            f"| tokens seen | {step * batch:,} ({step:,} steps x {batch:,}) | |",
            f"| val loss | {val_loss} | {GPT2_124M_VAL_LOSS} on the FineWeb-Edu val shard |",
            f"| HellaSwag acc_norm | {hellaswag} | {GPT2_124M_HELLASWAG} on {HELLASWAG_VAL_EXAMPLES:,} val "
            f"examples |"]
    for kind, name, best in (("val", "best val loss", min), ("hella", "best HellaSwag acc_norm", max)):
        if series and kind in series:
            value, at = best(zip(series[kind][1], series[kind][0]), key=lambda pair: pair[0])
            rows.append(f"| {name} | {value:.4f} at step {at:,} (log.txt) | |")
    return "\n".join(rows)


def attempt_costs(record, lines, step_tokens):
    """One attempt's row of report.md's table, and its (wall seconds or None, timed step tokens, their
    seconds, float16 steps skipped or None): from its record and the times its steps ended (log.txt), the
    first step after a start, which compiles, left out of the tokens/s."""
    trained = sorted({step for step, kind, _ in lines if kind == "train"})
    ended = {step: value for step, kind, value in lines if kind == "time" and step in trained}
    times = [value for _, kind, value in lines if kind == "time"]
    started = record.get("started")
    wall = max(times) - started if started and times else None
    timed = sorted(ended)
    seconds = ended[timed[-1]] - ended[timed[0]] if len(timed) > 1 else 0.0
    skipped = sum(kind == "skipped" for _, kind, _ in lines) if started else None
    argv = record.get("argv")
    command = f"`python {shlex.join([os.path.basename(argv[0]), *argv[1:]])}`" if argv else "not recorded"
    row = [f"{trained[0]}-{trained[-1]}" if trained else "none",
           time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "not recorded",
           format_duration(wall) if wall is not None else "not recorded", command,
           record.get("world_size", "not recorded"), record.get("device", "not recorded"),
           record.get("torch", "not recorded"), record.get("source_sha256", "not recorded")]
    return "| " + " | ".join(map(str, row)) + " |", (wall, (len(timed) - 1) * step_tokens, seconds, skipped)


def last_samples(samples_file):
    """The newest step's samples in samples.txt (lines `STEP sample I: 'TEXT'`) as (step, [text]), or None."""
    if not os.path.isfile(samples_file):
        return None
    samples = {}
    with open(samples_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            head, _, text = line.partition(": ")
            try:
                samples.setdefault(int(head.split()[0]), []).append(ast.literal_eval(text.strip()))
            except (ValueError, SyntaxError, IndexError):  # a line torn by a crash
                continue
    return max(samples.items()) if samples else None


def report_text(log_dir):
    """report.md's Markdown for a run's folder, from log.txt and its newest checkpoint (and samples.txt,
    loss.png): what ran, the data, the result and its cost; what an older run did not record is said so."""
    from checkpoints import checkpoint_paths, load_checkpoint  # torch: only for a report, not for plots
    log_file = os.path.join(log_dir, "log.txt")
    if not os.path.isfile(log_file):
        raise UserError(f"--report {log_dir}: no log.txt there; pass the --log_dir of a train_gpt2.py run")
    attempts = read_attempts(log_file)
    series = read_log(log_file)
    paths = checkpoint_paths(log_dir)
    if not paths:
        raise UserError(f"--report {log_dir}: no model_NNNNN.pt checkpoint there, so no record of its flags "
                        f"and data; a run writes one every --ckpt_interval steps and at its end or stop")
    ckpt = load_checkpoint(paths[-1])
    run, data, step = ckpt["config"], ckpt.get("data"), ckpt["step"]
    trained = step * run["total_batch_size"]
    costs = [attempt_costs(record, lines, run["total_batch_size"]) for record, lines in attempts]
    walls, tokens, seconds, skipped = zip(*(cost for _, cost in costs))
    flags = next((record["flags"] for record, _ in reversed(attempts) if "flags" in record), None)
    flags = "not recorded (an older train_gpt2.py)" if flags is None else " ".join(
        f"`--{k} {shlex.join(map(str, v)) if isinstance(v, list) else int(v) if isinstance(v, bool) else v}`"
        for k, v in flags.items()) or "none: the defaults"

    epoch = sum(n for _, n, _ in data["train"]) if data else None
    data_lines = [f"- folder: `{data['dir']}`" if data else "- folder: not recorded",
                  f"- tokens per epoch: {epoch:,} ({len(data['train'])} train shard(s))" if epoch else
                  "- tokens per epoch: not recorded",
                  f"- epochs read: {trained / epoch:.2f} ({trained:,} tokens trained)" if epoch else
                  "- epochs read: not recorded"]

    unrecorded = sum(w is None for w in walls)
    wall = (format_duration(sum(w for w in walls if w is not None)) + f" over {len(walls)} attempt(s)"
            + (f"; not recorded for {unrecorded} of them (an older train_gpt2.py)" if unrecorded else ""))
    wall = "not recorded (an older train_gpt2.py)" if unrecorded == len(walls) else wall
    tok_s = f"{sum(tokens) / sum(seconds):,.0f}" if sum(seconds) else "not recorded"
    mfu = series.get("mfu", ([], []))[1]
    mfu = f"{sum(mfu) / len(mfu):.1f}%" if mfu else "not measured (off CUDA, or a GPU of unknown peak FLOP/s)"
    peaks = ckpt.get("peak_memory")
    peaks = ", ".join(f"rank {r} {format_bytes(p)}" for r, p in enumerate(peaks)) + \
        f" (the attempt that wrote {os.path.basename(paths[-1])})" if peaks else "not recorded"
    skipped = [s for s in skipped if s is not None]
    skipped = f"{sum(skipped)}" if skipped else "not recorded"
    samples = last_samples(os.path.join(log_dir, "samples.txt"))
    samples = "None in samples.txt (samples need GPT-2's vocabulary and --sample_interval above 0)." \
        if samples is None else f"At step {samples[0]}:\n\n" + "\n".join(
            f"{i}. {json.dumps(text, ensure_ascii=False)}" for i, text in enumerate(samples[1]))
    plot = "![train and val loss](loss.png)" if os.path.isfile(os.path.join(log_dir, "loss.png")) else \
        "No loss.png (a run draws it with --plot 1 where matplotlib is installed; so does plot.py)."
    name = os.path.basename(os.path.abspath(log_dir))
    return f"""# Run report: {name}/, step {step:,} of {run['max_steps']:,}

Written by train_gpt2.py at the end or stop of a run, or by `python plot.py --report LOG_DIR`, from the
run's log.txt and its newest checkpoint, `{os.path.basename(paths[-1])}`.

## What ran

| attempt's steps | started | wall time | command | ranks | device | torch | source sha256 |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(row for row, _ in costs)}

Flags that differ from the defaults: {flags}

## Data

{chr(10).join(data_lines)}

## Result

{results_table(ckpt, series)}

## Cost

- wall time: {wall}
- mean tokens/s: {tok_s} (evals, checkpoints and samples included; each attempt's first step left out)
- mean MFU: {mfu}
- peak memory per rank: {peaks}
- steps skipped for float16 overflow: {skipped}

## Last samples

{samples}

## Loss

{plot}
"""


def write_report(log_dir):
    """log_dir/report.md (report_text), written atomically; returns its path."""
    text, path = report_text(log_dir), os.path.join(log_dir, "report.md")
    write_synced(path + ".tmp", lambda f: f.write(text.encode()))
    os.replace(path + ".tmp", path)
    return path


def end_log(log_file, step):
    """At a run's end or stop (rank 0): the attempt's last time in log.txt, after its final eval and
    checkpoint at `step`, then report.md beside it; returns report.md's path."""
    log_values(log_file, None, step, time=time.time())
    return write_report(os.path.dirname(log_file))


@dataclass
class PlotConfig:
    log_file: str = option("log/log.txt", "train_gpt2.py's log: STEP KIND VALUE lines, KIND train, val or "
                                          "hella")
    out: str = option("", "PNG to write ('' = loss.png beside --log_file)")
    references: bool = option(True, "draw OpenAI GPT-2 124M's val loss and acc_norm as dashed lines")
    report: str = option("", "a run's folder (--log_dir): write its report.md from its log.txt and newest "
                             "checkpoint instead of plotting")


def parse_args(argv=None):
    return PlotConfig(**vars(config_parser(PlotConfig, "plot.py", __doc__).parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    out = cfg.out or os.path.join(os.path.dirname(cfg.log_file), "loss.png")
    try:
        print(write_report(cfg.report) if cfg.report else plot_log(cfg.log_file, out, cfg.references))
    except UserError as e:
        sys.exit(f"plot.py: error: {e}")
    except ImportError as e:
        sys.exit(f"plot.py: error: matplotlib could not be imported ({e}); pip install matplotlib")


if __name__ == "__main__":
    main()
