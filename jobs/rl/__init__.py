"""The pieces of GRPO and PPO (issue in progress: not yet wired into a driver loop).

Pure tensor-in / tensor-out math, no Ray and no models:

- `registry`: `Registry`, the one way to pick an estimator or loss by name;
- `masked`: `masked_sum`, `masked_mean`, `masked_var`, `masked_whiten`;
- `algos`: advantage estimators (`ADVANTAGE_ESTIMATORS`), policy losses
  (`POLICY_LOSSES`) and the clipped PPO value loss;
- `kl`: KL-to-reference estimators (`KL_ESTIMATORS`), `kl_penalty`, entropy.

Actors and engines (imported only where they run):

- `engines`: the rollout engine interface, `TransformersEngine`, `make_engine`;
  `vllm_engine`: vLLM with weight reload (and the tied-embedding fix);
- `learner`: `LearnerWorker`, FSDP2 policy (and reference) on one torch.distributed
  group, train step through the loss registry, weight export, DCP checkpoints.

Tests: `pytest tests/test_rl_math.py tests/test_rl_engines.py tests/test_rl_learner.py`.
"""
