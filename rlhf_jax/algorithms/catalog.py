"""The RL algorithms by name: each one a small, explicit choice over the same on-device iteration.

| name                  | advantage             | critic   | policy loss        | KL to the reference | source |
|-----------------------|-----------------------|----------|--------------------|---------------------|--------|
| ppo                   | GAE over a critic     | yes      | clipped ratio      | in the reward       | Schulman et al. 2017; Ouyang et al. 2022 |
| ppo_penalty           | GAE over a critic     | yes      | ratio − β·KL(old‖θ)| in the reward       | Schulman et al. 2017 §4 |
| grpo                  | (r − mean_g) / std_g  | none     | clipped ratio      | k3 loss term        | Shao et al. 2024 |
| dr_grpo               | r − mean_g            | none     | clipped, Σ/T       | k3 loss term        | Liu et al. 2025 |
| dapo                  | (r − mean_g) / std_g  | none     | clip-higher, token | none                | Yu et al. 2025 |
| gspo                  | (r − mean_g) / std_g  | none     | sequence ratio     | none                | Zheng et al. 2025 |
| rloo                  | r − mean of the others| none     | clipped ratio      | in the reward       | Ahmadian et al. 2024 |
| reinforce_pp          | batch-whitened returns| none     | clipped ratio      | in the reward (k1)  | Hu 2025 |
| reinforce_pp_baseline | group mean subtracted | none     | clipped ratio      | in the reward (k1)  | Hu 2025 |
| remax                 | r − r(greedy)         | none     | clipped ratio      | in the reward       | Li et al. 2023 |

Hyperparameters (group size, clip ranges, β, ...) live in the config; this table only says which
pieces each algorithm uses.
"""
from __future__ import annotations

import dataclasses

ADVANTAGES = ("gae", "sequence", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")
CRITICS = ("separate", "shared", "none")
POLICY_LOSSES = ("clip", "penalty", "gspo")
KL_PLACEMENTS = ("reward", "loss", "none")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # need group_size > 1


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Which pieces of the iteration an algorithm uses (see the module table)."""

    advantage: str
    critic: str = "none"  # "separate" | "shared" is chosen by config.critic.type for critic algorithms
    policy_loss: str = "clip"
    kl_in: str = "reward"
    loss_agg_mode: str = "token-mean"
    clip_higher: bool = False  # use config.algorithm.clip_eps_high as the upper clip (DAPO)
    filter_groups: bool = False  # DAPO dynamic sampling: groups with equal rewards get no update
    overlong: bool = False  # DAPO soft overlong punishment added to the score

    @property
    def grouped(self) -> bool:
        return self.advantage in GROUP_ADVANTAGES


ALGORITHMS = {
    "ppo": Algorithm(advantage="gae", critic="separate"),
    "ppo_penalty": Algorithm(advantage="gae", critic="separate", policy_loss="penalty"),
    "grpo": Algorithm(advantage="grpo", kl_in="loss", loss_agg_mode="seq-mean-token-mean"),
    "dr_grpo": Algorithm(advantage="dr_grpo", kl_in="loss", loss_agg_mode="seq-mean-token-sum-norm"),
    "dapo": Algorithm(advantage="grpo", kl_in="none", clip_higher=True, filter_groups=True, overlong=True),
    "gspo": Algorithm(advantage="grpo", policy_loss="gspo", kl_in="none"),
    "rloo": Algorithm(advantage="rloo"),
    "reinforce_pp": Algorithm(advantage="reinforce_pp"),
    "reinforce_pp_baseline": Algorithm(advantage="reinforce_pp_baseline"),
    "remax": Algorithm(advantage="remax"),
}
