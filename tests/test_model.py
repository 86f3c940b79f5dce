"""The model: parity with Hugging Face's GPT-2, weight import/export, size, init, causality, loss,
input checks, optimizer groups and the FLOPs count.

No GPT-2 weights are reachable offline, so parity is checked against randomly initialised
transformers.GPT2LMHeadModel models of the same shapes: what matters is that the architecture and
the weight mapping (names, Conv1D transposes, tying) agree, which random weights test as well as
OpenAI's would.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import REPO, ci_only
from export import save_pretrained
from train_gpt2 import GPT, LOSS_CHUNK_TOKENS, GPTConfig, KVCache

TOL = 1e-4  # float32 logits


@torch.no_grad()
def perturb_(model, n_embd):
    """Add noise of std 1/sqrt(n_embd) to every weight: biases and LayerNorm parameters move away from
    their init (zero, one) so a dropped one would show, and the GELU inputs become O(1), where the tanh
    approximation differs from the exact GELU by ~1e-3 (at 0.02-scale weights it hides under TOL)."""
    for p in model.parameters():  # the tied wte/lm_head is one parameter, perturbed once
        p.add_(torch.randn_like(p) / math.sqrt(n_embd))
    return model


def random_hf_model(folder, fmt="safetensors", **config_kwargs):
    """A random, perturbed GPT2LMHeadModel saved to `folder` in Hugging Face format; returns
    (hf_model, folder). fmt="bin" writes the older pytorch_model.bin layout instead: transformers 5
    ignores save_pretrained(safe_serialization=False) and always writes model.safetensors, so the
    .bin is written with torch.save, as older versions did."""
    torch.manual_seed(0)
    vocab = config_kwargs.get("vocab_size", 50257)
    config = GPT2Config(bos_token_id=vocab - 1, eos_token_id=vocab - 1, **config_kwargs)
    hf = perturb_(GPT2LMHeadModel(config).eval(), config.n_embd)
    if fmt == "safetensors":
        hf.save_pretrained(folder)
        assert (folder / "model.safetensors").exists()
    else:
        config.save_pretrained(folder)
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
        assert not (folder / "model.safetensors").exists()
    return hf, folder


def random_tokens(vocab_size, B=2, T=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (B, T), generator=g)


@torch.no_grad()
def assert_same_logits(ours, hf, idx, n_vocab=None):
    """Our logits (first n_vocab columns) equal HF's to TOL, in float32 eval mode."""
    ours.eval()
    hf.eval()
    logits, loss = ours(idx)
    ref = hf(idx).logits
    n_vocab = n_vocab or ref.size(-1)
    assert loss is None
    assert logits.dtype == ref.dtype == torch.float32
    assert ref.shape == (*idx.shape, n_vocab)
    diff = (logits[..., :n_vocab] - ref).abs().max().item()
    assert diff < TOL, f"max |logits - HF logits| = {diff:.3g}"


# -----------------------------------------------------------------------------
# 1. Loading Hugging Face GPT-2 weights


TINY_CONFIGS = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=1000),
    "odd": dict(n_layer=3, n_head=3, n_embd=48, n_positions=37, vocab_size=777),
}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_from_pretrained_matches_transformers_tiny(tmp_path, name, fmt):
    kw = TINY_CONFIGS[name]
    hf, folder = random_hf_model(tmp_path, fmt=fmt, **kw)
    model = GPT.from_pretrained(str(folder))
    assert model.config == GPTConfig(block_size=kw["n_positions"], vocab_size=kw["vocab_size"],
                                     n_layer=kw["n_layer"], n_head=kw["n_head"], n_embd=kw["n_embd"])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_same_logits(model, hf, random_tokens(kw["vocab_size"], T=16))
    # a full-length sequence, so every position embedding is used
    assert_same_logits(model, hf, random_tokens(kw["vocab_size"], B=1, T=kw["n_positions"]))


@pytest.mark.slow
def test_from_pretrained_matches_transformers_124M(tmp_path):
    """The full gpt2 (124M) shape: GPT2Config() defaults, 12 layers, 12 heads, 768 wide."""
    hf, folder = random_hf_model(tmp_path)
    model = GPT.from_pretrained(str(folder))
    assert model.config == GPTConfig()
    assert_same_logits(model, hf, random_tokens(50257))


@pytest.mark.slow
@pytest.mark.parametrize("n_head,n_embd", [pytest.param(16, 1024, id="gpt2-medium"),
                                            pytest.param(20, 1280, id="gpt2-large", marks=ci_only),
                                            pytest.param(25, 1600, id="gpt2-xl", marks=ci_only)])
def test_from_pretrained_matches_transformers_larger_shapes(tmp_path, n_head, n_embd):
    """The per-layer shapes of gpt2-medium, -large and -xl at their full vocab and context, with only
    2 layers: depth is only a count of identical blocks, and full-depth xl (1.5B parameters, loaded
    twice in float32) would need ~18 GB here."""
    hf, folder = random_hf_model(tmp_path, n_layer=2, n_head=n_head, n_embd=n_embd)
    model = GPT.from_pretrained(str(folder))
    assert model.config == GPTConfig(n_layer=2, n_head=n_head, n_embd=n_embd)
    assert_same_logits(model, hf, random_tokens(50257, T=24))


@pytest.mark.parametrize("override", [
    dict(activation_function="relu"),
    dict(n_inner=100),
    dict(scale_attn_by_inverse_layer_idx=True),
    dict(layer_norm_epsilon=1e-2),
    dict(scale_attn_weights=False),
    dict(tie_word_embeddings=False),
], ids=lambda d: next(iter(d)))
def test_from_pretrained_never_loads_a_different_model(tmp_path, override):
    """A GPT-2 config this model cannot reproduce is rejected with a ValueError naming the setting;
    if one is supported instead, its logits match transformers'. Never a silently different model."""
    hf, folder = random_hf_model(tmp_path, **TINY_CONFIGS["tiny"], **override)
    try:
        model = GPT.from_pretrained(str(folder))
    except ValueError as e:
        assert next(iter(override)) in str(e)
        return
    assert_same_logits(model, hf, random_tokens(1000, T=16))


# -----------------------------------------------------------------------------
# 2. Exporting to Hugging Face format


def test_save_pretrained_drops_vocab_padding_and_round_trips(tmp_path):
    """A model trained from scratch has its vocab padded to 50304 (a multiple of 128 for fast matmuls);
    the export keeps GPT-2's 50257 real tokens, which transformers and from_pretrained both load."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, n_layer=2, n_head=4, n_embd=64, block_size=128)).eval()
    perturb_(model, 64)
    save_pretrained(model, str(tmp_path), 50257)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()

    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert hf.config.vocab_size == 50257 and hf.config.n_positions == 128
    idx = random_tokens(50257, T=64)
    assert_same_logits(model, hf, idx, n_vocab=50257)

    back = GPT.from_pretrained(str(tmp_path)).eval()
    assert back.config == GPTConfig(vocab_size=50257, n_layer=2, n_head=4, n_embd=64, block_size=128)
    with torch.no_grad():
        diff = (back(idx)[0] - model(idx)[0][..., :50257]).abs().max().item()
    assert diff < TOL


def test_save_pretrained_small_vocab_round_trips(tmp_path):
    torch.manual_seed(0)
    model = perturb_(GPT(GPTConfig(vocab_size=1000, n_layer=2, n_head=4, n_embd=64,
                                   block_size=64)).eval(), 64)
    save_pretrained(model, str(tmp_path), 1000)
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert hf.config.vocab_size == 1000
    idx = random_tokens(1000, T=64)
    assert_same_logits(model, hf, idx)
    back = GPT.from_pretrained(str(tmp_path))
    assert back.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_the_model_section_runs_alone_as_a_leaf():
    """train_gpt2.py's model section, as nanoGPT's model.py: with only the standard library and torch
    imported, none of the rest of the file (UserError, print0, fineweb's GPT-2 sizes), it builds,
    trains, samples and refuses a bad prompt with a plain ValueError."""
    with open(os.path.join(REPO, "train_gpt2.py")) as f:
        source = f.read()
    section = source[source.index("# The model"):source.index("# The data")]
    scope = {}
    imports = ("import contextlib, json, math, os\nfrom dataclasses import dataclass\nimport torch\n"
               "import torch.nn as nn\nimport torch.nn.functional as F\nimport torch.utils.checkpoint\n")
    exec(imports + section, scope)
    model = scope["GPT"](scope["GPTConfig"](block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=8))
    model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, device_type="cpu")
    assert model.generate([1, 2], 2, 30, n_vocab=50).shape == (2, 16)
    with pytest.raises(ValueError, match="the prompt has 17 tokens"):
        model.generate(list(range(17)), 1, 1)


# -----------------------------------------------------------------------------
# 3. Size and parameter names


def test_124M_parameter_count_names_and_tying():
    """Built on the meta device: the count and names do not depend on the values."""
    with torch.device("meta"):
        model = GPT(GPTConfig())
        hf = GPT2LMHeadModel(GPT2Config())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # tied wte/lm_head counted once
    assert model.lm_head.weight is model.transformer.wte.weight
    assert set(model.state_dict()) == set(hf.state_dict())
    per_block = {f"{m}.{w}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
                 for w in ("weight", "bias")}
    expected = ({"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                 "transformer.ln_f.bias", "lm_head.weight"}
                | {f"transformer.h.{i}.{k}" for i in range(12) for k in per_block})
    assert set(model.state_dict()) == expected


# -----------------------------------------------------------------------------
# 4. Initialisation


def test_init_distribution():
    torch.manual_seed(0)
    n_layer = 6
    model = GPT(GPTConfig(vocab_size=4096, block_size=512, n_layer=n_layer, n_head=4, n_embd=256))
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    checked = set()
    for name, p in model.named_parameters():
        p = p.detach()
        if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.LayerNorm):
            expected = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            assert torch.equal(p, expected), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            std = proj_std if name.endswith("c_proj.weight") else 0.02
            assert abs(p.mean().item()) < 0.05 * std, name
            assert p.std().item() == pytest.approx(std, rel=0.03), name
        checked.add(name)
    assert len(checked) == 2 + 12 * n_layer + 2  # wte (= lm_head), wpe, blocks, ln_f


# -----------------------------------------------------------------------------
# 5-7. Forward: causality, outputs and loss, input checks


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=1000, block_size=32, n_layer=2, n_head=4, n_embd=64)).eval()


@torch.no_grad()
def test_causal(small_model):
    idx = random_tokens(1000, T=32)
    base = small_model(idx)[0]
    for t in (0, 7, 31):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 1000
        logits = small_model(changed)[0]
        assert torch.equal(logits[:, :t], base[:, :t]), f"changing token {t} changed earlier logits"
        assert not torch.allclose(logits[:, t], base[:, t]), f"changing token {t} left its logits unchanged"


def test_forward_outputs_and_loss(small_model):
    idx, targets = random_tokens(1000, B=3, T=20), random_tokens(1000, B=3, T=20, seed=2)
    logits, loss = small_model(idx)
    assert loss is None
    assert logits.shape == (3, 20, 1000)
    _, loss = small_model(idx, targets)
    assert loss.shape == ()
    # at init the predictions are near uniform
    assert abs(loss.item() - math.log(1000)) < 0.5
    # the loss is plain mean cross-entropy: checked on confident predictions, where variants differ
    with torch.no_grad():
        small_model.lm_head.weight.mul_(50)
    logits, loss = small_model(idx, targets)
    assert logits.std() > 3
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 1000), targets.reshape(-1)))


def test_any_targets_layout(small_model):
    """model(x[:, :-1], x[:, 1:]): slices of one tensor, non-contiguous, give the loss of contiguous copies,
    and so do transposed (column-major) targets."""
    x = random_tokens(1000, B=3, T=21)
    inputs, targets = x[:, :-1], x[:, 1:]
    assert not targets.is_contiguous()
    expected = small_model(inputs.contiguous(), targets.contiguous())[1]
    assert torch.equal(small_model(inputs, targets)[1], expected)
    assert torch.equal(small_model(inputs, targets.t().contiguous().t())[1], expected)


def loss_and_grads(model, idx, targets, chunked, dtype=None):
    model.chunked_loss = chunked
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype, tol", [(None, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 1e-2)],
                         ids=["float32", "bfloat16", "float16"])
def test_chunked_loss_equals_the_full_one(dtype, tol):
    """Loss and every gradient (the tied wte/lm_head's too), over several full chunks and a ragged one; under
    autocast within the dtype's rounding (bfloat16 keeps 8 bits of mantissa, float16 11), which the full
    loss's head has and the chunked one, in float32, has not. Gradients are compared relative to each
    tensor's largest."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=1000, n_layer=2, n_head=2, n_embd=32))
    idx, targets = random_tokens(1000, B=3, T=200), random_tokens(1000, B=3, T=200, seed=2)
    assert idx.numel() > 2 * LOSS_CHUNK_TOKENS and idx.numel() % LOSS_CHUNK_TOKENS  # a ragged last chunk
    full_logits, full, full_grads = loss_and_grads(model, idx, targets, False, dtype)
    logits, chunked, grads = loss_and_grads(model, idx, targets, True, dtype)
    assert logits is None and full_logits.shape == (3, 200, 1000)  # the whole logits are never made
    assert chunked == pytest.approx(full, abs=1e-5 if dtype is None else 1e-3)
    for name, g in full_grads.items():
        assert (grads[name] - g).abs().max() <= tol * g.abs().max(), name


def test_chunked_loss_without_gradients_and_with_logits_asked_for(small_model):
    idx, targets = random_tokens(1000, B=3, T=20), random_tokens(1000, B=3, T=20, seed=2)
    full_logits, full = small_model(idx, targets)
    small_model.chunked_loss = True
    with torch.no_grad():  # evaluation: the loss only
        # float32 sums in another order: a few ulps apart (1.4e-6 of 6.92 on an AMD EPYC)
        assert small_model(idx, targets)[1].item() == pytest.approx(full.item(), abs=1e-5)
    logits, loss = small_model(idx, targets, return_logits=True)
    assert torch.equal(logits, full_logits) and torch.equal(loss, full)


def test_initial_loss_padded_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, block_size=64, n_layer=2, n_head=4, n_embd=64))
    _, loss = model(random_tokens(50257, T=64), random_tokens(50257, T=64, seed=2))
    assert abs(loss.item() - math.log(50304)) < 0.5


def test_too_long_input_raises(small_model):
    with pytest.raises(ValueError, match="length 33 is longer than block_size 32"):
        small_model(torch.zeros(1, 33, dtype=torch.long))


# -----------------------------------------------------------------------------
# 8. Optimizer


def test_configure_optimizers(small_model):
    [opt] = small_model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    seen = []
    for group in opt.param_groups:
        assert group["lr"] == 6e-4 and group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
        assert not group.get("fused")
        for p in group["params"]:
            assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
            seen.append(id(p))
    assert sorted(seen) == sorted(id(p) for p in small_model.parameters())  # each exactly once
    decayed = {n for n, p in small_model.named_parameters() if p.dim() >= 2}
    matmuls = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert decayed == ({"transformer.wte.weight", "transformer.wpe.weight"}
                       | {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in matmuls})


# -----------------------------------------------------------------------------
# 9. FLOPs


def test_flops_per_token_124M():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304))
    n = 124_439_808 + (50304 - 50257) * 768 - 1024 * 768  # padded vocab, less wpe (a lookup)
    expected = 6 * n + 12 * 12 * 1024 * 768
    assert model.flops_per_token(1024) == expected
    assert 0.84e9 < expected < 0.88e9


# -----------------------------------------------------------------------------
# 10. The KV cache


def test_kv_cache_logits_equal_full_forward():
    """Feeding a sequence in chunks through a KVCache (prefill, several tokens, one token) gives the
    logits of one forward over the whole sequence; past block_size is a ValueError."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_embd=32)
    model = perturb_(GPT(config), config.n_embd).eval()
    idx = random_tokens(100, B=3, T=20)
    cache = KVCache(config, batch_size=3)
    with torch.no_grad():
        full, _ = model(idx)
        chunks = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 7), (7, 12), (12, 13), (13, 20))]
        assert cache.pos == 20
        assert (torch.cat(chunks, dim=1) - full).abs().max().item() < 1e-5
        with pytest.raises(ValueError, match="block_size"):
            model(random_tokens(100, B=3, T=13), kv_cache=cache)
