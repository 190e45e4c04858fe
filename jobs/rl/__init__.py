"""GRPO and PPO: the driver loop and its actors.

Pure tensor-in / tensor-out math, no Ray and no models:

- `registry`: `Registry`, the one way to pick an estimator, loss or sync by name;
- `masked`: `masked_sum`, `masked_mean`, `masked_var`, `masked_whiten`;
- `algos`: advantage estimators (`ADVANTAGE_ESTIMATORS`), policy losses
  (`POLICY_LOSSES`) and the clipped PPO value loss;
- `kl`: KL-to-reference estimators (`KL_ESTIMATORS`), `kl_penalty`, entropy.

Actors and engines (imported only where they run):

- `loop`: `run_rl`, the single-controller driver (what `posttrain run` calls for grpo/ppo);
- `actors`: `RolloutWorker` (one engine), `RewardWorker` (the job's rewards);
- `engines`: the rollout engine interface, `TransformersEngine`, `make_engine`;
  `vllm_engine`: vLLM with weight reload (and the tied-embedding fix);
- `learner`: `LearnerWorker`, FSDP2 policy (and reference) on one torch.distributed
  group, train step through the loss registry, weight export, DCP checkpoints;
- `critic`: `CriticWorker`, PPO's value model on its own FSDP2 group;
- `sync`: weight sync learner -> engines (`ObjectStoreSync`, `CollectiveSync`).

Tests: `pytest tests/test_rl_math.py tests/test_rl_engines.py tests/test_rl_learner.py
tests/test_rl_critic.py tests/test_rl_sync.py tests/test_rl_e2e.py`.
"""
