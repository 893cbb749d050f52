"""Export to Hugging Face (rlhf_jax.export): what transformers computes from the exported directory
equals what we compute from the checkpoint (reward scores on right-padded batches, greedy
generation), and an export never writes into another directory's files."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import export, generation, loading, tasks
from rlhf_jax.models import Transformer, TransformerConfig, init_params
from rlhf_jax.models import reward as reward_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def save_run(workdir, model, params, stage, tokenizer, reward_norm=None):
    """A workdir as a trainer leaves it: run.json, tokenizer/ and a checkpoint with params + meta."""
    workdir.mkdir(parents=True)
    (workdir / "run.json").write_text(json.dumps({"stage": stage, "run_id": f"run-{stage}"}))
    tokenizer.save_pretrained(str(workdir / "tokenizer"))
    meta = {"model": loading.model_meta(model), "stage": stage}
    if reward_norm is not None:
        meta["reward_norm"] = reward_norm
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints")
    checkpointer.save(3, {"params": params}, meta)
    checkpointer.wait()
    checkpointer.close()


def right_padded(rows, pad):
    """ids / attention_mask [B, T] numpy, rows right-padded with `pad`."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


@pytest.mark.parametrize("family, pad_is_eos", [("gpt2", True), ("gpt2", False), ("llama", True)])
def test_exported_reward_model_scores_like_ours_on_right_padded_rows(tmp_path, family, pad_is_eos):
    """Issue 14: a GPT-2-style RM whose tokenizer pads with EOS used to be pooled by transformers at
    the last non-pad token, i.e. before the response's EOS. The export gives it a distinct pad token;
    AutoModelForSequenceClassification's scores then equal our value head at the last real token
    (raw_scores) for rows of different lengths, each ending with EOS."""
    tokenizer = tasks.build_tokenizer()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(TransformerConfig, family)(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4,
                                                d_ff=64, max_len=32)
    model = Transformer(config, heads=("value",))
    params = init_params(model, jax.random.PRNGKey(1))
    norm = {"mean": 0.25, "std": 2.0}
    save_run(tmp_path / "rm", model, params, "rm", tokenizer, norm)

    record = export.export_hf(tmp_path / "rm", tmp_path / "hf")
    eos = tokenizer.eos_token_id
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert record["kind"] == "reward_model" and record["pad_token_id"] == hf_tokenizer.pad_token_id
    assert hf_tokenizer.pad_token_id != eos
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["rlhf_jax_reward_norm"] == norm and exported["pad_token_id"] == record["pad_token_id"]

    rows = [[2, 4, 10, 11, 12, 5, 13, eos], [2, 4, 20, 5, 21, 22, 23, 24, 25, 26, eos], [2, 4, 30, 5, eos]]
    ours = np.asarray(reward_lib.raw_scores(model, params, *map(jnp.asarray, right_padded(rows, eos))))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    ids, mask = right_padded(rows, record["pad_token_id"])
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    # and the normalised score we use is (raw - mean) / std of the recorded norm
    np.testing.assert_allclose((theirs - norm["mean"]) / norm["std"], np.asarray(reward_lib.score(
        model, params, norm, *map(jnp.asarray, right_padded(rows, eos)))), atol=1e-4, rtol=1e-4)


def test_exported_policy_generates_greedily_like_ours_and_stops_at_our_eos(tmp_path):
    """A policy export: AutoModelForCausalLM + generate (its generation_config.json) gives the tokens
    our greedy `generate` gives, and its eos / pad ids are the tokenizer's."""
    tokenizer = tasks.build_tokenizer()
    model = Transformer(TransformerConfig.gpt2(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4,
                                               d_ff=64, max_len=32), heads=("lm",))
    params = init_params(model, jax.random.PRNGKey(2))
    save_run(tmp_path / "sft", model, params, "sft", tokenizer)
    record = export.export_hf(tmp_path / "sft", tmp_path / "hf")
    generation_config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation_config["eos_token_id"], generation_config["pad_token_id"]) == (
        tokenizer.eos_token_id, tokenizer.pad_token_id) == (record["eos_token_id"], record["pad_token_id"])

    prompt = [2, 4, 10, 11, 5]
    ours = generation.generate(model, params, jnp.array([prompt]), jnp.ones((1, len(prompt)), jnp.int32),
                               jax.random.PRNGKey(0), max_new_tokens=6, temperature=0.0,
                               eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=6, do_sample=False)[0, len(prompt):].numpy()
    n = int(np.asarray(ours.mask)[0].sum())
    np.testing.assert_array_equal(out[:n], np.asarray(ours.tokens)[0, :n])


def test_export_refuses_a_non_empty_directory_it_did_not_write(tmp_path):
    """--out holding someone's file, or an export of another run: one-line ExportError, nothing written;
    an earlier export of the same run is refreshed."""
    tokenizer = tasks.build_tokenizer()
    model = Transformer(TransformerConfig.llama(vocab_size=len(tokenizer), d_model=16, n_layers=1, n_heads=2,
                                                d_ff=32, max_len=16), heads=("lm",))
    params = init_params(model, jax.random.PRNGKey(0))
    save_run(tmp_path / "a", model, params, "sft", tokenizer)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="busy is not empty"):
        export.export_hf(tmp_path / "a", tmp_path / "busy")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]

    export.export_hf(tmp_path / "a", tmp_path / "out")
    export.export_hf(tmp_path / "a", tmp_path / "out")  # the same run again: allowed
    run_b = tmp_path / "b"
    save_run(run_b, model, params, "sft", tokenizer)
    (run_b / "run.json").write_text(json.dumps({"stage": "sft", "run_id": "another"}))
    with pytest.raises(export.ExportError, match="an export of another run"):
        export.export_hf(run_b, tmp_path / "out")
    with pytest.raises(export.ExportError, match="not empty"):  # a run's own workdir is never an output
        export.export_hf(tmp_path / "a", run_b)


def test_exported_policy_keeps_every_stop_id(tmp_path):
    """A tokenizer whose generation_config.json lists two stop ids (Llama-3 style): the export's
    generation_config lists both, so transformers' generate ends where our rollouts end."""
    from rlhf_jax.data import chat

    tokenizer = tasks.build_tokenizer()
    model = Transformer(TransformerConfig.gpt2(vocab_size=len(tokenizer), d_model=16, n_layers=1, n_heads=2,
                                               d_ff=32, max_len=16), heads=("lm",))
    save_run(tmp_path / "sft", model, init_params(model, jax.random.PRNGKey(0)), "sft", tokenizer)
    stop = sorted({tokenizer.eos_token_id, 7})
    (tmp_path / "sft" / "tokenizer" / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    export.export_hf(tmp_path / "sft", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == stop
    assert list(chat.stop_ids(loading.load_tokenizer(str(tmp_path / "hf")))) == stop
