"""SFT and RM with config.lora: adapters (and the RM's scalar head) only in the optimizer and the
checkpoint, exact resume after SIGTERM, the merged export loads in transformers with the LoRA
model's logits, a LoRA reward model loads merged with the LoRA model's scores."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rm as rm_configs
from configs import sft as sft_configs
from rlhf_jax import checkpoint, loading, lora, metrics
from rlhf_jax.models import Transformer, from_pretrained, save_pretrained
from rlhf_jax.trainers import rm, sft

NUM_STEPS = 8
pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def files(lora_files):
    """Built-in task demonstrations and rankings, tokenizer, and a random tiny Llama-style base saved as HF."""
    return lora_files


def lora_config(files, **overrides):
    config = sft_configs.get_config("tiny")
    config.init.update(source="hf", path=str(files / "base"))
    config.lora.update(rank=4, alpha=8.0)
    config.data.update(train=str(files / "train.jsonl"), eval="", tokenizer=str(files / "tokenizer"), max_len=32,
                       cache_dir=str(files / "tfds"))
    config.update(num_steps=NUM_STEPS, batch_size=8, log_every=1, eval_every=0, fast_compile=True)
    config.optim.update(learning_rate=1e-2, warmup_steps=1, decay_steps=NUM_STEPS)
    config.checkpoint.save_every = 1000
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_ref")
    result = sft.train(lora_config(files, **{"mesh.data": 8}), str(workdir))
    assert result.step == NUM_STEPS
    return workdir, metrics.read_metrics(workdir), jax.device_get(result.state)


def test_only_adapters_are_trained_and_saved(files, reference):
    workdir, rows, state = reference
    assert rows[-1]["loss"] < rows[0]["loss"]
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert paths and all(lora.is_adapter(p) for p in paths)
    assert len(paths) == 2 * 7  # A and B of q, k, v, o, gate, up, down (layers stacked)
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in moments) == 2 * lora.count(state.params)  # Adam mu + nu, adapters only
    meta = checkpoint.read_meta(workdir)
    assert meta["lora"]["base"] == {"source": "hf", "path": str(files / "base")} and meta["lora"]["rank"] == 4


def test_sigterm_then_rerun_resumes_exactly(files, reference, tmp_path, sigterm_after_step):
    sigterm_after_step(3)
    first = sft.train(lora_config(files, **{"mesh.data": 8}), str(tmp_path))
    assert first.preempted and first.step == 4
    second = sft.train(lora_config(files, **{"mesh.data": 8}), str(tmp_path))
    assert second.step == NUM_STEPS
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(metrics.read_metrics(tmp_path)) == strip(reference[1])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state), reference[2])


def test_resume_on_another_mesh(files, reference, tmp_path, sigterm_after_step):
    """Stopped on data=8, resumed on fsdp=4 x tensor=2 (adapter shardings follow their kernels'
    logical axes): the same losses and adapters up to float rounding."""
    sigterm_after_step(3)
    assert sft.train(lora_config(files, **{"mesh.data": 8}), str(tmp_path)).step == 4
    second = sft.train(lora_config(files, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}), str(tmp_path))
    rows, reference_rows = metrics.read_metrics(tmp_path), reference[1]
    assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in reference_rows], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(second.state.params), reference[2].params)


def test_merged_and_peft_exports_of_the_run_load_with_the_lora_logits(files, reference, tmp_path):
    """The run loads merged (and saves as a plain HF model), and `export.export_peft` (export_hf.py
    --adapters) writes its adapters for peft on the base it adapted: both give the LoRA model's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from rlhf_jax import export
    workdir, _, state = reference
    model, merged = loading.load_model(str(workdir))  # a LoRA checkpoint comes back merged
    assert not any(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
    save_pretrained(model, merged, tmp_path / "hf")
    # Independent expectation: the LoRA model on base + saved adapters (no merge involved).
    _, base = from_pretrained(str(files / "base"))
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    ids = np.array([[5, 9, 13, 17, 21, 25]])
    lmodel = lora.lora_model(model, spec, train=False)
    expected = jax.jit(lambda p: lmodel.apply({"params": p}, jnp.asarray(ids)).logits)(lora.combine(state.params, base))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4)
    record = export.export_peft(workdir, tmp_path / "adapters")
    assert record["kind"] == "peft_adapters" and record["base"] == {"source": "hf", "path": str(files / "base")}
    with torch.no_grad():
        with_adapters = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
            record["base"]["path"], torch_dtype=torch.float32), tmp_path / "adapters")
        got = with_adapters(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4)
    with pytest.raises(export.ExportError, match=r"^--out .*/hf is not empty"):  # never over another export
        export.export_peft(workdir, tmp_path / "hf")
    plain = Transformer(model.config).apply({"params": base}, jnp.asarray(ids)).logits
    assert float(jnp.abs(plain - expected).max()) > 1e-3  # training moved the adapters away from zero


def test_qlora_sft_trains_on_the_quantised_base_and_loads_merged(files, tmp_path):
    """config.lora.quantize='nf4': the loss falls, the checkpoint holds adapters only, and loading
    merges them into the dequantised base: the logits of the LoRA model on the nf4 base."""
    config = lora_config(files, **{"lora.quantize": "nf4", "lora.quantize_block": 16, "num_steps": 4})
    result = sft.train(config, str(tmp_path))
    rows = metrics.read_metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(result.state.params)[0])
    assert checkpoint.read_meta(tmp_path)["lora"]["quantize"] == "nf4"
    model, merged = loading.load_model(str(tmp_path))
    _, base = from_pretrained(str(files / "base"))
    lmodel = lora.lora_model(model, lora.LoraSpec(rank=4, alpha=8.0, quantize="nf4", quantize_block=16), train=False)
    full = lora.combine(jax.device_get(result.state.params), lora.quantize_base(lmodel, base))
    ids = jnp.asarray([[5, 9, 13, 17, 21, 25]])
    expected = lmodel.apply({"params": full}, ids).logits
    np.testing.assert_allclose(model.apply({"params": merged}, ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_one_device_and_eight_devices_take_the_same_steps(files, tmp_path, quantize):
    """Three LoRA SFT steps on a 1-device mesh and on data=2 x fsdp=2 x tensor=2 (base, quantised
    base and adapters sharded by their logical axes): the same losses and adapters up to float rounding."""
    from rlhf_jax import sharding
    from rlhf_jax.trainers import lora_state, state

    config = lora_config(files, **{"lora.quantize": quantize, "lora.quantize_block": 16, "optim.learning_rate": 1e-3})
    model = Transformer(from_pretrained(str(files / "base"))[0].config)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, (3, 8, 16)).astype(np.int32)
    batches = [{"input_ids": x, "attention_mask": np.ones_like(x), "loss_mask": np.ones_like(x)} for x in ids]
    runs = {}
    for name, shape, devices in (("1", (1, 1, 1), jax.devices()[:1]), ("8", (2, 2, 2), jax.devices())):
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices=devices)
        adapted = lora_state.setup(config, model, mesh)
        built = state.build_state(config, adapted.model, mesh, str(tmp_path / name), 3, trainable=adapted.trainable)
        step = lora_state.jit_train_step(adapted, sft.make_loss_fn(adapted.model), built,
                                         sharding.batch_sharding(mesh), weight_fn=sft.target_tokens)
        current, losses = built.state, []
        for batch in batches:
            current, metrics_row = step(current, sharding.shard_batch(batch, mesh))
            losses.append(float(metrics_row["loss"]))
        built.checkpointer.close()
        runs[name] = losses, jax.device_get(current.params)
    assert min(float(np.abs(b).max()) for b in jax.tree.leaves(runs["1"][1]) if b.shape[-2] == 4) > 1e-3  # B moved
    np.testing.assert_allclose(runs["8"][0], runs["1"][0], rtol=1e-5)
    # atol 1e-5: AdamW's normalised step turns reduction-order rounding of near-zero gradients into
    # adapter differences proportional to the learning rate (at lr 1e-2: up to 1.3e-5 with nf4).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), runs["8"][1], runs["1"][1])


def test_lora_on_a_fresh_model_is_refused(files, tmp_path):
    config = lora_config(files)
    config.init.update(source="scratch", path="")
    with pytest.raises(ValueError, match=r"^config.lora.rank=4 needs config.init.source"):
        sft.train(config, str(tmp_path))


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_reward_model_trains_adapters_and_head_and_loads_merged(files, tmp_path, quantize):
    config = rm_configs.get_config("tiny")
    config.init.update(source="hf", path=str(files / "base"))
    config.lora.update(rank=4, alpha=8.0, quantize=quantize, quantize_block=16)
    config.data.update(train=str(files / "rankings.jsonl"), eval="", tokenizer=str(files / "tokenizer"), max_len=32,
                       cache_dir=str(files / "tfds_rm"))
    config.update(num_steps=6, batch_size=8, log_every=1, fast_compile=True)
    config.normalize.num_batches = 1
    config.checkpoint.save_every = 1000
    config.optim.update(learning_rate=1e-2, warmup_steps=1, decay_steps=6)
    result = rm.train(config, str(tmp_path))
    assert set(result.state.params) == {"layers", "value_head"}
    assert all(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(result.state.params["layers"])[0])
    model, merged, norm = loading.load_reward_model(str(tmp_path))
    assert norm["std"] > 0
    _, base = from_pretrained(str(files / "base"))
    base = {k: v for k, v in base.items() if k != "lm_head"}
    ids = jnp.asarray([[5, 9, 13, 17, 21, 25]])
    spec = lora.LoraSpec(rank=4, alpha=8.0, modules_to_save=("value_head",), quantize=quantize, quantize_block=16)
    lmodel = lora.lora_model(model, spec, train=False)
    base = lora.quantize_base(lmodel, base) if spec.quantized else base
    expected = lmodel.apply({"params": lora.combine(jax.device_get(result.state.params), base)}, ids).values
    np.testing.assert_allclose(model.apply({"params": merged}, ids).values, expected, atol=1e-5)
