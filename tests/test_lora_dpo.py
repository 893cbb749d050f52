"""DPO with config.lora: the reference is the policy with its adapters off (no second base copy) and
its log-probs equal a separate reference model's exactly; the state holds adapters only; training
moves the adapters and leaves the base; QLoRA (nf4) runs the same way."""
import math

import jax
import numpy as np
import pytest

from configs import dpo as dpo_configs
from rlhf_jax import checkpoint, loading, lora, metrics, preference, sharding
from rlhf_jax.models import Transformer, from_pretrained
from rlhf_jax.trainers import dpo, lora_state, ranking_data

pytestmark = pytest.mark.usefixtures("compilation_cache")
NUM_STEPS = 4


@pytest.fixture(scope="module")
def files(lora_files):
    return lora_files


def lora_dpo_config(files, **overrides):
    config = dpo_configs.get_config("tiny")
    config.init.update(source="hf", path=str(files / "base"))
    config.lora.update(rank=4, alpha=8.0)
    config.data.update(train=str(files / "rankings.jsonl"), eval="", tokenizer=str(files / "tokenizer"),
                       cache_dir=str(files / "tfds_dpo"), max_len=32)
    config.update_from_flattened_dict({"num_steps": NUM_STEPS, "batch_size": 8, "log_every": 1, "fast_compile": True,
                                       "optim.learning_rate": 1e-2, "optim.warmup_steps": 1,
                                       "optim.decay_steps": NUM_STEPS, "checkpoint.save_every": 1000, **overrides})
    return config


def test_reference_logps_equal_a_separate_reference_model_exactly(files, tmp_path):
    config = lora_dpo_config(files)
    mesh = sharding.make_mesh(config.mesh)
    loaded = ranking_data.load_data(config, str(tmp_path))
    model = loading.architecture(config.init, config.model, heads=("lm",), vocab_size=len(loaded.tokenizer))
    adapted = lora_state.setup(config, model, mesh, keep_initial=True)
    ref_model, ref_params = dpo.reference_of(config, model, mesh, adapted)
    assert all(a is b for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(adapted.frozen)))  # no copy
    batch = sharding.shard_batch(next(loaded.train.iterator(8, seed=0)), mesh)
    got = jax.jit(lambda p, b: preference.ranking_logps(ref_model, p, b)[0])(ref_params, batch)
    _, own_copy = from_pretrained(str(files / "base"))
    expected = jax.jit(lambda p, b: preference.ranking_logps(Transformer(model.config), p, b)[0])(own_copy, batch)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("quantize,reference", [("none", "in_step"), ("nf4", "precompute")])
def test_lora_dpo_trains_only_adapters_from_the_adapter_free_reference(files, tmp_path, quantize, reference):
    """Step 1 with fresh adapters: policy == reference (computed in the step, or precomputed on the
    nf4 base), so loss = log 2 and every implicit reward is exactly 0; the optimizer holds adapter
    moments only; the loss falls; the checkpoint merges."""
    config = lora_dpo_config(files, **{"lora.quantize": quantize, "lora.quantize_block": 16,
                                       "dpo.reference": reference})
    result = dpo.train(config, str(tmp_path))
    rows = metrics.read_metrics(tmp_path)
    # in_step: the same program computes both log-probs, bit-equal; precompute: another program, whose
    # fusions may round differently (1e-8 measured)
    bound = 0.0 if reference == "in_step" else 1e-6
    assert abs(rows[0]["rewards/chosen"]) <= bound and abs(rows[0]["rewards/rejected"]) <= bound
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    state = jax.device_get(result.state)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert paths and all(lora.is_adapter(p) for p in paths)
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in moments) == 2 * lora.count(state.params)
    assert checkpoint.read_meta(tmp_path)["lora"]["quantize"] == quantize
    _, merged = loading.load_model(str(tmp_path))
    _, base = from_pretrained(str(files / "base"))
    moved = [float(np.abs(m - b).max()) for m, b in zip(jax.tree.leaves(merged["layers"]),
                                                         jax.tree.leaves(base["layers"]))]
    assert max(moved) > 1e-3
