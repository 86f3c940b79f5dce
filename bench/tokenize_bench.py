"""Benchmark fineweb.py against build-nanogpt's tokenizer loop (one doc per task, cores//2 processes).

    python bench/tokenize_bench.py                        # 50 MB corpus, 3 repeats, memory check on
    python bench/tokenize_bench.py --corpus_mb 10 --repeats 1

Builds a .jsonl corpus of Tiny Shakespeare paragraphs (documents split at blank lines, copied to
--corpus_mb) in a temp dir, warms datasets' arrow cache for it once (so every timed run loads the same
warm cache), then runs each configuration in its own subprocess, interleaved A, B, A, B ... --repeats
times: wall clock end to end (interpreter start, imports, dataset load, tokenizing, writing shards).
Memory: "max RSS" is the largest single process of the run's tree (ru_maxrss, exact); "tree PSS" is
the peak of the tree's summed proportional set size, sampled from /proc every --pss_interval s (pages shared
by forked workers counted once), and in brackets its anonymous part (without page cache, e.g. the mmapped
arrow file). Every run's shards, concatenated in order, must be the same token stream. Prints a markdown
table and PASS/FAIL for the speed targets; exits 1 on a FAIL. "CPU s" (user + system, whole tree) is
less sensitive than wall clock to other load on the machine.
"""

import argparse
import atexit
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common import GPT2_EOT  # noqa: E402
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

FLAGS = dict(  # name: (default, help)
    corpus_mb=(50, "corpus size in MB (the memory check also uses twice this)"),
    repeats=(3, "runs of each configuration, interleaved; the table shows the median time"),
    memory_check=(True, "also run fineweb.py on the 2x corpus, and with --shard_size 10000000"),
    val_tokens=(1_000_000, "fineweb.py's --val_tokens, its first shard "
                           "(the corpus must be bigger: >= ~4 MB)"),
    paras_per_doc=(1, "blank-line paragraphs per document (1 = one paragraph each, ~40 tokens)"),
    source=(os.path.join(REPO, "data", "input.txt"), "text to build the corpus from"),
    pss_interval=(0.5, "seconds between samples of the tree's PSS (a sample costs ~2 ms of CPU per process)"),
    keep=(False, "keep the temp dir (corpus, cache, shards) and print its path"),
)


# -----------------------------------------------------------------------------
# Approach A, written from build-nanogpt's fineweb.py as described: one document per task, chunksize 16


# the GPT-2 encoder, loaded in the parent before the pool forks (as build-nanogpt's module-level enc)
_enc = None


def tokenize_doc(doc):
    tokens = np.array([GPT2_EOT] + _enc.encode_ordinary(doc["text"]))
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token dictionary too large for uint16"
    return tokens.astype(np.uint16)


def run_a(corpus, out_dir, nprocs, shard_size=100_000_000):
    import multiprocessing as mp
    import datasets
    import tiktoken
    global _enc
    _enc = tiktoken.get_encoding("gpt2")
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


def measure(cmd, out_dir, interval):
    """Run cmd; (seconds, CPU seconds, max RSS MB of one process, peak tree PSS MB and its anonymous part,
    token stream)."""
    os.makedirs(out_dir)
    rss_file = out_dir + ".maxrss"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, rss_file, *cmd], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak, done = [0, 0], threading.Event()

    def sample():
        while not done.wait(interval):
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
        kind = ((lambda s: s.lower() in ("1", "true", "yes", "on")) if isinstance(default, bool)
                else type(default))
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{help} (default {default})")
    parser.add_argument("--_run_a", nargs=3, help=argparse.SUPPRESS)  # CORPUS OUT_DIR NPROCS: one A run
    args = parser.parse_args()
    if args._run_a:
        return run_a(args._run_a[0], args._run_a[1], int(args._run_a[2]))

    import datasets
    import tiktoken
    cores = os.cpu_count()
    tmp = tempfile.mkdtemp(prefix="tokenize_bench_")
    if not args.keep:
        atexit.register(shutil.rmtree, tmp, True)
    os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf_cache")  # the children inherit it
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        # A loads tiktoken's "gpt2" as build-nanogpt does; offline, from the repository's copies of the two
        # files, under the names tiktoken's download cache gives them (the sha1 of their URL)
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(tmp, "tiktoken_cache")
        os.makedirs(os.environ["TIKTOKEN_CACHE_DIR"])
        for name in ("vocab.bpe", "encoder.json"):
            url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
            shutil.copy(os.path.join(REPO, "data", name),
                        os.path.join(os.environ["TIKTOKEN_CACHE_DIR"],
                                     hashlib.sha1(url.encode()).hexdigest()))
    datasets.config.HF_DATASETS_CACHE = os.environ["HF_DATASETS_CACHE"]
    corpora, n_docs = {1: os.path.join(tmp, "corpus.jsonl")}, {}
    if args.memory_check:
        corpora[2] = os.path.join(tmp, "corpus2x.jsonl")
    for factor, path in corpora.items():
        n_docs[factor] = build_corpus(args, path, factor)
        t0 = time.perf_counter()
        datasets.load_dataset("json", data_files=path, split="train")  # the arrow cache every run then reads
        # (fineweb.py passes a list: same cache)
        datasets.load_dataset("json", data_files=[path], split="train")
        print(f"{path}: {os.path.getsize(path) / 1e6:.0f} MB, {n_docs[factor]:,} documents, "
              f"arrow cache built in {time.perf_counter() - t0:.1f} s (not timed below)", flush=True)

    def a(nprocs):
        return dict(name="A build-nanogpt", procs=nprocs, corpus=1, shard=100_000_000,
                    cmd=[sys.executable, os.path.abspath(__file__), "--_run_a", corpora[1], "{out}",
                         str(nprocs)])

    def b(nprocs=None, corpus=1, shard=100_000_000):  # nprocs None: fineweb.py's default, all cores
        num_proc = ["--num_proc", str(nprocs)] if nprocs else []
        return dict(name="B fineweb.py", procs=nprocs or cores, corpus=corpus, shard=shard,
                    cmd=[sys.executable, "fineweb.py", "--input", corpora[corpus], "--out_dir", "{out}",
                         "--val_tokens", str(args.val_tokens), "--shard_size", str(shard), *num_proc])

    def key(c):
        return c["name"], c["procs"], c["corpus"], c["shard"]

    half = max(1, cores // 2)
    configs = [a(half), b(half), a(cores), b(), b(1)]  # A, B, A, B: ones equal on this machine run once
    if args.memory_check:
        configs += [b(corpus=2), b(shard=10_000_000), b(corpus=2, shard=10_000_000)]
    unique = {}
    for c in configs:
        unique.setdefault(key(c), c)
    configs = list(unique.values())
    runs = {key(c): [] for c in configs}
    reference, n_run = {}, 0  # reference: corpus -> sha1 of the first run's token stream
    for repeat in range(args.repeats):
        for c in configs:
            if c["corpus"] == 2 and repeat > 0:
                continue  # the 2x runs are about memory: once is enough
            out, n_run = os.path.join(tmp, f"out_{n_run}"), n_run + 1
            seconds, cpu, rss, pss, anon, stream = measure([x.replace("{out}", out) for x in c["cmd"]], out,
                                                            args.pss_interval)
            digest = hashlib.sha1(stream.tobytes()).hexdigest()
            if c["corpus"] not in reference:
                assert (stream == GPT2_EOT).sum() == n_docs[c["corpus"]] and stream[0] == GPT2_EOT, \
                    "not one EOT per document"
                reference[c["corpus"]] = digest
            runs[key(c)].append(dict(seconds=seconds, cpu=cpu, rss=rss, pss=pss, anon=anon,
                                     tokens=len(stream), same=digest == reference[c["corpus"]]))
            print(f"  {c['name']} x{c['procs']}, corpus {c['corpus']}x, shard {c['shard']:,}: "
                  f"{len(stream):,} tokens in {seconds:.1f} s ({cpu:.1f} s CPU), max RSS {rss:.0f} MB, "
                  f"tree PSS {pss:.0f} MB ({anon:.0f} anon)",
                  flush=True)

    rows = {}
    for k, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        rows[k] = dict(seconds=seconds, cpu=statistics.median(r["cpu"] for r in rs), tokens=rs[0]["tokens"],
                       tps=rs[0]["tokens"] / seconds, same=all(r["same"] for r in rs),
                       **{m: max(r[m] for r in rs) for m in ("rss", "pss", "anon")})  # memory: the worst run

    def tps(c):
        return rows[key(c)]["tps"]
    base = tps(a(half))
    print(f"\n{datetime.date.today()}, {cores} cores, Python {platform.python_version()}, tiktoken "
          f"{tiktoken.__version__}, datasets {datasets.__version__}, load average {os.getloadavg()[0]:.1f}; "
          f"{args.corpus_mb} MB corpus, {args.paras_per_doc} paragraph(s) per document "
          f"({rows[key(a(half))]['tokens'] / n_docs[1]:,.0f} tokens/document), median of "
          f"{args.repeats} run(s), warm arrow cache\n")
    print("| approach | processes | corpus | shard size | tokens | seconds | CPU s | tokens/s | vs A-default "
          "| max RSS MB | tree PSS MB (anon) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, procs, corpus, shard), r in rows.items():
        print(f"| {name} | {procs} | {corpus}x | {shard:,} | {r['tokens']:,} | {r['seconds']:.1f} "
              f"| {r['cpu']:.1f} | {r['tps']:,.0f} | {r['tps'] / base:.2f}x | {r['rss']:.0f} "
              f"| {r['pss']:.0f} ({r['anon']:.0f}) |")
    checks = [
        (f"fineweb.py default ({cores} procs) >= 1.5x A-default ({half} procs)", tps(b()) >= 1.5 * base),
        (f"fineweb.py >= A at {half} procs", tps(b(half)) >= tps(a(half))),
        (f"fineweb.py >= A at {cores} procs", tps(b(cores)) >= tps(a(cores))),
        ("identical token streams in every run", all(r["same"] for r in rows.values())),
    ]
    if args.memory_check:
        for shard in (100_000_000, 10_000_000):
            m1, m2 = (rows[key(b(corpus=corpus, shard=shard))] for corpus in (1, 2))
            print(f"\nfineweb.py memory, shard {shard:,} ({shard * 2 / 1e6:.0f} MB buffer), corpus 1x -> 2x: "
                  f"max RSS {m1['rss']:.0f} -> {m2['rss']:.0f} MB, "
                  f"tree PSS {m1['pss']:.0f} -> {m2['pss']:.0f} MB, "
                  f"anonymous {m1['anon']:.0f} -> {m2['anon']:.0f} MB", end="")
        print()
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    if args.keep:
        print(f"kept {tmp}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
