"""The RL iteration as pure functions, separate from host-side plumbing (trainers/ppo.py).

    experience, metrics = rollout(models, settings, state, prompts)
    state, metrics = update(models, settings, optimizers, state, experience, ptx)
    state, metrics, outputs = iteration(models, settings, optimizers, state, batch)   # both, one program

- `catalog.py`: the algorithms by name (ppo, ppo_penalty, grpo, dr_grpo, dapo, gspo, rloo,
  reinforce_pp, reinforce_pp_baseline, remax), each a choice of the pieces below.
- `types.py`: `RLSettings` (advantage estimator, critic or none, policy loss, where the KL goes,
  and their hyperparameters), `Models`, `RLState`, `Experience`, state shardings and creation.
- `rollout.py`: generate -> score -> log-probs / reference log-probs / values -> rewards with
  the KL leash -> advantages.
- `update.py`: epochs x minibatches of actor (and critic) steps under `lax.scan`, the KL
  controller, and `iteration = rollout then update`.
Each piece is jittable on its own (profiling) and inside `iteration` (training): one code path.
"""
from rlhf_jax.algorithms.rollout import generate_responses, rollout
from rlhf_jax.algorithms.catalog import ALGORITHMS, Algorithm
from rlhf_jax.algorithms.types import (Experience, Models, Optimizers, RLSettings, RLState, abstract_state,
                                       actor_params, create_state, critic_params, state_shardings)
from rlhf_jax.algorithms.update import iteration, iteration_keys, minibatch_indices, next_kl_coef, update

__all__ = ["ALGORITHMS", "Algorithm", "Experience", "Models", "Optimizers", "RLSettings", "RLState", "abstract_state",
           "actor_params", "create_state", "critic_params", "generate_responses", "iteration", "iteration_keys", "minibatch_indices",
           "next_kl_coef", "rollout",
           "state_shardings", "update"]
