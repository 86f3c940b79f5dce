"""Benchmark fineweb.py against build-nanogpt's tokenizer loop (one doc per task, cores//2 processes).

    python bench/tokenize_bench.py                        # 50 MB corpus, 3 repeats, memory check on
    python bench/tokenize_bench.py --corpus_mb 10 --repeats 1

Builds a .jsonl corpus of Tiny Shakespeare paragraphs (documents split at blank lines, copied to
--corpus_mb) in a temp dir, warms datasets' arrow cache for it once (so every timed run loads the same
warm cache), then runs each configuration in its own subprocess, interleaved A, B, A, B ... --repeats
times: wall clock end to end (interpreter start, imports, dataset load, tokenizing, writing shards).
Memory: "max RSS" is the largest single process of the run's tree (ru_maxrss, exact); "tree PSS" is
the peak of the tree's summed proportional set size, sampled every 20 ms from /proc (pages shared by
forked workers counted once), and in brackets its anonymous part (without page cache, e.g. the mmapped
arrow file). Every run's shards, concatenated in order, must be the same token stream. Prints a markdown
table and PASS/FAIL for the speed targets; exits 1 on a FAIL. "CPU s" (user + system, whole tree) is
less sensitive than wall clock to other load on the machine.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(os.path.join(REPO, "../shared/data/tiktoken_cache")):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.normpath(os.path.join(REPO, "../shared/data/tiktoken_cache"))

FLAGS = dict(  # name: (default, help)
    corpus_mb=(50, "corpus size in MB (the memory check also uses twice this)"),
    repeats=(3, "runs of each configuration, interleaved; the table shows the median time"),
    memory_check=(True, "also run fineweb.py on the 2x corpus, and with --shard_size 10000000"),
    val_tokens=(1_000_000, "fineweb.py's --val_tokens (its first shard)"),
    paras_per_doc=(1, "blank-line paragraphs per document (1 = one paragraph each, ~40 tokens)"),
    source=("/work/shared/data/tinyshakespeare/input.txt", "text to build the corpus from"),
    keep=(False, "keep the temp dir (corpus, cache, shards) and print its path"),
)


# -----------------------------------------------------------------------------
# Approach A, written from build-nanogpt's fineweb.py as described: one document per task, chunksize 16


def tokenize_doc(doc):
    import tiktoken
    global _enc
    if "_enc" not in globals():
        _enc = tiktoken.get_encoding("gpt2")
    tokens = np.array([EOT] + _enc.encode_ordinary(doc["text"]))
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token dictionary too large for uint16"
    return tokens.astype(np.uint16)


def run_a(corpus, out_dir, nprocs, shard_size=100_000_000):
    import multiprocessing as mp
    import datasets
    ds = datasets.load_dataset("json", data_files=corpus, split="train")
    buf, fill, index = np.empty(shard_size, dtype=np.uint16), 0, 0
    with mp.Pool(nprocs) as pool:
        for tokens in pool.imap(tokenize_doc, ds, chunksize=16):
            while len(tokens):  # spill into the next shard when this one fills
                take = min(shard_size - fill, len(tokens))
                buf[fill:fill + take], fill, tokens = tokens[:take], fill + take, tokens[take:]
                if fill == shard_size:
                    np.save(os.path.join(out_dir, f"a_{index:06d}.npy"), buf)
                    fill, index = 0, index + 1
    if fill:
        np.save(os.path.join(out_dir, f"a_{index:06d}.npy"), buf[:fill])


# -----------------------------------------------------------------------------
# Measuring: a subprocess per run, its tree's memory sampled from /proc


# ru_maxrss of a child started from this (big) process would include this process's own peak: a vfork'd
# child keeps its parent's high-water mark across exec. So each run is started by a small wrapper, whose
# RUSAGE_CHILDREN is then the largest process of the run's tree alone.
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
           "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
           "open(sys.argv[1], 'w').write(f'{u.ru_maxrss} {u.ru_utime + u.ru_stime}'); sys.exit(rc)")


def tree_pss_kb(root):
    """Summed (Pss, Pss_Anon) of root's descendants, in kB (processes gone meanwhile count 0)."""
    pss, anon, todo, first = 0, 0, [root], True
    while todo:
        pid = todo.pop()
        try:
            if not first:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    fields = dict(line.split()[:2] for line in f if line.startswith("Pss"))
                pss, anon = pss + int(fields["Pss:"]), anon + int(fields["Pss_Anon:"])
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, KeyError, ValueError):
            pass
        first = False
    return pss, anon


def measure(cmd, out_dir):
    """Run cmd; (seconds, CPU seconds, max RSS MB of one process, peak tree PSS MB and its anonymous part,
    token stream)."""
    os.makedirs(out_dir)
    rss_file = out_dir + ".maxrss"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, rss_file, *cmd], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak, done = [0, 0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[:] = map(max, peak, tree_pss_kb(proc.pid))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output.decode()[-3000:]}")
    with open(rss_file) as f:
        max_rss, cpu = f.read().split()
    os.remove(rss_file)
    names = sorted((n for n in os.listdir(out_dir) if n.endswith(".npy")), key=lambda n: int(n[-10:-4]))
    stream = np.concatenate([np.load(os.path.join(out_dir, n)) for n in names])
    for n in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, n))
    os.rmdir(out_dir)
    return seconds, float(cpu), int(max_rss) / 1024, peak[0] / 1024, peak[1] / 1024, stream


# -----------------------------------------------------------------------------


def build_corpus(args, path, copies_factor=1):
    with open(args.source, encoding="utf-8") as f:
        paras = [p for p in f.read().split("\n\n") if p.strip()]
    docs = ["\n\n".join(paras[i:i + args.paras_per_doc]) for i in range(0, len(paras), args.paras_per_doc)]
    block = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    copies = math.ceil(args.corpus_mb * 1e6 / len(block.encode())) * copies_factor
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.write(block)
    return len(docs) * copies


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, (default, help) in FLAGS.items():
        kind = (lambda s: s.lower() in ("1", "true", "yes", "on")) if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{help} (default {default})")
    parser.add_argument("--_run_a", nargs=3, help=argparse.SUPPRESS)  # CORPUS OUT_DIR NPROCS: one A run
    args = parser.parse_args()
    if args._run_a:
        return run_a(args._run_a[0], args._run_a[1], int(args._run_a[2]))

    import datasets
    import tiktoken
    cores = os.cpu_count()
    tmp = tempfile.mkdtemp(prefix="tokenize_bench_")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf_cache")  # the children inherit it
    datasets.config.HF_DATASETS_CACHE = os.environ["HF_DATASETS_CACHE"]
    corpora, n_docs = {1: os.path.join(tmp, "corpus.jsonl")}, {}
    if args.memory_check:
        corpora[2] = os.path.join(tmp, "corpus2x.jsonl")
    for factor, path in corpora.items():
        n_docs[factor] = build_corpus(args, path, factor)
        t0 = time.perf_counter()
        datasets.load_dataset("json", data_files=path, split="train")  # the arrow cache every run then reads
        datasets.load_dataset("json", data_files=[path], split="train")  # (fineweb.py passes a list: same cache)
        print(f"{path}: {os.path.getsize(path) / 1e6:.0f} MB, {n_docs[factor]:,} documents, arrow cache built in "
              f"{time.perf_counter() - t0:.1f} s (not timed below)", flush=True)

    def a(nprocs, factor=1):
        return ["A build-nanogpt", nprocs, factor, 100_000_000,
                [sys.executable, os.path.abspath(__file__), "--_run_a", corpora[factor], "{out}", str(nprocs)]]

    def b(nprocs, factor=1, shard_size=100_000_000):
        return ["B fineweb.py", nprocs, factor, shard_size,
                [sys.executable, "fineweb.py", "--input", corpora[factor], "--out_dir", "{out}",
                 "--val_tokens", str(args.val_tokens), "--shard_size", str(shard_size), "--num_proc", str(nprocs)]]

    half = max(1, cores // 2)
    configs = {tuple(c[:4]): c for c in [a(half), a(cores), b(cores), b(1), b(half)]}  # equal ones once
    if args.memory_check:
        configs.update({tuple(c[:4]): c for c in [b(cores, 2), b(cores, 1, 10_000_000), b(cores, 2, 10_000_000)]})
    results = {key: [] for key in configs}
    reference, run = {}, 0
    for r in range(args.repeats):
        for key, (*_, cmd) in configs.items():
            if key[2] == 2 and r > 0:
                continue  # the memory-check runs once: it is about memory, not time
            out = os.path.join(tmp, f"out_{run}")
            run += 1
            seconds, cpu, max_rss, pss, anon, stream = measure([c.replace("{out}", out) for c in cmd], out)
            digest = hashlib.sha1(stream.tobytes()).hexdigest()
            if key[2] not in reference:  # the first run on each corpus is the reference stream
                reference[key[2]] = (digest, stream)
                assert stream[0] == EOT and (stream == EOT).sum() == n_docs[key[2]], "not one EOT per document"
            results[key].append((seconds, cpu, max_rss, pss, anon, len(stream), digest == reference[key[2]][0]))
            print(f"  {key[0]} x{key[1]}, corpus {key[2]}x, shard {key[3]:,}: {len(stream):,} tokens in "
                  f"{seconds:.1f} s ({cpu:.1f} s CPU), max RSS {max_rss:.0f} MB, tree PSS {pss:.0f} MB ({anon:.0f} anon)", flush=True)

    def row(key):
        runs = results[key]
        seconds = statistics.median(r[0] for r in runs)
        return dict(seconds=seconds, cpu=statistics.median(r[1] for r in runs), tps=runs[0][5] / seconds,
                    rss=max(r[2] for r in runs), pss=max(r[3] for r in runs), anon=max(r[4] for r in runs),
                    tokens=runs[0][5], same=all(r[6] for r in runs))

    rows = {key: row(key) for key in results}
    base = rows[tuple(a(half)[:4])]["tps"]
    print(f"\n{datetime.date.today()}, {cores} cores, Python {platform.python_version()}, tiktoken "
          f"{tiktoken.__version__}, datasets {datasets.__version__}, load average {os.getloadavg()[0]:.1f}; "
          f"{args.corpus_mb} MB corpus, {args.paras_per_doc} paragraph(s) per document, median of "
          f"{args.repeats} run(s), warm arrow cache\n")
    print("| approach | processes | corpus | shard size | tokens | seconds | CPU s | tokens/s | vs A-default | max RSS MB | tree PSS MB (anon) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, nprocs, factor, shard), r in rows.items():
        print(f"| {name} | {nprocs} | {factor}x | {shard:,} | {r['tokens']:,} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['tps']:,.0f} | "
              f"{r['tps'] / base:.2f}x | {r['rss']:.0f} | {r['pss']:.0f} ({r['anon']:.0f}) |")

    def tps(maker, nprocs):
        return rows[tuple(maker(nprocs)[:4])]["tps"]
    checks = [
        (f"fineweb.py default ({cores} procs) >= 1.5x A-default ({half} procs)", tps(b, cores) >= 1.5 * base),
        (f"fineweb.py >= A at {half} procs", tps(b, half) >= tps(a, half)),
        (f"fineweb.py >= A at {cores} procs", tps(b, cores) >= tps(a, cores)),
        ("identical token streams in every run", all(r["same"] for r in rows.values())),
    ]
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil
        shutil.rmtree(tmp)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
