"""README.md, docs/*.md and BENCHMARKS.md against the code: the README's length; every command they show
parsed by its script's own parser, and every other `--flag` a flag of the script it is given to; every
relative link and anchor, every repository file, test and function they name; and no words of the
project's tracker or its build machines."""
import contextlib
import functools
import glob
import importlib
import importlib.util
import inspect
import io
import os
import re
import shlex
import sys
from unittest import mock

import pytest

from conftest import REPO

README = os.path.join(REPO, "README.md")
DOCS = [README, os.path.join(REPO, "BENCHMARKS.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
SCRIPTS = ["train_gpt2.py", "fineweb.py", "hellaswag.py", "generate.py", "export.py", "plot.py",
           *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "bench", "*.py")))]
# Flags whose value the script's parser checks on disk: a checkpoint or clone of the reader's, not here.
ON_THE_READERS_DISK = ("--model", "--reference")
LM_EVAL_FLAGS = {"--model", "--model_args", "--tasks"}  # lm-evaluation-harness, not installed here


def name(path):
    return os.path.relpath(path, REPO)


def read(path):
    with open(path) as f:
        return f.read()


@functools.cache
def module(script):
    if "/" not in script:
        return importlib.import_module(script[:-3])
    spec = importlib.util.spec_from_file_location(script[:-3].replace("/", "_"), os.path.join(REPO, script))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_parser(script, argv):
    """(exit code, output) of the script's own command-line parsing of argv; the code is None if it parsed.
    A script without parse_args (its parser is in main()) is only asked for --help."""
    mod, out = module(script), io.StringIO()
    parse = getattr(mod, "parse_args", None)
    assert parse or argv == ["--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
            mock.patch.object(sys, "argv", [script, *argv]):
        try:
            parse(argv) if parse and inspect.signature(parse).parameters else (parse or mod.main)()
        except SystemExit as e:
            return e.code, out.getvalue()
    return None, out.getvalue()


def flags_in_help(text):
    """Every option string of an argparse --help: the lines that start with two spaces and a dash."""
    return {f for line in re.findall(r"^  (-\S.*?)(?:  |$)", text, re.M)
            for f in re.findall(r"--[\w-]+", line)}


@functools.cache
def script_flags(script):
    code, out = run_parser(script, ["--help"])
    assert code == 0, out
    return flags_in_help(out)


@functools.cache
def torchrun_parser():
    from torch.distributed.run import get_args_parser
    return get_args_parser()


@functools.cache
def known_flags():
    return {"torchrun": flags_in_help(torchrun_parser().format_help()), "lm_eval": LM_EVAL_FLAGS,
            **{s: script_flags(s) for s in SCRIPTS}}


def code_spans(text):
    """(fenced, span) for each shell command in text: the lines of ``` blocks (not ```python; a backslash
    continues a line), and `inline` spans, split at `&&`."""
    spans = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if lang != "python":
            spans += [(True, line) for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    spans += [(False, " ".join(s.split())) for s in re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose)]
    commands = []
    for fenced, span in spans:
        try:
            tokens = shlex.split(span, comments=True)
        except ValueError:  # prose in backticks, e.g. `enc.encode(" " + ending)`
            tokens = span.split()
        tokens = [t for t in tokens if t != "..."]  # "the same flags", "and so on"
        while "&&" in tokens:
            i = tokens.index("&&")
            commands.append((fenced, tokens[:i]))
            tokens = tokens[i + 1:]
        commands.append((fenced, tokens))
    return commands


def command_problems(fenced, tokens):
    """What is wrong with one command's flags: a command of one of our scripts (in a ``` block, or inline
    from `python` on) goes through that script's parser, a torchrun line through torchrun's and then the
    script's; in anything else each --flag must be one of the script, torchrun or lm_eval it follows, or
    with none before it, of any of them."""
    runners = [i for i, t in enumerate(tokens) if t in ("python", "python3", "torchrun")]
    if runners and (fenced or runners[0] == 0):
        tokens = tokens[runners[0]:]
        if tokens[0] == "torchrun" or tokens[1:3] == ["-m", "torch.distributed.run"]:
            argv = tokens[1:] if tokens[0] == "torchrun" else tokens[3:]
            if any(t in SCRIPTS for t in argv):
                try:
                    args = torchrun_parser().parse_args(argv)
                except SystemExit:
                    return [f"torchrun refuses {shlex.join(argv)}"]
                tokens = ["python", args.training_script, *args.training_script_args]
        if tokens[1] in SCRIPTS and hasattr(module(tokens[1]), "parse_args"):
            code, out = run_parser(tokens[1], tokens[2:])
            flag = re.search(r"error: (--\w+) ", out)
            if code and not (flag and flag.group(1) in ON_THE_READERS_DISK):
                return [f"{shlex.join(tokens)}: {out.strip()}"]
            return []
    known, owner, problems = known_flags(), None, []
    for t in tokens:
        owner = t if t in known else {"lm-eval": "lm_eval"}.get(t, owner)
        flag = re.match(r"--[a-z][\w-]*", t) if " " not in t else None  # not a quoted value: "--max_steps 9"
        if flag and flag.group() not in (known[owner] if owner else set().union(*known.values())):
            problems.append(f"{flag.group()} is not a flag of {owner or 'any script'}: {shlex.join(tokens)}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=name)
def test_every_command_and_flag_is_real(doc):
    problems = [p for fenced, tokens in code_spans(read(doc)) if tokens
                for p in command_problems(fenced, tokens)]
    assert problems == []


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {slug(h) for h in re.findall(r"^#+ (.*)$",
                                        re.sub(r"^```.*?^```", "", read(path), flags=re.M | re.S), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=name)
def test_links_and_named_files_exist(doc):
    """Relative links (and their #anchors) lead somewhere; `data/...`, `tests/...`, `bench/...` and
    `script.py` files exist; a `tests/test_x.py::test_y` names a test of that file; a `fineweb.f()` or
    `train_gpt2.f` names a function of that script."""
    text, problems = read(doc), []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(path):
            problems.append(f"link to a missing {target}")
        elif anchor and anchor not in anchors(path):
            problems.append(f"link to a missing heading {target}")
    for span in re.findall(r"`([^`\s]+)`", text):
        path, _, test = span.partition("::")
        if re.fullmatch(r"(data|tests|bench|docs)/[\w./-]+\.\w+|\w+\.py", path):
            if not os.path.isfile(os.path.join(REPO, path)):
                problems.append(f"`{span}`: no such file")
            elif test and not re.search(rf"^def {test}\(", read(os.path.join(REPO, path)), re.M):
                problems.append(f"`{span}`: no such test")
        attr = re.fullmatch(r"(train_gpt2|fineweb|hellaswag|generate|export|plot|common|checkpoints)"
                            r"\.(\w+)(\(\))?", span)
        if attr and attr[2] != "py" and not hasattr(module(attr[1] + ".py"), attr[2]):
            problems.append(f"`{span}`: {attr[1]}.py has no {attr[2]}")
    assert problems == []


def test_readmes_table_of_the_code_names_what_each_file_has_and_imports():
    """Each row of README's "The code": every `name` it says the file holds is defined there (at the top, or
    in one of its classes), and its imports are the file's own, at the top of the file."""
    import ast
    table = read(README).split("\n## The code\n")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)\.py` \| (.*) \| (.*) \|$", table, re.M)
    assert {r[0] for r in rows} == {"train_gpt2", "generate", "export", "hellaswag", "checkpoints", "plot",
                                    "fineweb", "common"}
    for stem, holds, imports in rows:
        mod = module(stem + ".py")
        classes = [v for v in vars(mod).values() if inspect.isclass(v) and v.__module__ == stem]
        names = re.findall(r"`(\w+)(?:\(\))?`", holds)
        assert names and [n for n in names if not hasattr(mod, n)
                          and not any(hasattr(c, n) for c in classes)] == [], stem
        with open(os.path.join(REPO, stem + ".py")) as f:
            tops = [n for n in ast.parse(f.read()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        ours = {a.name for n in tops if isinstance(n, ast.Import) for a in n.names} | \
            {n.module for n in tops if isinstance(n, ast.ImportFrom)}
        ours &= {r[0] for r in rows}
        assert set(re.findall(r"`(\w+)`", imports)) == ours, stem


def test_readme_is_short():
    assert len(read(README)) <= 20_000


@pytest.mark.parametrize("doc", DOCS, ids=name)
def test_no_tracker_or_build_machine_words(doc):
    """They speak to users: the hardware in its own terms, no issue numbers, no "the VM"."""
    assert re.findall(r".{0,30}(?:\bissues? #?\d|\bVMs?\b).{0,30}", read(doc), re.I) == []
