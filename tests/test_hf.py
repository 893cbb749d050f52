"""Hugging Face interop: logit parity with transformers' PyTorch models, round trips, clear errors."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.models import (  # noqa: E402
    Transformer,
    TransformerConfig,
    from_pretrained,
    init_params,
    last_token_values,
    save_pretrained,
)

VOCAB = 97
TOL = 1e-4

# Tiny random configs; together they cover every mapping rule: GPT-2's fused c_attn and biases,
# Llama with GQA + explicit head_dim != d/h + attention/mlp biases + non-default rope theta,
# Qwen2 (qkv bias only, tied embeddings), Mistral (GQA + sliding window shorter than the text).
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, sliding_window=3),
}


def _randomize(torch_model):
    """Weights far from HF's init (norm scales ~1 ± 0.3, biases nonzero) so every tensor matters."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = ("norm" in name or ".ln_" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.3 * noise if is_norm_scale else 0.3 * noise)
    return torch_model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """model_type -> (model_type, directory written by transformers, the torch model); built once."""
    built = {}

    def get(model_type):
        if model_type not in built:
            torch.manual_seed(0)
            model = _randomize(transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[model_type]()))
            path = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(path)
            built[model_type] = (model_type, path, model)
        return built[model_type]

    return get


@pytest.fixture(params=sorted(HF_CONFIGS))
def hf_dir(request, hf_models):
    return hf_models(request.param)


def _batch():
    """Row 0 unpadded, row 1 left-padded by 4 (pad id 0 never appears in real text here)."""
    ids = np.random.RandomState(1).randint(1, VOCAB, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


def _torch_logits(torch_model, ids, mask):
    """Transformers' logits; position ids = cumsum(mask) - 1 so left padding does not shift positions."""
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(positions))
    return out.logits.numpy()


def _random_params(model, seed, scale):
    """N(0, scale²) for every parameter of `model`, built from shapes only (no init compile)."""
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.randn(*s.shape), jnp.float32), shapes)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids, mask):
    return model.apply({"params": params}, ids, mask)


def _our_logits(model, params, ids, mask):
    return np.asarray(_forward(model, params, ids, mask).logits)


def _max_real_diff(a, b, mask):
    return float(np.max(np.abs(a - b) * mask[..., None]))


def test_logit_parity_left_padded(hf_dir):
    model_type, path, torch_model = hf_dir
    model, params = from_pretrained(path)
    ids, mask = _batch()
    ref = _torch_logits(torch_model, ids, mask)
    ours = _our_logits(model, params, ids, mask)
    assert np.abs(ref).max() > 1.0  # logits are not trivially tiny, so 1e-4 is a real bound
    assert _max_real_diff(ours, ref, mask) <= TOL, model_type
    # The padded row equals the same text unpadded (HF's own default positions, no mask).
    with torch.no_grad():
        alone = torch_model(input_ids=torch.tensor(ids[1:, 4:])).logits.numpy()
    np.testing.assert_allclose(ours[1, 4:], alone[0], atol=TOL)


def test_loaded_config_matches_hf(hf_dir):
    model_type, path, _ = hf_dir
    model, _ = from_pretrained(path)
    cfg = model.config
    expected = {  # written out from HF_CONFIGS above
        "gpt2": dict(positions="learned", n_kv_heads=None, d_ff=128, tie_embeddings=True, attn_bias=True),
        "llama": dict(positions="rope", n_kv_heads=2, head_dim=16, rope_theta=500.0, attn_bias=True, mlp_bias=True),
        "qwen2": dict(positions="rope", n_kv_heads=1, qkv_bias=True, attn_bias=False, tie_embeddings=True),
        "mistral": dict(positions="rope", n_kv_heads=2, sliding_window=3, tie_embeddings=False),
    }[model_type]
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert model.heads == ("lm",)


def test_round_trip_through_transformers(hf_dir, tmp_path):
    """HF -> ours -> save_pretrained -> transformers and -> ours again: same logits, same tensors."""
    model_type, path, torch_model = hf_dir
    model, params = from_pretrained(path)
    save_pretrained(model, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    reloaded_torch = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = _batch()
    assert _max_real_diff(_torch_logits(reloaded_torch, ids, mask), _torch_logits(torch_model, ids, mask), mask) <= TOL
    original, written = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(written) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(written[name], original[name], err_msg=name)
    _, params_again = from_pretrained(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_again, params)


@pytest.mark.parametrize("config", [
    TransformerConfig.gpt2(vocab_size=VOCAB, d_model=32, n_heads=2, d_ff=64, max_len=32, tie_embeddings=False),
    TransformerConfig.llama(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32,
                            qkv_bias=True, sliding_window=4),  # -> qwen2 with sliding window on all layers
], ids=["gpt2-untied", "qwen2-sliding"])
def test_ours_to_transformers(config, tmp_path):
    """A model born in JAX (random params) is exported and transformers reproduces its logits."""
    model = Transformer(config)
    params = _random_params(model, seed=3, scale=0.3)
    save_pretrained(model, params, tmp_path)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = _batch()
    ours = _our_logits(model, params, ids, mask)
    assert np.abs(ours).max() > 1.0
    assert _max_real_diff(_torch_logits(torch_model, ids, mask), ours, mask) <= TOL


def test_value_head_model_is_a_sequence_classifier(tmp_path):
    """heads=("value",) -> 1-label ForSequenceClassification; HF's pooled score = our last-token value."""
    config = TransformerConfig.llama(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, max_len=32)
    model = Transformer(config, heads=("value",))
    params = _random_params(model, seed=4, scale=0.3)
    save_pretrained(model, params, tmp_path, extra_config={"pad_token_id": 0})
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = np.random.RandomState(2).randint(1, VOCAB, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as in ranking batches
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
    values = _forward(model, params, ids, mask).values
    np.testing.assert_allclose(np.asarray(last_token_values(values, jnp.asarray(mask))), ref, atol=TOL)
    loaded, loaded_params = from_pretrained(tmp_path)
    assert loaded.heads == ("value",)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_params, params)


def test_sharded_and_bf16_checkpoints(hf_models, tmp_path):
    """A sharded index and bf16 storage load to the same (bf16-rounded) parameters."""
    _, _, torch_model = hf_models("llama")
    torch_model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    torch_model.to(torch.float32)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, params = from_pretrained(tmp_path)
    ids, mask = _batch()
    bf16_rounded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert _max_real_diff(_our_logits(model, params, ids, mask), _torch_logits(bf16_rounded, ids, mask), mask) <= TOL


# ----------------------------------------------------------------------------------------------
# Errors name the file, field or tensor and what is supported
# ----------------------------------------------------------------------------------------------
def _copy_dir(src, dst):
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_errors_name_what_is_wrong(hf_models, tmp_path):
    _, path, _ = hf_models("mistral")
    bad = _copy_dir(path, tmp_path / "bad")
    _edit_config(bad, model_type="bert")
    with pytest.raises(ValueError, match=r"model_type='bert' is not supported \(supported: gpt2, llama, qwen2, mistral\)"):
        from_pretrained(bad)

    _edit_config(bad, model_type="mistral", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_parameters.rope_type='linear' is not supported"):
        from_pretrained(bad)

    bad = _copy_dir(path, tmp_path / "missing")
    _edit_tensors(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        from_pretrained(bad)

    bad = _copy_dir(path, tmp_path / "shape")
    _edit_tensors(bad, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(8, 32\), "
                                         r"config.json implies \(16, 32\)"):
        from_pretrained(bad)

    bad = _copy_dir(path, tmp_path / "extra")
    _edit_tensors(bad, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.q_proj.bias'\]"):
        from_pretrained(bad)

    bad = _copy_dir(path, tmp_path / "pickle")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors checkpoints are read"):
        from_pretrained(bad)

    with pytest.raises(ValueError, match="unknown override"):
        from_pretrained(path, d_modle=8)


def test_save_refuses_configs_transformers_cannot_represent(tmp_path):
    odd = Transformer(TransformerConfig.llama(vocab_size=VOCAB, d_model=32, n_heads=4, norm="layernorm"))
    with pytest.raises(ValueError, match="matches no supported HF model"):
        save_pretrained(odd, {}, tmp_path)  # refused from the config alone
    both = Transformer(TransformerConfig.llama(vocab_size=VOCAB, d_model=32, n_heads=4), heads=("lm", "value"))
    with pytest.raises(ValueError, match="has no single Hugging Face class"):
        save_pretrained(both, {}, tmp_path)
