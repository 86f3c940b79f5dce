"""The fine-tuning recipe of docs/evaluate-and-export.md as a user runs it, end to end on CPU: fineweb.py
on Tiny Shakespeare, train_gpt2.py from a Hugging Face GPT-2 folder with the recipe's flags, loss.png,
export.py, and transformers.pipeline generating from the exported folder."""
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, ci_only, read_log, run_train

# The recipe is for GPT-2 124M on a GPU; the random stand-in for `gpt2` has a 64-token context,
# so the shape, batch and step counts shrink. Later flags win, so these override the recipe's.
CPU_SCALE = ["--seq_len", 64, "--total_batch_size", 256, "--max_steps", 60, "--warmup_steps", 6,
             "--eval_interval", 20, "--val_steps", 4, "--ckpt_interval", 60, "--sample_interval", 30,
             "--device", "cpu"]


def doc_commands(doc, section):
    """The `python ...` commands of the first bash block in doc's section `section`, as argument lists."""
    with open(os.path.join(REPO, doc)) as f:
        text = f.read().split(f"\n{section}\n")[1]
    block = text.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python ")]


@pytest.mark.slow
@ci_only
def test_finetune_recipe_end_to_end(tmp_path, hf_folder):
    pytest.importorskip("matplotlib", reason="the recipe's loss.png needs matplotlib (in requirements.txt)")
    from transformers import pipeline
    prepare, finetune, export = doc_commands("docs/evaluate-and-export.md", "## Fine-tune GPT-2")
    assert prepare == ["python", "fineweb.py", "--preset", "shakespeare"]
    assert finetune[:4] == ["python", "train_gpt2.py", "--init_from", "gpt2"] and export[1] == "export.py"

    # fineweb.py's preset reads the repository's Tiny Shakespeare: no download
    data = tmp_path / "shakespeare"
    subprocess.run([sys.executable, os.path.join(REPO, "fineweb.py"), *prepare[2:], "--out_dir", data],
                   check=True, capture_output=True)
    log_dir = tmp_path / "log_shakespeare"
    proc = run_train(*finetune[2:], "--init_from", hf_folder, "--data_dir", data, "--log_dir", log_dir,
                     *CPU_SCALE)
    val = read_log(log_dir)["val"]
    assert sorted(val) == [0, 20, 40, 60]
    assert all(val[a] > val[b] for a, b in ((0, 20), (20, 40), (40, 60))), val
    assert val[0] - val[60] > 0.1, proc.stdout[-2000:]
    assert (log_dir / "loss.png").read_bytes().startswith(b"\x89PNG")

    out = tmp_path / "gpt2-shakespeare"
    subprocess.run([sys.executable, os.path.join(REPO, "export.py"), *export[2:], "--checkpoint", log_dir,
                    "--out_dir", out],
                   check=True, capture_output=True)
    assert f"{val[60]:.4f}" in (out / "README.md").read_text()
    generator = pipeline("text-generation", model=str(out))
    text = generator("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
