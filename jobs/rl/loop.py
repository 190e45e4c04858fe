"""The GRPO / PPO single controller: the actors of one run and the loop over its steps.

Each step, in the driver process, as in veRL / OpenRLHF:

1. take `rl.promptsPerStep` prompts from the data (a fixed, seeded order; `batch.step_prompts`);
2. rollout actors sample `rl.groupSize` completions per prompt (vLLM or transformers);
3. reward actors score every completion (the job's weighted rewards);
4. advantages (pure math, `math.algos`): the method's estimator, over the critic's values when
   it has one (`methods.Method`), over per-step rewards when the estimator asks for them;
5. learner actors (FSDP2, one torch.distributed group) take `rl.ppoEpochs` optimizer steps on
   the batch; PPO's critic actors fit the returns;

   (a method with `teacher` (on-policy distillation, `distill.on_policy`) replaces 3-5: teacher
   actors score the sampled tokens into top-k log-probabilities and the learners minimise the
   divergence to them; no rewards, no advantages)
6. the weight-sync layer (`sync`) pushes the new policy into every rollout engine;
7. one line of metrics (the run context: metrics.jsonl, /metrics, trackers) and, every
   `checkpoint.everySteps`, a checkpoint.

With `rl.async: true` the rollouts of step t+1 are generated (with the weights of step t) while
step t trains: rollouts are at most one step stale (`staleness`). The old logprobs of the ratio
are recomputed by the learner on the batch it trains on.

Checkpoints (`checkpoint-<step>/`): `learner/` and `critic/` (torch.distributed.checkpoint shards
of model and optimizer, written by the ranks that own them), `driver.json` (step, data position,
RNG states), then the completion marker. A restarted job resumes from the newest complete one:
learners and critic reload, the engines get the learner's weights, and since every step's
sampling seed derives from `training.seed` and the step, the following steps replay what an
uninterrupted run does (with the transformers engine exactly; vLLM's kernels are not bitwise
reproducible).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from posttrain.api.spec import AdapterType, PostTrainingJob
from posttrain.jobs.run import storage
from posttrain.jobs.run.checkpoints import DRIVER_STATE, Checkpoints, driver_state, restore_rng
from posttrain.jobs.run.context import RunContext

from . import batch as batching
from .methods import Method
from .placement import Placement
from .workers.learner import CORRECTION_METRICS

log = logging.getLogger("posttrain.rl")


class RLRun:
    """The actors of one grpo/ppo run and what a step asks of them."""

    def __init__(self, job: PostTrainingJob, method: Method, *, tokenizer: Any, prompts: list[Any],
                 ckpts: Checkpoints, base_dir: Path, local_cpus: int | None, total_steps: int) -> None:
        self.job, self.spec, self.rl, self.method = job, job.spec, job.spec.rl, method
        self.tokenizer, self.prompts, self.ckpts, self.base_dir = tokenizer, prompts, ckpts, base_dir
        self.total_steps = total_steps
        self.is_lora = self.spec.adapter.type is not AdapterType.none
        self.advantage = method.advantage(self.rl.advantage)
        self.step_rewards = method.step_rewards(self.advantage)
        self.placement = Placement(self.spec, method, local_cpus=local_cpus)
        self.colocated = self.placement.colocated
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.learners: list[Any] = []
        self.rollouts: list[Any] = []
        self.scorers: list[Any] = []
        self.teachers: list[Any] = []
        self.critics: list[Any] = []
        self.sync: Any = None

    # ---- actors ----------------------------------------------------------------------------------

    def _spawn(self, cls: type, role: str) -> list[Any]:
        import ray

        return [ray.remote(cls).options(**self.placement.options(role, i)).remote()
                for i in range(self.placement.roles[role].count)]

    def start(self) -> dict[str, Any]:
        """Create every actor and wait until each has loaded its model; returns the summary's `roles`."""
        import ray

        from .sync import choose_lora_serving, make_weight_sync
        from .workers.rollout import RolloutWorker
        from .workers.scorer import RewardWorker
        from .workers.sharded import free_port

        spec, roles = self.spec, self.placement.roles
        self.placement.reserve()
        self.learners = self._spawn(self.method.learner_class(), "learner")
        self.rollouts = self._spawn(RolloutWorker, "rollout")
        base = str(self.base_dir)
        if self.method.teacher:
            from posttrain.jobs.distill.teacher import TeacherWorker

            teacher = roles["teacher"]
            self.teachers = [ray.remote(TeacherWorker).options(**self.placement.options("teacher", i)).remote(
                spec.teacher.wire(), base, teacher.threads) for i in range(teacher.count)]
        else:
            self.scorers = self._spawn(RewardWorker, "reward")

        def group(actors: list[Any], **kwargs: Any) -> list[Any]:  # every rank of one torch.distributed group
            addr = ray.get(actors[0].call.remote(_node_ip))
            port = ray.get(actors[0].call.remote(lambda _: free_port()))
            return [a.setup.remote(self.job, rank=r, world_size=len(actors), master_addr=addr, master_port=port,
                                   threads=roles["learner"].threads, base_dir=base, **kwargs)
                    for r, a in enumerate(actors)]

        engine = (spec.roles.rollout.engine if spec.roles.rollout else None) or "auto"
        # the longest sequence a step makes (prompt + completion), not the model's whole context
        engine_kwargs = {"max_model_len": spec.training.max_seq_length}
        # engines that can serve LoRA adapters (vLLM) get the slot for this adapter's rank when they will serve it:
        # loraServing adapter, or auto on GPUs (the engines' own, or the learners' when colocated)
        self.rollout_on_gpu = roles["rollout"].gpus > 0 or (self.colocated and roles["learner"].gpus > 0)
        serve = self.rl.lora_serving == "adapter" or (self.rl.lora_serving == "auto" and self.rollout_on_gpu)
        lora_rank = spec.adapter.r if self.is_lora and serve else None
        engine_setups = [r.setup.remote(spec.model.wire(), engine=engine, seed=spec.training.seed + i,
                                        threads=roles["rollout"].threads, colocated=self.colocated, base_dir=base,
                                        engine_kwargs=engine_kwargs, lora_rank=lora_rank)
                         for i, r in enumerate(self.rollouts)]
        if self.colocated:  # vLLM sizes its share from the memory it sees free: before the learners take theirs
            ray.wait(engine_setups, num_returns=len(engine_setups))
        learner_setups = group(self.learners, total_steps=self.total_steps)
        labels = [s.setup.remote([r.wire() for r in spec.rewards], base_dir=base) for s in self.scorers]
        critic_info: list[dict[str, Any]] = []
        if self.method.critic:
            from .workers.critic import CriticWorker

            self.critics = self._spawn(CriticWorker, "critic")
            critic_info = ray.get(group(self.critics))
        learner_info = ray.get(learner_setups)
        engines = ray.get(engine_setups)
        reward_labels = ray.get(labels)[0] if labels else []
        learner = roles["learner"]
        serving = choose_lora_serving(self.rl.lora_serving, is_lora=self.is_lora,
                                      engines_serve=all(e["serves_lora"] for e in engines),
                                      on_gpu=self.rollout_on_gpu)
        self.sync = make_weight_sync(self.rl.weight_sync, self.learners, self.rollouts, adapter_only=self.is_lora,
                                     on_gpu=learner.gpus > 0, lora_serving=serving)
        self.sync.setup()
        pids = {name: sorted(set(ray.get([a.pid.remote() for a in actors])))
                for name, actors in (("learner", self.learners), ("rollout", self.rollouts),
                                     ("reward", self.scorers), ("teacher", self.teachers),
                                     ("critic", self.critics)) if actors}
        out: dict[str, Any] = {
            "rollout": {"actors": roles["rollout"].count, "resources_per_actor": roles["rollout"].resources(),
                        "engine": engines[0]["engine"], "device": engines[0]["device"], "processes": pids["rollout"],
                        "placement": "colocated with learner" if self.colocated else "own actors"},
            "learner": {"actors": learner.count, "resources_per_actor": learner.resources(),
                        "strategy": learner_info[0]["sharding"], "backend": learner_info[0]["backend"],
                        "trainable_params": learner_info[0]["trainable_params"], "processes": pids["learner"]},
            "weight_sync": {"method": self.sync.method, "transport": self.sync.transport,
                            "adapter_only": self.is_lora, "lora_serving": serving},
        }
        scorers = {"reward": {"rewards": reward_labels}, "teacher": {"source": spec.teacher and spec.teacher.source}}
        for name, extra in scorers.items():
            if name in pids:  # what scores the samples
                out[name] = {"actors": roles[name].count, "resources_per_actor": roles[name].resources(), **extra,
                             "processes": pids[name]}
        if self.critics:
            out["critic"] = {"actors": learner.count, "resources_per_actor": roles["critic"].resources(),
                             "strategy": critic_info[0].get("sharding", "fsdp2"), "processes": pids["critic"]}
        return out

    def shutdown(self) -> None:
        import ray

        for actors in (self.rollouts, self.learners, self.critics):
            try:
                ray.get([a.shutdown.remote() if hasattr(a, "shutdown") else a.close.remote() for a in actors],
                        timeout=30)
            except Exception:  # noqa: BLE001 - best effort; the actors are killed next
                pass
        if self.sync is not None:
            try:
                self.sync.close()
            except Exception:  # noqa: BLE001
                pass
        for actors in (self.rollouts, self.learners, self.scorers, self.teachers, self.critics):
            for a in actors:
                ray.kill(a)
        self.placement.release()

    # ---- one step --------------------------------------------------------------------------------

    def sampling(self):
        from .engines import Sampling

        rl = self.rl
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return Sampling(n=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                        top_p=rl.top_p, stop_token_ids=tuple(stops), logprobs=rl.rollout_correction != "none")

    def launch_generate(self, step: int) -> tuple[list[Any], list[Any]]:
        """Send step `step`'s prompts to the rollout actors (split evenly); returns prompts and object refs."""
        prompts = batching.step_prompts(self.prompts, step, self.rl.prompts_per_step, self.spec.training.seed)
        sampling = self.sampling()
        refs = [actor.generate.remote([p.ids for p in part], sampling,
                                      batching.step_seed(self.spec.training.seed, step, i))
                for i, (actor, part) in enumerate(zip(self.rollouts, batching.split(prompts, len(self.rollouts))))
                if part]
        return prompts, refs

    def score(self, prompts: list[Any], gens: list[Any]):
        """Score the step's B = P x G samples on the reward actors (split evenly); one `RewardBatch`."""
        import ray

        # split by prompt, so a group's completions reach one actor together (a pairwise judge compares them)
        n = len(self.scorers)
        refs = []
        for scorer, part_prompts, part_gens in zip(self.scorers, batching.split(prompts, n), batching.split(gens, n)):
            if part_prompts:
                texts, completions, fields = batching.flatten(part_prompts, part_gens)
                refs.append(scorer.score.remote(texts, completions, fields, process=self.step_rewards))
        return batching.merge_scores(ray.get(refs), step_rewards=self.step_rewards)

    def teach(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with the teacher's top-k of every sampled token (`teacher_ids` / `teacher_logp`, [B, L, k]),
        scored on the teacher actors (rows split evenly)."""
        import ray

        from posttrain.api.distill import DistillSpec
        from posttrain.jobs.distill.on_policy import teacher_columns, teacher_rows

        settings = self.spec.distill or DistillSpec()
        rows = teacher_rows(batch)
        refs = [actor.score.remote(part, k=settings.top_k, temperature=settings.temperature,
                                   batch=self.spec.training.micro_batch_size)
                for actor, part in zip(self.teachers, batching.split(rows, len(self.teachers))) if part]
        return {**batch, **teacher_columns([s for part in ray.get(refs) for s in part], batch)}

    def advantages(self, rewards: list[float], batch: dict[str, Any], values: Any = None,
                   steps: list[list[float]] | None = None, gens: list[Any] | None = None):
        import torch

        from .math.algos import ADVANTAGE_ESTIMATORS

        estimator = ADVANTAGE_ESTIMATORS.get(self.advantage)
        r = torch.tensor(rewards, dtype=torch.float32)
        step_mask = None
        if self.step_rewards:
            r, step_mask = batching.place_step_rewards(steps or [], gens or [], batch["completion_mask"],
                                                       self.tokenizer)
        return estimator(r, batch["completion_mask"], group_size=self.rl.group_size, values=values,
                         gamma=self.rl.gamma, lam=self.rl.lam, scale_by_std=self.rl.scale_rewards,
                         step_mask=step_mask)

    def train(self, batch: dict[str, Any], scored: Any, gens: list[Any] | None = None) -> dict[str, float]:
        """The learners' (and critic's) step on the batch; `scored` is the step's RewardBatch (None for a method
        with `teacher`: the batch carries the teacher's scores and the learners need no advantages)."""
        import ray

        if scored is None:
            return ray.get([w.train_step.remote(batch) for w in self.learners])[0]
        metrics: dict[str, float] = {}
        values = ray.get([c.compute_values.remote(batch) for c in self.critics])[0] if self.critics else None
        advantages, returns = self.advantages(scored.rewards, batch, values, steps=scored.steps, gens=gens)
        critic_refs = [c.train_step.remote(dict(batch, returns=returns, old_values=values)) for c in self.critics]
        metrics.update(ray.get([w.train_step.remote(dict(batch, advantages=advantages)) for w in self.learners])[0])
        if critic_refs:
            metrics.update(ray.get(critic_refs)[0])
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------------

    def save(self, step: int, keep: int) -> storage.Location:
        """Checkpoint `step`: every learner (and critic) rank writes its shards, the driver its state, then the
        marker; older checkpoints are deleted only after that."""
        import ray

        folder = self.ckpts.begin(step)
        ray.get([w.save_checkpoint.remote(folder.child("learner").address) for w in self.learners])
        if self.critics:
            ray.get([c.save_checkpoint.remote(folder.child("critic").address) for c in self.critics])
        self.ckpts.write_json(step, DRIVER_STATE, driver_state(step, self.rl.prompts_per_step, len(self.prompts)))
        self.ckpts.mark_complete(step)
        self.ckpts.rotate(keep)
        return folder

    def load(self, folder: storage.Location) -> dict[str, Any]:
        import ray

        ray.get([w.load_checkpoint.remote(folder.child("learner").address) for w in self.learners])
        if self.critics:
            ray.get([c.load_checkpoint.remote(folder.child("critic").address) for c in self.critics])
        state = self.ckpts.read_json(folder, DRIVER_STATE)
        restore_rng(state.get("rng") or {})
        return state


def run_steps(run: RLRun, ctx: RunContext, *, start: int, steps: int) -> None:
    """Steps `start` .. `steps - 1`: generate, score, train, sync, log, and checkpoint when due."""
    import ray

    spec, rl = run.spec, run.rl
    every = spec.checkpoint.every_steps
    pending = None
    for step in range(start, steps):
        t0 = time.perf_counter()
        if pending is None:
            pending = run.launch_generate(step)
        prompts, refs = pending
        gens = [g for part in ray.get(refs) for g in part]
        t_gen = time.perf_counter() - t0
        if run.colocated and not rl.async_:  # hand the device to the learner (vLLM on GPU; no-op elsewhere)
            ray.get([r.sleep.remote() for r in run.rollouts])
        staleness = 1 if rl.async_ and step > start else 0  # generated before the previous step's update
        pending = None
        if rl.async_ and step + 1 < steps:  # generate step+1 with this step's weights while this step trains
            pending = run.launch_generate(step + 1)
        batch, generated = batching.pad_batch(gens, run.pad_id)
        t1 = time.perf_counter()
        if run.method.teacher:  # the teacher's top-k of every sampled token, in the batch; no rewards
            batch, scored = run.teach(batch), None
        else:
            scored = run.score(prompts, gens)
        t_score = time.perf_counter() - t1
        t2 = time.perf_counter()
        train_metrics = run.train(batch, scored, gens)
        t_train = time.perf_counter() - t2
        if pending is not None:  # the sync waits for the engines' running generation anyway
            ray.wait(pending[1], num_returns=len(pending[1]))
        t3 = time.perf_counter()
        sync = run.sync.push(step + 1)
        t_sync = time.perf_counter() - t3
        lengths = [len(t) for g in gens for t in g.token_ids]
        learner_keys = ("kl", "clip_fraction") if scored is not None else ("distill_loss", "teacher_kl")
        line: dict[str, Any] = {
            **(score_line(scored) if scored is not None else {}),
            "loss": train_metrics.get("loss"), **{k: train_metrics.get(k) for k in learner_keys},
            "entropy": train_metrics.get("entropy"),
            "grad_norm": train_metrics.get("grad_norm"), "learning_rate": train_metrics.get("lr"),
            "response_length_mean": sum(lengths) / len(lengths),
            "tokens_per_second": generated / t_gen if t_gen > 0 else None,
            "time_generate": t_gen, "time_reward" if scored is not None else "time_teacher": t_score,
            "time_train": t_train, "time_sync": t_sync, "time_step": time.perf_counter() - t0,
            "sync_bytes": sync.bytes, "staleness": staleness,
        }
        for key in ("value_loss", "value_clip_fraction", "value_mean", *CORRECTION_METRICS):
            if key in train_metrics:
                line[key] = train_metrics[key]
        line = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in line.items()}
        ctx.state.tokens_seen += generated
        ctx.state.rl = {k: v for k, v in line.items() if isinstance(v, (int, float)) and not k.startswith("reward_")}
        if "reward_std" in line:
            ctx.state.rl["reward_std"] = line["reward_std"]
        if scored is not None:
            ctx.state.reward_functions = {label: m for label, m in scored.means.items() if m is not None}
        ctx.log(step + 1, line)
        if every and (step + 1) % every == 0:
            checkpoint(run, ctx)
    if pending is not None:
        ray.wait(pending[1], num_returns=len(pending[1]))


def score_line(scored: Any) -> dict[str, Any]:
    """A step's reward figures for its metrics line (mean, std, each reward's mean, what was skipped)."""
    line = {"reward_mean": sum(scored.rewards) / len(scored.rewards), "reward_std": batching.std(scored.rewards),
            **{f"reward_{label}": mean for label, mean in scored.means.items()}}
    skipped = sum(scored.skipped.values())
    if skipped or scored.unscored:
        line.update(reward_skipped=skipped, reward_unscored=scored.unscored)
    return line


def checkpoint(run: RLRun, ctx: RunContext) -> None:
    step = ctx.state.step
    assert ctx.writer is not None
    ctx.writer.flush()  # metrics up to a checkpoint are stored before it counts
    ctx.folder.push()
    saved = run.save(step, run.spec.checkpoint.keep)
    ctx.checkpoint_saved(step, saved.uri)


def _node_ip(_: Any) -> str:
    import ray

    return ray.util.get_node_ip_address()
