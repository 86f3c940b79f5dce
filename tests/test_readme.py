"""README's flag tables, one per script: each lists every flag of the script's config dataclass, in order,
with its real default, so that the README cannot drift from `--help`."""
import dataclasses
import os
import re

import pytest

from conftest import REPO
from train_gpt2 import auto_or_bool, parse_bool

SCRIPTS = [("train_gpt2.py", "train_gpt2", "TrainConfig"), ("fineweb.py", "fineweb", "FinewebConfig"),
           ("hellaswag.py", "hellaswag", "HellaswagConfig"), ("generate.py", "generate", "GenerateConfig"),
           ("plot.py", "plot", "PlotConfig"), ("export.py", "export", "ExportConfig")]


@pytest.mark.parametrize("script, module, config", SCRIPTS)
def test_flags_table_lists_every_flag_with_its_default(script, module, config):
    with open(os.path.join(REPO, "README.md")) as f:
        flags = f.read().split("\n## Flags\n")[1].split("\n## ")[0]
    table = flags.split(f"\n### `{script}`\n")[1].split("\n### ")[0]
    rows = dict(re.findall(r"^\| `--(\w+)` \| `?([^|`]*)`? \|", table, re.M))
    fields = dataclasses.fields(getattr(__import__(module), config))
    assert list(rows) == [f.name for f in fields]
    for f in fields:
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        value = rows[f.name].strip()
        parsers = {bool: parse_bool, list: lambda v: [v] if v else [], str | bool: auto_or_bool}
        parse = parsers.get(f.type, f.type)
        assert parse(value) == default, f"--{f.name}: README says {value!r}, the default is {default!r}"
