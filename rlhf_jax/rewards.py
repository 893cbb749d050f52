"""Rule-based (programmatic) rewards for RL, as jnp functions of the sampled response.

In the spirit of GPT-4's rule-based reward models: a reward that code can compute, added to the
reward-model score with a weight from the config (or used alone, with no reward model at all).
Every rule maps `(tokens [B, N], mask [B, N]) -> [B]` float32 and runs on device inside the
jitted PPO iteration. `mask` is the generation mask: 1 up to and including the first stop token.

Rules (config `rewards.<name>` with a `weight`; weight 0 switches a rule off):
- `target_token`: number of response tokens equal to `token` ("emit token X"; a trivially
  learnable reward for tests and smoke runs).
- `length`: −|response length − `target`| (prefer responses of a given length).
- `missing_eos`: −1 when the response never emits a stop token (truncated rambling), else 0; the
  stop set is the rollout's (`config.rollout.eos_id`), not a setting of the rule.
- `overlong`: DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) over the last `buffer`
  tokens before the response cap N: 0 up to N − buffer tokens, then falling linearly to −1 at N.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from rlhf_jax import generation

Array = jax.Array
RewardFn = Callable[[Array, Array], Array]


def target_token_count(tokens: Array, mask: Array, *, token: int) -> Array:
    """Σ_t mask_t · [tokens_t = token]: how often the response emits `token`."""
    return jnp.sum((tokens == token) & mask.astype(bool), axis=-1).astype(jnp.float32)


def length_deviation(tokens: Array, mask: Array, *, target: int) -> Array:
    """−|Σ_t mask_t − target|: zero at the target length, one less per token away from it."""
    del tokens
    return -jnp.abs(jnp.sum(mask, axis=-1).astype(jnp.float32) - target)


def missing_eos(tokens: Array, mask: Array, *, stop_ids: tuple[int, ...]) -> Array:
    """−1 for a response without a stop token (any of `stop_ids`) among its valid tokens (it hit
    max_new_tokens), else 0."""
    has_eos = jnp.any(generation.is_stop(tokens, stop_ids) & mask.astype(bool), axis=-1)
    return jnp.where(has_eos, 0.0, -1.0).astype(jnp.float32)


def overlong_penalty(tokens: Array, mask: Array, *, buffer: int) -> Array:
    """DAPO soft overlong punishment with L_max = N (the response cap, tokens.shape[-1]) and
    L_cache = `buffer`: 0 for |y| <= N − buffer, ((N − buffer) − |y|) / buffer above (−1 at the cap)."""
    length = jnp.sum(mask, axis=-1).astype(jnp.float32)
    start = tokens.shape[-1] - buffer
    return jnp.minimum(0.0, (start - length) / max(buffer, 1)).astype(jnp.float32)


# name -> (function, the config keys it takes besides `weight`, what it takes from the rollout)
RULES: dict[str, tuple[Callable[..., Array], tuple[str, ...], tuple[str, ...]]] = {
    "target_token": (target_token_count, ("token",), ()),
    "length": (length_deviation, ("target",), ()),
    "missing_eos": (missing_eos, (), ("stop_ids",)),
    "overlong": (overlong_penalty, ("buffer",), ()),
}


def active_rules(rules_config: Mapping, config_path: str = "config.rewards.rules") -> dict[str, dict]:
    """Validated `{name: {"weight": w, **params}}` of the rules with a non-zero weight.

    Unknown rule names or missing/extra parameters raise a ValueError naming the config key.
    """
    active = {}
    for name, entry in dict(rules_config).items():
        if name not in RULES:
            raise ValueError(f"{config_path}.{name}: unknown rule (allowed: {', '.join(sorted(RULES))})")
        entry = dict(entry)
        if "weight" not in entry:
            raise ValueError(f"{config_path}.{name}: missing 'weight'")
        expected = set(RULES[name][1]) | {"weight"}
        if set(entry) != expected:
            hint = " (the stop set is config.rollout.eos_id)" if name == "missing_eos" and "eos_id" in entry else ""
            raise ValueError(f"{config_path}.{name}: has keys {sorted(entry)}, expected {sorted(expected)}{hint}")
        if float(entry["weight"]) != 0.0:
            active[name] = entry
    return active


def make_rule_reward(rules_config: Mapping, stop_ids: tuple[int, ...] = ()
                     ) -> Callable[[Array, Array], tuple[Array, dict[str, Array]]]:
    """`fn(tokens, mask) -> (Σ_i weight_i · rule_i [B], {name: rule_i [B]})` over the active rules;
    `stop_ids` is the rollout's stop set (`generation.stop_ids`)."""
    rules = active_rules(rules_config)
    context = {"stop_ids": tuple(stop_ids)}

    def rule_reward(tokens: Array, mask: Array):
        total = jnp.zeros(tokens.shape[:1], jnp.float32)
        parts = {}
        for name, entry in rules.items():
            fn, param_names, context_names = RULES[name]
            value = fn(tokens, mask, **{k: entry[k] for k in param_names}, **{k: context[k] for k in context_names})
            parts[name] = value
            total = total + float(entry["weight"]) * value
        return total, parts

    return rule_reward
