"""GRPO and PPO: the single-controller loop and the actors it drives (`algorithms.rl` is the entry).

- `methods`: what distinguishes grpo from ppo (a critic, the default estimator);
- `placement`: how many actors of each role, what each holds, Ray options and bundles;
- `batch`: a step's prompts, their split over actors, scores merged back, the padded batch;
- `loop`: `RLRun` (the actors of a run, a step's calls, checkpoints) and `run_steps`;
- `sync`: weight sync learner -> engines (`ObjectStoreSync`, `CollectiveSync`);
- `workers/`: `RolloutWorker` (one engine), `RewardWorker` (the job's rewards), and on
  `ShardedWorker` (FSDP2 group, micro-batches, epochs, DCP checkpoints) `LearnerWorker` and
  PPO's `CriticWorker`;
- `engines/`: the engine interface and table (`transformers`, `vllm`, imported lazily);
- `math/`: pure tensor-in / tensor-out code: advantage estimators and losses (`algos`),
  KL estimators and entropy (`kl`), masked reductions (`masked`).

Layers (checked by import-linter): the loop above the workers, the workers above the engines and
the math; the math imports nothing of the runtime but the registry.

Tests: `pytest tests/test_rl_math.py tests/test_rl_engines.py tests/test_rl_learner.py
tests/test_rl_critic.py tests/test_rl_sync.py tests/test_rl_e2e.py`.
"""
