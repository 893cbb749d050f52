"""Direct preference optimisation pieces below the trainers: the variants, the ordered pairs of a
ranking, and sequence log-probs of responses (one definition for the DPO trainer, its evaluation
and the pipeline).

Variants (`VARIANTS`, the names `run_pipeline.py --config.algorithm=` takes for the DPO stage):
    dpo        loss_type "sigmoid"  (Rafailov et al. 2023)               summed log-probs
    cdpo       "sigmoid" with label smoothing 0.1 (Mitchell 2023)        summed log-probs
    ipo        loss_type "ipo"      (Azar et al. 2023)                   length-averaged log-probs (as TRL)
    simpo      loss_type "simpo"    (Meng et al. 2024), reference-free   summed log-probs and lengths (the
                                                                         loss divides by the lengths)
    online_dpo "sigmoid" on pairs the current policy sampled, ranked each round (iterative DPO)
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from rlhf_jax import losses
from rlhf_jax.rl import masked_sum

# variant -> (loss_type, label_smoothing, online)
VARIANTS = {"dpo": ("sigmoid", 0.0, False), "cdpo": ("sigmoid", 0.1, False), "ipo": ("ipo", 0.0, False),
            "simpo": ("simpo", 0.0, False), "online_dpo": ("sigmoid", 0.0, True)}
# Default beta per loss type: DPO 0.1 (Rafailov et al. 2023), IPO 0.1 (TRL's default, on length-averaged
# log-probs), SimPO 2.0 (torchtune's SimPOLoss default, beta typically 2.0-2.5; its gamma default is 0.5).
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0}
LOGP_FORM = {"sigmoid": "sum", "ipo": "mean", "simpo": "sum"}  # what the trainer passes to losses.dpo_loss


def resolve_variant(dpo_cfg, variant: str | None = None) -> dict:
    """Loss settings of a DPO config section: `loss_type` ("" = the variant's), `beta` (< 0 = the
    loss type's default, `DEFAULT_BETA`), `label_smoothing` (< 0 = the variant's), `gamma`, `online`.
    Raises ValueError naming the key for an unknown variant / loss type."""
    variant = variant or "dpo"
    if variant not in VARIANTS:
        raise ValueError(f"config.algorithm={variant!r} is not a DPO variant ({', '.join(map(repr, VARIANTS))})")
    loss_type, smoothing, online = VARIANTS[variant]
    loss_type = dpo_cfg.loss_type or loss_type
    if loss_type not in losses.DPO_LOSS_TYPES:
        raise ValueError(f"config.dpo.loss_type={loss_type!r} (allowed: {', '.join(map(repr, losses.DPO_LOSS_TYPES))})")
    smoothing = smoothing if dpo_cfg.label_smoothing < 0 else float(dpo_cfg.label_smoothing)
    if not 0.0 <= smoothing < 0.5:
        raise ValueError(f"config.dpo.label_smoothing={smoothing} must be in [0, 0.5) (or < 0 for the variant's)")
    beta = DEFAULT_BETA[loss_type] if dpo_cfg.beta < 0 else float(dpo_cfg.beta)
    if beta <= 0:
        raise ValueError(f"config.dpo.beta={dpo_cfg.beta} must be > 0 (or < 0 for the loss type's default)")
    return {"loss_type": loss_type, "beta": beta, "label_smoothing": smoothing, "gamma": float(dpo_cfg.gamma),
            "online": online or bool(dpo_cfg.get("online", False))}


def ordered_pairs(ranks: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every ordered pair of a ranking: `ranks [P, K]` (0 = best, < 0 absent) -> (chosen, rejected,
    valid), each `[P, K(K-1)/2]`: slot m holds responses i < j of the m-th combination, the better
    ranked one as `chosen`; `valid` is 1.0 where both are present and their ranks differ (a tie
    carries no preference). A full K = 4 ranking gives exactly its 6 pairs."""
    k = ranks.shape[-1]
    first, second = (jnp.asarray(x, jnp.int32) for x in zip(*itertools.combinations(range(k), 2)))
    rank_i, rank_j = ranks[..., first], ranks[..., second]
    i_better = rank_i < rank_j
    chosen = jnp.where(i_better, first, second)
    rejected = jnp.where(i_better, second, first)
    valid = ((rank_i != rank_j) & (rank_i >= 0) & (rank_j >= 0)).astype(jnp.float32)
    return chosen, rejected, valid


def sequence_logps(model, params, input_ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array, *,
                   rng: jax.Array | None = None, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced sum of log pi(x_t | x_<t) over the positions t with `loss_mask` 1, and their count.

    `input_ids`, `attention_mask`, `loss_mask` `[B, T]` int (any padding: right-padded ranking rows or
    a left-padded prompt followed by a response; `loss_mask` is 1 on response tokens only, so prompt
    and padding are excluded; `loss_mask[:, 0]` is ignored, nothing predicts the first token).
    Returns (log-probs `[B]` fp32, nats; lengths `[B]` fp32, tokens). Dropout with `rng` when not
    `deterministic`."""
    out = model.apply({"params": params}, input_ids, attention_mask, deterministic=deterministic,
                      rngs=None if deterministic else {"dropout": rng})
    token_logps = losses.token_logprobs(out.logits[:, :-1], input_ids[:, 1:])
    targets = loss_mask[:, 1:] * attention_mask[:, 1:]
    return masked_sum(token_logps, targets, axis=-1), masked_sum(jnp.ones_like(token_logps), targets, axis=-1)


def ranking_logps(model, params, batch, *, rng=None, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """`sequence_logps` of every response of a ranking batch (`input_ids`, `attention_mask`,
    `loss_mask` `[P, K, T]`) -> (log-probs `[P, K]`, lengths `[P, K]`)."""
    p, k, t = batch["input_ids"].shape
    flat = [batch[key].reshape(p * k, t) for key in ("input_ids", "attention_mask", "loss_mask")]
    logps, lengths = sequence_logps(model, params, *flat, rng=rng, deterministic=deterministic)
    return logps.reshape(p, k), lengths.reshape(p, k)


def ranking_pair_losses(logps: jax.Array, ref_logps: jax.Array, lengths: jax.Array, ranks: jax.Array,
                        settings: dict) -> tuple[jax.Array, dict, jax.Array]:
    """`losses.dpo_pair_losses` over the ordered pairs of each ranking.

    `logps`, `ref_logps`, `lengths` `[P, K]` (summed log-probs and response tokens), `ranks [P, K]`;
    `settings` from `resolve_variant`. IPO gets length-averaged log-probs (`LOGP_FORM`). Returns
    (per-pair losses `[P, M]`, per-pair aux incl. `logps/chosen`, `logps/rejected` `[P, M]`, valid
    `[P, M]`), M = K(K-1)/2."""
    loss_type = settings["loss_type"]
    if LOGP_FORM[loss_type] == "mean":
        logps, ref_logps = logps / jnp.maximum(lengths, 1.0), ref_logps / jnp.maximum(lengths, 1.0)
    chosen, rejected, valid = ordered_pairs(ranks)
    take = lambda x, idx: jnp.take_along_axis(x, idx, axis=-1)  # noqa: E731
    pair_losses, aux = losses.dpo_pair_losses(
        take(logps, chosen), take(logps, rejected), take(ref_logps, chosen), take(ref_logps, rejected),
        settings["beta"], loss_type=loss_type, label_smoothing=settings["label_smoothing"],
        chosen_lengths=take(lengths, chosen), rejected_lengths=take(lengths, rejected), gamma=settings["gamma"])
    aux = {**aux, "logps/chosen": jax.lax.stop_gradient(take(logps, chosen)),
           "logps/rejected": jax.lax.stop_gradient(take(logps, rejected))}
    return pair_losses, aux, valid
