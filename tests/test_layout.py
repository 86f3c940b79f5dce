"""The repository's layout as README's "The code" table promises it: every part in the file named for it,
train_gpt2.py within 1,000 lines, no line over 110 characters, imports pointing one way (the one exception:
hellaswag.py's main() imports train_gpt2.py to load a model), and a base module (common.py) that imports
neither torch nor any other script of the repository."""
import ast
import glob
import os
import subprocess
import sys

from conftest import REPO

# The repository's Python files: the scripts and modules at the top, bench/ and tests/
PY_FILES = sorted(os.path.relpath(p, REPO) for d in ("", "bench", "tests")
                  for p in glob.glob(os.path.join(REPO, d, "*.py")))
MODULES = sorted(p[:-3] for p in PY_FILES if "/" not in p)  # what `import NAME` finds at the top


def tree(path):
    with open(os.path.join(REPO, path)) as f:
        return ast.parse(f.read())


def repo_imports(path):
    """(enclosing top-level function or None, imported repository module) for every import in path."""
    found = []
    for top in tree(path).body:
        where = top.name if isinstance(top, (ast.FunctionDef, ast.ClassDef)) else None
        for node in ast.walk(top):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            found += [(where, n) for n in names if n in MODULES]
    return found


def test_train_gpt2_within_1000_lines_and_no_line_over_110_characters():
    with open(os.path.join(REPO, "train_gpt2.py")) as f:
        assert len(f.readlines()) <= 1000
    long = []
    for path in PY_FILES:
        with open(os.path.join(REPO, path)) as f:
            long += [f"{path}:{n}: {len(line.rstrip(chr(10)))}" for n, line in enumerate(f, 1)
                     if len(line.rstrip("\n")) > 110]
    assert "train_gpt2.py" in PY_FILES and "tests/test_layout.py" in PY_FILES and long == []


def test_every_part_in_the_file_named_for_it():
    """All of HellaSwag is in hellaswag.py; fineweb.py holds corpora into shards and the shard format only;
    what a run writes to resume is in checkpoints.py."""
    defined = {p: {n.name for n in tree(p).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
               for p in PY_FILES if "/" not in p}
    owners = {"iterate_examples": "hellaswag.py", "render_example": "hellaswag.py", "score": "hellaswag.py",
              "hellaswag_file": "hellaswag.py", "hellaswag_share": "hellaswag.py",
              "UserError": "common.py", "config_parser": "common.py", "hold_folder": "common.py",
              "gpt2_tokenizer": "common.py", "write_synced": "common.py",
              "save_checkpoint": "checkpoints.py", "load_checkpoint": "checkpoints.py",
              "resume_config": "checkpoints.py", "restore_state": "checkpoints.py",
              "find_shards": "fineweb.py", "open_shard": "fineweb.py"}
    assert {name: [p for p in defined if name in defined[p]] for name in owners} == \
        {name: [path] for name, path in owners.items()}
    assert [n for n in defined["fineweb.py"] if "hellaswag" in n.lower() or "parser" in n.lower()] == []


def test_common_imports_neither_torch_nor_another_script():
    """With torch blocked, common.py (and fineweb.py and plot.py, which build on it and start tokenizing
    processes or plot without torch) import, and load no script of the repository but common.py."""
    code = ("import sys; sys.modules['torch'] = None; import common, fineweb, plot; "
            f"print(sorted(m for m in sys.modules if m in {MODULES!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr, out.stdout) == (0, "", "['common', 'fineweb', 'plot']\n")
    assert {n for _, n in repo_imports("common.py")} == set()


def test_imports_point_one_way_but_for_hellaswag_main():
    """No import circle at module level; the one import of a module that (through its own imports) imports
    the importer is train_gpt2 inside hellaswag.py's main()."""
    top = {m: {n for where, n in repo_imports(m + ".py") if where is None} for m in MODULES}

    def reach(m):  # every module m imports, directly or through others
        seen, todo = set(), [m]
        while todo:
            new = top[todo.pop()] - seen
            seen |= new
            todo += new
        return seen

    assert [m for m in MODULES if m in reach(m)] == []  # no circle
    back = [(m, where, n) for m in MODULES for where, n in repo_imports(m + ".py") if m in reach(n)]
    assert back == [("hellaswag", "main", "train_gpt2")]
