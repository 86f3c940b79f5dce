"""hellaswag.py: rendering, scoring against transformers, batching and padding, the command line, the
download and every bad-input error, and torch.compile (no recompiles with pad_to).

No GPT-2 weights are reachable offline, so the model is a random tiny GPT2LMHeadModel saved as a Hugging
Face folder; scoring is checked against transformers' own logits on real HellaSwag val tasks, the first
200 of which are in tests/data.
"""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import hellaswag
from common import UserError, gpt2_tokenizer
from conftest import HELLASWAG_EXCERPT, REPO, SHARED_HELLASWAG, ci_only, tiktoken_gpt2
from hellaswag import (hellaswag_cache, iterate_examples, iterate_losses, longest_example, main,
                       render_example, score)
from train_gpt2 import load_model

TOL = 1e-4  # float32 losses
LAST_LINE = re.compile(r"acc: (\d\.\d{4}) acc_norm: (\d\.\d{4}) n: (\d+)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from threads; on a busy 2-core machine two OpenMP
    threads mostly wait for each other (6x slower, measured). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir():
    return HELLASWAG_EXCERPT


@pytest.fixture(scope="module")
def examples(data_dir):
    return [ex for _, ex in zip(range(12), iterate_examples("val", data_dir))]


@pytest.fixture(scope="module")
def enc():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, our GPT loaded from its folder, the folder). initializer_range 0.3 instead of
    0.02 spreads the endings' losses apart (by ~1 nat), so float32 noise cannot flip a prediction."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256, vocab_size=50257,
                        initializer_range=0.3, bos_token_id=50256, eos_token_id=50256)
    hf = GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    hf.save_pretrained(folder)
    return hf, load_model(str(folder)).eval(), str(folder)


def run_main(capsys, *argv):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1  # sys.exit("message") prints it and exits 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def example_losses(model, tokens, mask):
    """One rendered example, alone in its forward pass: its 4 endings' (summed, mean) losses."""
    return next(iterate_losses(model, [(tokens, mask, None)], batch_size=1))


def assert_one_line_error(code, err, *needles):
    """A non-zero exit, and the error as one line, the last (transformers' progress bars may come before)."""
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("hellaswag.py: error: ") and err.count("error:") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in last, err


# -----------------------------------------------------------------------------
# Rendering and scoring


def test_render_real_examples(examples, enc):
    for ex in examples:
        tokens, mask, label = render_example(ex, enc)
        ctx = enc.encode(ex["ctx"])
        endings = [enc.encode(" " + e) for e in ex["endings"]]
        assert (tokens.dtype == torch.long
                and tokens.shape == mask.shape == (4, len(ctx) + max(map(len, endings))))
        for row, end in enumerate(endings):
            n = len(ctx) + len(end)
            assert tokens[row, :n].tolist() == ctx + end
            assert mask[row].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (tokens.size(1) - n)
        assert label == ex["label"]
    # the first val task, spelled out
    assert examples[0]["ctx"] == "A man is sitting on a roof. he" and examples[0]["label"] == 3


def transformers_losses(hf, enc, ex):
    """The 4 endings' summed and mean losses, each row alone and unpadded, from transformers' logits."""
    ctx = enc.encode(ex["ctx"])
    sums, means = [], []
    for ending in ex["endings"]:
        end = enc.encode(" " + ending)
        with torch.no_grad():
            logits = hf(torch.tensor([ctx + end])).logits[0]
        ce = F.cross_entropy(logits[len(ctx) - 1:len(ctx) + len(end) - 1], torch.tensor(end),
                             reduction="none")
        sums.append(ce.sum())
        means.append(ce.mean())
    return torch.stack(sums), torch.stack(means)


def test_losses_and_predictions_match_transformers(tiny, examples, enc):
    hf, ours, _ = tiny
    correct = correct_norm = 0
    for ex in examples:
        ref_sums, ref_means = transformers_losses(hf, enc, ex)
        tokens, mask, label = render_example(ex, enc)
        sums, means = example_losses(ours, tokens, mask)
        torch.testing.assert_close(sums, ref_sums, atol=TOL, rtol=0)
        torch.testing.assert_close(means, ref_means, atol=TOL, rtol=0)
        assert (ref_sums.sort().values.diff() > 1e-3).all()  # no near-ties: predictions are well defined
        correct += int(ref_sums.argmin()) == label
        correct_norm += int(ref_means.argmin()) == label
    assert score(ours, examples, enc) == (correct, correct_norm, len(examples))
    # transformers' model scores alike
    assert score(hf, examples, enc) == (correct, correct_norm, len(examples))
    # a non-trivial check, not all right or wrong
    assert correct != correct_norm or correct not in (0, len(examples))


@pytest.mark.parametrize("batch_size, pad_to", [(1, None), (3, None), (4, None), (16, None), (5, 96),
                                                (1, 80)])
def test_batched_equals_one_example_per_forward(tiny, examples, enc, batch_size, pad_to):
    _, ours, _ = tiny
    rendered = [render_example(ex, enc) for ex in examples]  # 12 tasks: 3 and 5 do not divide it
    batched = list(iterate_losses(ours, rendered, batch_size=batch_size, pad_to=pad_to))
    assert len(batched) == len(rendered)
    for (sums, means), (tokens, mask, _) in zip(batched, rendered):
        ref_sums, ref_means = example_losses(ours, tokens, mask)
        torch.testing.assert_close(sums, ref_sums, atol=TOL, rtol=0)
        torch.testing.assert_close(means, ref_means, atol=TOL, rtol=0)
        assert (sums.argmin(), means.argmin()) == (ref_sums.argmin(), ref_means.argmin())
    assert (score(ours, examples, enc, batch_size=batch_size, pad_to=pad_to)
            == score(ours, examples, enc, batch_size=1))


def test_pad_to_gives_every_forward_one_shape(tiny, examples, enc):
    _, ours, _ = tiny
    shapes = []

    def recording(idx):
        shapes.append(tuple(idx.shape))
        return ours(idx)

    longest = longest_example(examples, enc)
    assert longest < 80
    # 12 tasks: batches of 5, 5, and 2 plus 3 dummies
    score(recording, examples, enc, batch_size=5, pad_to=80)
    assert shapes == [(20, 80)] * 3
    shapes.clear()
    score(recording, examples, enc, batch_size=5)  # without pad_to: each batch as wide as its longest task
    assert len(shapes) == 3 and shapes[-1][0] == 8 and max(s[1] for s in shapes) == longest
    with pytest.raises(UserError, match="longer than pad_to=10"):
        score(ours, examples, enc, pad_to=10)


def uniform_model(idx):
    """Every logit 0: each token's loss is ln(50257), whatever the weights; free to run but for the logits."""
    return (torch.zeros(1, 1, 50257).expand(*idx.shape, 50257),)


# The excerpt's 200 tasks; where ../shared/data is beside the checkout, all 10,042 val tasks as well, with the
# label counts its SOURCES.md gives.
VAL_FILES = [(HELLASWAG_EXCERPT, {0: 53, 1: 47, 2: 58, 3: 42})] + \
    [(SHARED_HELLASWAG, {0: 2515, 1: 2485, 2: 2584, 3: 2458})] * \
    os.path.isfile(os.path.join(SHARED_HELLASWAG, "hellaswag_val.jsonl"))


@pytest.mark.parametrize("folder, labels", VAL_FILES, ids=[f"{sum(c.values())}-tasks" for _, c in VAL_FILES])
def test_every_task_of_the_file_renders_and_a_spread_of_them_scores(tiny, enc, folder, labels):
    """Every task of the file parses and renders to tiktoken's own tokens (ctx, then " " + each ending, the
    mask on the ending), within the context. Then ~100 tasks spread over the file are scored: under a
    uniform model (every logit 0) each ending's summed loss must be ln(50257) times its token count; and
    ~10 of them score with the tiny GPT, batched and padded to the longest task (as in training), as one
    task per forward does."""
    examples = list(iterate_examples("val", folder))
    assert len(examples) == sum(labels.values())
    assert {k: sum(ex["label"] == k for ex in examples) for k in range(4)} == labels
    reference = tiktoken_gpt2()
    for ex in examples:
        tokens, mask, _ = render_example(ex, enc)
        ctx = reference.encode(ex["ctx"])
        for row, ending in enumerate(reference.encode(" " + e) for e in ex["endings"]):
            assert tokens[row, :len(ctx) + len(ending)].tolist() == ctx + ending
            assert mask[row].nonzero().flatten().tolist() == list(range(len(ctx), len(ctx) + len(ending)))

    spread = examples[::len(examples) // 100]  # ~100 tasks, from the first to the last
    rendered = [render_example(ex, enc) for ex in spread]
    got = torch.stack([sums for sums, _ in iterate_losses(uniform_model, rendered, batch_size=16)])
    expected = math.log(50257) * torch.stack([mask.sum(1) for _, mask, _ in rendered]).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)

    _, ours, _ = tiny
    longest = longest_example(examples, enc)
    assert longest <= ours.config.block_size  # 256 here, and so within GPT-2's 1024
    few = spread[::10]
    assert score(ours, few, enc, batch_size=16, pad_to=longest) == score(ours, few, enc, batch_size=1)


if len(VAL_FILES) > 1:  # defined only where ../shared/data holds the full val set: no skip elsewhere
    @pytest.mark.slow
    def test_all_10042_val_tasks_score(enc):
        """score() over the whole val set, under the uniform model: every ending's summed loss is
        ln(50257) x its token count, so acc counts the tasks whose right ending is their shortest (the
        first of equals, as argmin picks). ~5 minutes on a 2-core CPU, all of it the 50257-wide
        cross-entropy (a real model would add its forward: ~9 or more)."""
        examples = list(iterate_examples("val", SHARED_HELLASWAG))
        reference = tiktoken_gpt2()
        shortest = sum(int(torch.tensor([len(reference.encode(" " + e)) for e in ex["endings"]]).argmin())
                       == ex["label"] for ex in examples)
        correct, _, n = score(uniform_model, examples, enc, batch_size=64)
        assert (correct, n) == (shortest, 10042)


def test_ranks_slices_add_up_to_the_whole(tiny, examples, enc):
    """Under DDP each rank scores examples[rank::world_size]; the counts sum to one process's."""
    _, ours, _ = tiny
    parts = [score(ours, examples[r::3], enc, batch_size=2) for r in range(3)]
    assert tuple(map(sum, zip(*parts))) == score(ours, examples, enc)
    assert score(ours, [], enc) == (0, 0, 0)


# -----------------------------------------------------------------------------
# Command line


def test_cli_limit_and_last_line(tiny, data_dir):
    """As a user runs it: exit 0, and the last stdout line is exactly the result line."""
    proc = subprocess.run([sys.executable, "hellaswag.py", "--model", tiny[2], "--data_dir", data_dir,
                           "--limit", "5", "--batch_size", "2", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.rstrip("\n").split("\n")[-1]
    assert LAST_LINE.fullmatch(last) and last.endswith(" n: 5"), proc.stdout
    assert "acc_norm=" in proc.stderr  # the progress bar's running acc_norm


def test_cli_on_a_train_gpt2_checkpoint(tiny, examples, enc, data_dir, tmp_path):
    """`python hellaswag.py --model model_NNNNN.pt` as a user runs it: main() loads the checkpoint through
    train_gpt2.py, and the counts are score()'s on the same weights."""
    model = tiny[1]
    torch.save({"model": model.state_dict(), "optimizer": {}, "config": {}, "step": 3,
                "model_config": dataclasses.asdict(model.config)}, tmp_path / "model_00003.pt")
    proc = subprocess.run([sys.executable, "hellaswag.py", "--model", tmp_path / "model_00003.pt",
                           "--data_dir", data_dir, "--limit", "6", "--batch_size", "4", "--device", "cpu",
                           "--dtype", "float32", "--compile", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    correct, correct_norm, n = score(model, examples[:6], enc)
    assert proc.stdout.splitlines()[-1] == f"acc: {correct / 6:.4f} acc_norm: {correct_norm / 6:.4f} n: 6"


def test_cli_counts_equal_score(tiny, examples, enc, data_dir, capsys):
    code, out, _ = run_main(capsys, "--model", tiny[2], "--data_dir", data_dir, "--limit", 7,
                            "--batch_size=3", "--device", "cpu", "--dtype", "float32", "--compile", "0")
    assert code == 0
    correct, correct_norm, n = score(tiny[1], examples[:7], enc)
    assert out.splitlines()[-1] == f"acc: {correct / 7:.4f} acc_norm: {correct_norm / 7:.4f} n: 7"


def test_a_training_log_dir_scores_its_newest_checkpoint(tiny, examples, enc, data_dir, capsys, tmp_path):
    """As export.py takes a log_dir; before, transformers said "no model.safetensors" there, and, for a
    model_NNNNN.pt.tmp (a checkpoint being written), something about a Hugging Face config."""
    log = tmp_path / "log"
    log.mkdir()
    model = tiny[1]
    torch.save({"model": model.state_dict(), "optimizer": {}, "config": {}, "step": 10,
                "loader_positions": [0], "model_config": dataclasses.asdict(model.config)},
               log / "model_00010.pt")
    (log / "model_00002.pt").write_bytes(b"an older checkpoint, not read")
    (log / "model_00011.pt.tmp").write_bytes(b"half a checkpoint")
    (log / "log.txt").write_text("0 train 10.0\n")
    code, out, _ = run_main(capsys, "--model", log, "--data_dir", data_dir, "--limit", 7, "--batch_size=3",
                            "--device", "cpu", "--dtype", "float32", "--compile", "0")
    assert code == 0
    correct, correct_norm, n = score(model, examples[:7], enc)
    assert out.splitlines()[-1] == f"acc: {correct / 7:.4f} acc_norm: {correct_norm / 7:.4f} n: 7"
    partial = log / "model_00011.pt.tmp"
    code, _, err = run_main(capsys, "--model", partial, "--data_dir", data_dir, "--limit", 1)
    assert_one_line_error(code, err, f"--model {partial}: a checkpoint still being written, or cut short by "
                                     f"a crash; pass a finished model_NNNNN.pt, or its folder")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_autocast_scores_like_float32(tiny, data_dir, capsys, dtype):
    """--dtype float16 (GPUs without bfloat16) and bfloat16, run on CPU: the endings' losses lie ~1 nat apart,
    far more than 16-bit rounding, so the counts equal float32's."""
    lines = []
    for d in ("float32", dtype):
        code, out, _ = run_main(capsys, "--model", tiny[2], "--data_dir", data_dir, "--limit", 12,
                                "--batch_size", 4, "--device", "cpu", "--dtype", d, "--compile", "0")
        assert code == 0
        lines.append(out.splitlines()[-1])
    assert lines[0] == lines[1]


def test_import_runs_nothing():
    """Importing hellaswag.py (as train_gpt2.py does for its evals) runs nothing and loads no train_gpt2.py:
    only its main() imports that, to load a model (the run-as-a-script test in test_train.py checks the
    other side)."""
    code = "import sys; sys.argv = ['x', '--bogus']; import hellaswag; print('train_gpt2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stdout, out.stderr) == (0, "False\n", "")


def test_help_lists_every_flag(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for name in hellaswag.HellaswagConfig.__dataclass_fields__:
        assert f"--{name}" in out


@pytest.mark.parametrize("argv, needle", [
    (["--limit", "-1"], "--limit -1: must be >= 0"),
    (["--limit", "ten"], "--limit"),
    (["--split", "nope"], "--split nope"),
    (["--split", "test"], "labels are not public"),
    (["--batch_size", "0"], "--batch_size 0: must be a positive integer"),
    (["--model", "nonexistent"], "--model nonexistent"),
    (["--model", "log/model_99999.pt"], "--model log/model_99999.pt"),
    (["--device", "tpu"], "--device tpu"),
    (["--dtype", "float8"], "--dtype float8"),
    (["--compile", "maybe"], "--compile: expected auto, 1, 0, true or false, got 'maybe'"),
    (["--bogus", "1"], "--bogus"),
])
def test_bad_flags_are_one_line_errors(capsys, data_dir, argv, needle):
    code, _, err = run_main(capsys, "--data_dir", data_dir, *argv)
    assert_one_line_error(code, err, needle)


def test_bad_models_are_one_line_errors(capsys, data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, "--model", tmp_path / "empty", "--data_dir", data_dir, "--limit", 1)
    assert_one_line_error(code, err, f"--model {tmp_path / 'empty'}: neither a Hugging Face GPT-2 folder")
    (tmp_path / "model_00010.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_main(capsys, "--model", tmp_path / "model_00010.pt", "--data_dir", data_dir,
                            "--limit", 1)
    assert_one_line_error(code, err, "model_00010.pt", "corrupt")
    # a model whose context is shorter than a task
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8,
                               n_positions=16)).save_pretrained(tmp_path / "short")
    code, _, err = run_main(capsys, "--model", tmp_path / "short", "--data_dir", data_dir, "--limit", 3)
    assert_one_line_error(code, err, "block_size 16")
    # a model of a run with a vocabulary smaller than GPT-2's: GPT-2 token ids past it would be read as
    # garbage
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_layer=1, n_head=2,
                               n_embd=8)).save_pretrained(tmp_path / "small_vocab")
    code, _, err = run_main(capsys, "--model", tmp_path / "small_vocab", "--data_dir", data_dir, "--limit", 1)
    assert_one_line_error(code, err, "fewer than GPT-2's 50257, so it cannot read GPT-2 tokens")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_one_line_error(capsys, tiny, data_dir):
    code, _, err = run_main(capsys, "--model", tiny[2], "--data_dir", data_dir, "--limit", 1,
                            "--device", "cuda")
    assert_one_line_error(code, err, "--device cuda: not available")


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "hellaswag.py", "--data_dir", tmp_path, "--model", "gpt2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr == f"hellaswag.py: error: {tmp_path}/hellaswag_val.jsonl: no such file " \
                          f"(without --data_dir it is downloaded to {hellaswag_cache()})\n"


# -----------------------------------------------------------------------------
# Data: download, missing files, corrupt lines


def test_download_into_the_cache(monkeypatch, tmp_path, data_dir):
    """HELLASWAG_URL pointed at a local folder: the download path runs through urllib without network."""
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HELLASWAG_URL", "file://" + os.path.abspath(data_dir))
    first = next(iterate_examples("val"))
    cached = tmp_path / "cache" / "hellaswag_val.jsonl"
    assert cached.read_bytes() == open(os.path.join(data_dir, "hellaswag_val.jsonl"), "rb").read()
    assert os.listdir(tmp_path / "cache") == ["hellaswag_val.jsonl"]  # the temp file was renamed
    monkeypatch.setenv("HELLASWAG_URL", "file:///nonexistent")  # the cached copy is used from now on
    assert next(iterate_examples("val")) == first


@pytest.mark.parametrize("url", ["file:///nonexistent/folder", "http://127.0.0.1:9/data"])
def test_missing_file_without_network(monkeypatch, capsys, tmp_path, url):
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path))
    monkeypatch.setenv("HELLASWAG_URL", url)
    path = tmp_path / "hellaswag_val.jsonl"
    with pytest.raises(UserError, match=f"{re.escape(str(path))}: not downloaded yet, and downloading "
                                        f"it from {re.escape(url)}/hellaswag_val.jsonl failed"):
        next(iterate_examples("val"))
    assert os.listdir(tmp_path) == []  # no partial file left behind
    code, _, err = run_main(capsys, "--limit", 1)
    assert_one_line_error(code, err, str(path), "failed")


def test_data_dir_without_the_file(capsys, tmp_path):
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path))}/hellaswag_train.jsonl: no such file"):
        next(iterate_examples("train", str(tmp_path)))
    with pytest.raises(UserError, match="labels are not public"):
        next(iterate_examples("test", str(tmp_path)))


GOOD = {"ind": 0, "activity_label": "x", "ctx": "A man walks.", "split": "val", "label": 1,
        "endings": ["a", "b", "c", "d"]}


@pytest.mark.parametrize("line, problem", [
    ('{"ctx": "A man", ', "not valid JSON"),
    (b'{"ctx": "\xc3("}', "not valid JSON"),  # bad UTF-8
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "endings"}), "no endings field"),
    (json.dumps({k: v for k, v in GOOD.items() if k not in ("label", "ctx")}), "no ctx, label field"),
    (json.dumps({**GOOD, "endings": ["a", "b", "c"]}), "endings must be a list of 4 strings"),
    (json.dumps({**GOOD, "endings": ["a", "b", "c", 4]}), "endings must be a list of 4 strings"),
    (json.dumps({**GOOD, "label": 4}), "label must be 0, 1, 2 or 3, got 4"),
    (json.dumps({**GOOD, "label": "1"}), 'label must be 0, 1, 2 or 3, got "1"'),
    (json.dumps({**GOOD, "label": True}), "label must be 0, 1, 2 or 3, got true"),
    (json.dumps({**GOOD, "ctx": ""}), "ctx must be a non-empty string"),
])
def test_corrupt_lines_name_file_and_line(capsys, tmp_path, line, problem):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n"
                     + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(UserError) as e:
        list(iterate_examples("val", str(tmp_path)))
    assert str(e.value).startswith(f"{path} line 3: {problem}"), str(e.value)
    code, _, err = run_main(capsys, "--data_dir", tmp_path, "--model", "gpt2")  # fails before loading weights
    assert_one_line_error(code, err, f"{path} line 3: {problem}")


def test_empty_file(capsys, tmp_path):
    (tmp_path / "hellaswag_val.jsonl").write_text("\n")
    code, _, err = run_main(capsys, "--data_dir", tmp_path, "--model", "gpt2")
    assert_one_line_error(code, err, "holds no tasks")


# -----------------------------------------------------------------------------
# torch.compile


def test_pad_to_compiles_once(tiny, examples, enc):
    """Every graph dynamo compiles goes through the backend, so counting the backend's calls counts
    compilations (torch._dynamo.utils.counters["stats"]["unique_graphs"] counts the same in torch 2.13);
    error_on_recompile additionally makes any recompile during the second pass raise. The backend
    runs the graph eagerly, so this needs no C++ compiler and takes a second."""
    _, ours, _ = tiny
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=counting_backend)
    expected = score(ours, examples, enc, batch_size=5)
    assert (score(compiled, examples[:7], enc, batch_size=5, pad_to=80)
            == score(ours, examples[:7], enc, batch_size=5))
    assert len(graphs) == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        # other lengths, same shape
        assert score(compiled, examples, enc, batch_size=5, pad_to=80) == expected
    assert len(graphs) == 1
    # the control: without pad_to, batches of other shapes do recompile, and the count shows it
    score(compiled, examples, enc, batch_size=5)
    assert len(graphs) > 1
    torch._dynamo.reset()


@pytest.mark.slow
@ci_only
# from inductor
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_cli_matches_eager(tiny, examples, enc, data_dir, capsys):
    """Inductor on CPU (a C++ build: tens of seconds) scores like eager, through the library and the CLI."""
    _, ours, folder = tiny
    torch._dynamo.reset()
    rendered = [render_example(ex, enc) for ex in examples]
    compiled = torch.compile(ours)
    for (sums, means), (ref_sums, ref_means) in zip(iterate_losses(compiled, rendered, batch_size=4,
                                                                   pad_to=80),
                                                    iterate_losses(ours, rendered, batch_size=4)):
        torch.testing.assert_close(sums, ref_sums, atol=TOL, rtol=0)
        torch.testing.assert_close(means, ref_means, atol=TOL, rtol=0)
    lines = []
    for flag in ("1", "0"):
        code, out, _ = run_main(capsys, "--model", folder, "--data_dir", data_dir, "--limit", 12,
                                "--batch_size", 4, "--device", "cpu", "--compile", flag)
        assert code == 0
        lines.append(out.splitlines()[-1])
    assert lines[0] == lines[1] and lines[0].endswith("n: 12")
    torch._dynamo.reset()
