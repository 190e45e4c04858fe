"""RL math for GRPO and PPO: pure tensor-in / tensor-out functions, no Ray, no models.

- `registry`: `Registry`, the one way to pick an estimator or loss by name;
- `masked`: `masked_sum`, `masked_mean`, `masked_var`, `masked_whiten`;
- `algos`: advantage estimators (`ADVANTAGE_ESTIMATORS`), policy losses
  (`POLICY_LOSSES`) and the clipped PPO value loss;
- `kl`: KL-to-reference estimators (`KL_ESTIMATORS`), `kl_penalty`, entropy.

Tested against hand-computed values: `pytest tests/test_rl_math.py`.
"""
