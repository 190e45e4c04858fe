"""The GRPO / PPO driver: one single-controller loop over rollout, reward and learner actors.

    posttrain run examples/grpo-arith.yaml            # embedded Ray
    python -m posttrain.jobs --spec job.yaml          # in the RayJob (joins the cluster)

Each step, in this process (the controller), as in veRL / OpenRLHF:

1. take `rl.promptsPerStep` prompts from the data (a fixed, seeded order);
2. rollout actors sample `rl.groupSize` completions per prompt (vLLM or transformers);
3. reward actors score every completion (the job's weighted rewards);
4. advantages (pure math from `algos`): grpo / dr_grpo / rloo per group, or gae
   over the PPO critic's values;
5. learner actors (FSDP2, one torch.distributed group) take `rl.ppoEpochs`
   optimizer steps on the batch; PPO's critic actors fit the returns;
6. the weight-sync layer (`sync`) pushes the new policy into every rollout engine;
7. one line of `metrics.jsonl`, the live `/metrics` and `/progress`, and every
   `checkpoint.everySteps` a checkpoint.

With `rl.async: true` the rollouts of step t+1 are generated (with the weights
of step t) while step t trains: rollouts are at most one step stale
(`staleness` in the metrics). The old logprobs of the ratio are always
recomputed by the learner on the batch it trains on.

Placement: `disaggregated` gives every role its own actors (and, on a cluster,
its own worker group); `colocated` puts rollout engine i in the same Ray
placement-group bundle as learner rank i (same node and devices; vLLM sleeps
while the learners train, where it can). PPO's critic rank i always shares
learner rank i's bundle. Actors in one bundle split its CPUs and GPU equally
(Ray's accounting) and each uses all of its threads, since they take turns.

Checkpoints (`<checkpoint dir>/checkpoint-<step>/`): `learner/` and `critic/`
(torch.distributed.checkpoint shards of model and optimizer), `driver.json`
(step, data position, RNG states), then the completion marker. A restarted
job resumes from the newest complete one: learners and critic reload, the
rollout engines get the learner's weights, and since every step's sampling
seed derives from `training.seed` and the step, the following steps replay
what an uninterrupted run does (with the transformers engine exactly; vLLM's
kernels are not bitwise reproducible).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.api import runtime
from posttrain.api.spec import AdapterType, Algorithm, PostTrainingJob, RoleSpec
from posttrain.jobs import data as data_mod
from posttrain.jobs import models, outputs, storage
from posttrain.jobs.checkpoints import DRIVER_STATE, Checkpoints, driver_state, restore_rng
from posttrain.jobs.progress import Metrics, ProgressServer, RunState

log = logging.getLogger("posttrain.rl")

RL_ADAPTERS = (AdapterType.none, AdapterType.lora, AdapterType.rslora)


@dataclass
class Role:
    """How many actors of a role and what each holds (also the summary's `roles` entry)."""

    name: str
    count: int
    cpus: float
    gpus: float
    threads: int | None

    def resources(self) -> dict[str, float]:
        out: dict[str, float] = {"CPU": self.cpus}
        if self.gpus:
            out["GPU"] = self.gpus
        return out


def preflight(job: PostTrainingJob) -> None:
    """RL settings this version cannot run, refused before anything is written."""
    spec = job.spec
    if spec.adapter.type not in RL_ADAPTERS:
        raise ValueError(f"spec.adapter.type: {spec.adapter.type.value} is not supported by grpo/ppo in this version; "
                         "use none (full fine-tuning), lora or rslora")


def total_steps(spec: Any, n_prompts: int) -> int:
    if spec.training.max_steps:
        return spec.training.max_steps
    per_step = spec.rl.prompts_per_step
    return max(1, math.ceil(spec.training.epochs * n_prompts / per_step))


def step_prompts(prompts: list[data_mod.Prompt], step: int, per_step: int, seed: int) -> list[data_mod.Prompt]:
    """The prompts of `step` (0-based): consecutive slices of one shuffled pass, a new order each pass."""
    import numpy as np

    out = []
    n = len(prompts)
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(position, n)
        order = np.random.default_rng([seed, 31, epoch]).permutation(n) if epoch else None
        out.append(prompts[int(order[index]) if order is not None else index])
    return out


def step_seed(seed: int, step: int, actor: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + actor) % (2**31)


def _role_actors(name: str, role: RoleSpec, *, local_cpus: int | None, per_gpu: bool) -> Role:
    count = role.replicas * (max(1, role.gpus) if per_gpu else 1)
    cpus = (role.cpus / max(1, role.gpus) if per_gpu else role.cpus) if role.cpus else 1.0
    gpus = (1.0 if per_gpu else float(role.gpus)) if role.gpus else 0.0
    if role.cpus:
        threads: int | None = max(1, int(cpus))
    elif local_cpus:  # embedded Ray: phases take turns, so each role may use the machine
        threads = max(1, local_cpus // count)
    else:
        threads = None
    return Role(name, count, cpus, gpus, threads)


class RLRun:
    """The actors and the loop of one grpo/ppo run."""

    def __init__(self, job: PostTrainingJob, *, tokenizer: Any, prompts: list[data_mod.Prompt],
                 ckpts: Checkpoints, base_dir: Path, local_cpus: int | None, total_steps: int) -> None:
        self.job, self.spec = job, job.spec
        self.total_steps = total_steps
        self.rl = self.spec.rl
        # Every actor loads spec.model on its own pod (models.model_on_this_pod).
        self.model, self.tokenizer, self.prompts = self.spec.model.wire(), tokenizer, prompts
        self.ckpts, self.base_dir = ckpts, base_dir
        self.is_ppo = self.spec.algorithm is Algorithm.ppo
        self.is_lora = self.spec.adapter.type is not AdapterType.none
        self.advantage = self.rl.advantage or ("gae" if self.is_ppo else "grpo")
        self.process = self.advantage == "grpo_process"
        roles = self.spec.roles
        self.roles = {
            "learner": _role_actors("learner", roles.learner or RoleSpec(), local_cpus=local_cpus, per_gpu=True),
            "rollout": _role_actors("rollout", roles.rollout or RoleSpec(), local_cpus=local_cpus, per_gpu=True),
            "reward": _role_actors("reward", roles.reward or RoleSpec(), local_cpus=local_cpus, per_gpu=False),
        }
        self.colocated = self.spec.placement == "colocated"
        # Actors that share one Ray placement-group bundle per learner rank (that rank's devices and CPUs,
        # one learner worker's worth): PPO's critic always; with `colocated`, a rollout engine too.
        # The phases take turns on the device, so each holds an equal share and uses every thread.
        self.bundle_members = ["learner"] + (["critic"] if self.is_ppo else []) + (["rollout"] if self.colocated else [])
        learner = self.roles["learner"]
        self.bundle = learner.resources()
        share = len(self.bundle_members)
        for name in self.bundle_members:
            self.roles[name] = Role(name, learner.count, learner.cpus / share, learner.gpus / share, learner.threads)
        self.engine_kind = (roles.rollout or RoleSpec()).engine or "auto"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---- actors ----------------------------------------------------------------------------------

    def _options(self, role: Role, index: int) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": role.cpus, "num_gpus": role.gpus}
        if len(self.bundle_members) > 1 and role.name in self.bundle_members:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index)
        elif os.environ.get(runtime.PLACEMENT_ENV) == runtime.PLACEMENT_ROLES:
            opts["resources"] = {runtime.ray_resource("learner" if role.name == "critic" else role.name): 1}
        return opts

    def start(self) -> dict[str, Any]:
        """Create every actor and wait until each has loaded its model; returns the summary's `roles`."""
        import ray

        from .actors import RewardWorker, RolloutWorker
        from .learner import LearnerWorker

        spec, rl = self.spec, self.rl
        learner, rollout, reward = self.roles["learner"], self.roles["rollout"], self.roles["reward"]
        if len(self.bundle_members) > 1:
            from ray.util.placement_group import placement_group

            bundle = dict(self.bundle)
            if os.environ.get(runtime.PLACEMENT_ENV) == runtime.PLACEMENT_ROLES:
                bundle[runtime.ray_resource("learner")] = 1
            self.pg = placement_group([dict(bundle) for _ in range(learner.count)], strategy="PACK")
            ray.get(self.pg.ready())
        self.learners = [ray.remote(LearnerWorker).options(**self._options(learner, i)).remote()
                         for i in range(learner.count)]
        self.rollouts = [ray.remote(RolloutWorker).options(**self._options(rollout, i)).remote()
                         for i in range(rollout.count)]
        self.scorers = [ray.remote(RewardWorker).options(**self._options(reward, i)).remote()
                        for i in range(reward.count)]
        addr = ray.get(self.learners[0].call.remote(_node_ip))
        port = ray.get(self.learners[0].call.remote(_free_port))
        t = spec.training
        base = str(self.base_dir)
        setups = [w.setup.remote(r, learner.count, addr, port, self.model, spec.adapter.wire(), rl.wire(),
                                 t.learning_rate, t.seed, dtype=spec.model.dtype, micro_batch_size=t.micro_batch_size,
                                 weight_decay=t.weight_decay, threads=learner.threads, lr_scheduler=t.lr_scheduler,
                                 warmup_ratio=t.warmup_ratio, total_steps=self.total_steps, base_dir=base)
                  for r, w in enumerate(self.learners)]
        engine_setups = [r.setup.remote(self.model, engine=self.engine_kind, seed=t.seed + i,
                                        threads=rollout.threads, colocated=self.colocated, base_dir=base)
                         for i, r in enumerate(self.rollouts)]
        labels = [s.setup.remote([r.wire() for r in spec.rewards], base_dir=str(self.base_dir)) for s in self.scorers]
        self.critics: list[Any] = []
        critic_info: list[dict[str, Any]] = []
        if self.is_ppo:
            from .critic import CriticWorker

            critic_role = self.roles["critic"]
            self.critics = [ray.remote(CriticWorker).options(**self._options(critic_role, i)).remote()
                            for i in range(learner.count)]
            cport = ray.get(self.critics[0].call.remote(_free_port))
            caddr = ray.get(self.critics[0].call.remote(_node_ip))
            critic_info = ray.get([c.setup.remote(r, learner.count, caddr, cport, self.model,
                                                  spec.adapter.wire(), rl.wire(),
                                                  rl.critic_learning_rate or t.learning_rate, t.seed,
                                                  dtype=spec.model.dtype, micro_batch_size=t.micro_batch_size,
                                                  threads=learner.threads, base_dir=base)
                                   for r, c in enumerate(self.critics)])
        learner_info = ray.get(setups)
        engines = ray.get(engine_setups)
        self.reward_labels = ray.get(labels)[0]
        from .sync import make_weight_sync

        on_gpu = learner.gpus > 0
        self.sync = make_weight_sync(rl.weight_sync, self.learners, self.rollouts, adapter_only=self.is_lora,
                                     on_gpu=on_gpu)
        self.sync.setup()
        pids = {name: sorted(set(ray.get([a.pid.remote() for a in actors])))
                for name, actors in (("learner", self.learners), ("rollout", self.rollouts),
                                     ("reward", self.scorers), ("critic", self.critics)) if actors}
        roles: dict[str, Any] = {
            "rollout": {"actors": rollout.count, "resources_per_actor": rollout.resources(),
                        "engine": engines[0]["engine"], "device": engines[0]["device"], "processes": pids["rollout"],
                        "placement": "colocated with learner" if self.colocated else "own actors"},
            "reward": {"actors": reward.count, "resources_per_actor": reward.resources(),
                       "rewards": self.reward_labels, "processes": pids["reward"]},
            "learner": {"actors": learner.count, "resources_per_actor": learner.resources(),
                        "strategy": learner_info[0]["sharding"], "backend": learner_info[0]["backend"],
                        "trainable_params": learner_info[0]["trainable_params"], "processes": pids["learner"]},
            "weight_sync": {"method": type(self.sync).__name__, "adapter_only": self.is_lora},
        }
        if self.is_ppo:
            roles["critic"] = {"actors": learner.count, "resources_per_actor": self.roles["critic"].resources(),
                               "strategy": critic_info[0].get("sharding", "fsdp2"), "processes": pids["critic"]}
        return roles

    def shutdown(self) -> None:
        import ray

        for actors in (getattr(self, "rollouts", []), getattr(self, "learners", []), getattr(self, "critics", [])):
            try:
                ray.get([a.shutdown.remote() if hasattr(a, "shutdown") else a.close.remote() for a in actors],
                        timeout=30)
            except Exception:  # noqa: BLE001 - best effort; the actors are killed next
                pass
        sync = getattr(self, "sync", None)
        if sync is not None:
            try:
                sync.close()
            except Exception:  # noqa: BLE001
                pass
        for actors in (getattr(self, "rollouts", []), getattr(self, "learners", []),
                       getattr(self, "scorers", []), getattr(self, "critics", [])):
            for a in actors:
                ray.kill(a)
        pg = getattr(self, "pg", None)
        if pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)

    # ---- one step --------------------------------------------------------------------------------

    def sampling(self):
        from .engines import Sampling

        rl = self.rl
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return Sampling(n=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                        top_p=rl.top_p, stop_token_ids=tuple(stops))

    def launch_generate(self, step: int) -> tuple[list[data_mod.Prompt], list[Any]]:
        """Send step `step`'s prompts to the rollout actors (split evenly); returns prompts and object refs."""
        prompts = step_prompts(self.prompts, step, self.rl.prompts_per_step, self.spec.training.seed)
        sampling = self.sampling()
        refs = []
        per = math.ceil(len(prompts) / len(self.rollouts))
        for i, actor in enumerate(self.rollouts):
            part = prompts[i * per:(i + 1) * per]
            if part:
                refs.append(actor.generate.remote([p.ids for p in part], sampling,
                                                  step_seed(self.spec.training.seed, step, i)))
        return prompts, refs

    def score(self, prompts: list[data_mod.Prompt], gens: list[Any]):
        """Flatten to B = P x G samples and score them on the reward actors; returns (RewardBatch, texts)."""
        import ray

        from posttrain.jobs.rewards.score import RewardBatch

        texts, completions, fields = [], [], {}
        keys = sorted({k for p in prompts for k in p.fields})
        for p, g in zip(prompts, gens):
            for text in g.texts:
                texts.append(p.text)
                completions.append(text)
                for k in keys:
                    fields.setdefault(k, []).append(p.fields.get(k))
        per = math.ceil(len(texts) / len(self.scorers))
        refs = [s.score.remote(texts[i * per:(i + 1) * per], completions[i * per:(i + 1) * per],
                               {k: v[i * per:(i + 1) * per] for k, v in fields.items()}, process=self.process)
                for i, s in enumerate(self.scorers) if texts[i * per:(i + 1) * per]]
        parts = ray.get(refs)
        merged = RewardBatch(rewards=[], per_function={}, means={}, skipped={}, unscored=0,
                             steps=[] if self.process else None)
        for part in parts:
            merged.rewards.extend(part.rewards)
            if merged.steps is not None:
                merged.steps.extend(part.steps or [])
            for label, values in part.per_function.items():
                merged.per_function.setdefault(label, []).extend(values)
                merged.skipped[label] = merged.skipped.get(label, 0) + part.skipped.get(label, 0)
            merged.unscored += part.unscored
        for label, values in merged.per_function.items():
            present = [x for v in values if v is not None for x in (v if isinstance(v, list) else [v])]
            merged.means[label] = sum(present) / len(present) if present else None
        return merged

    def batch(self, gens: list[Any]) -> tuple[dict[str, Any], int]:
        """Learner rows (prompt + completion, right-padded) and the number of generated tokens."""
        import torch

        rows, masks = [], []
        for g in gens:
            for toks in g.token_ids:
                rows.append(list(g.prompt_token_ids) + list(toks))
                masks.append([0] * len(g.prompt_token_ids) + [1] * len(toks))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        completion = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
            ids[i, :len(r)] = torch.tensor(r)
            attention[i, :len(r)] = 1
            completion[i, :len(m)] = torch.tensor(m)
        return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}, int(completion.sum())

    def advantages(self, rewards: list[float], batch: dict[str, Any], values: Any = None,
                   steps: list[list[float]] | None = None, gens: list[Any] | None = None):
        import torch

        from .algos import ADVANTAGE_ESTIMATORS

        estimator = ADVANTAGE_ESTIMATORS.get(self.advantage)
        r = torch.tensor(rewards, dtype=torch.float32)
        step_mask = None
        if self.process:
            r, step_mask = self.step_rewards(steps or [], gens or [], batch["completion_mask"])
        return estimator(r, batch["completion_mask"], group_size=self.rl.group_size, values=values,
                         gamma=self.rl.gamma, lam=self.rl.lam, scale_by_std=self.rl.scale_rewards,
                         step_mask=step_mask)

    def step_rewards(self, steps: list[list[float]], gens: list[Any], mask: Any):
        """Process rewards as (B, L) tensors: each step's score on the token that ends its line, and the step mask.

        A sample scored per step must have one score per non-blank line of its completion
        (`posttrain.jobs.rewards.builtin.reasoning_steps`); a sample with one (outcome) score gets it on its
        last token.
        """
        import torch

        rewards = torch.zeros(mask.shape, dtype=torch.float32)
        ends = torch.zeros(mask.shape, dtype=torch.bool)
        row = 0
        for g in gens:
            start = len(g.prompt_token_ids)
            for toks, text in zip(g.token_ids, g.texts):
                scores = steps[row]
                positions = line_end_tokens(toks, self.tokenizer) if len(scores) > 1 else []
                if len(scores) > 1 and len(positions) != len(scores):
                    raise ValueError(f"process rewards gave {len(scores)} step scores for a completion with "
                                     f"{len(positions)} non-blank lines; a process reward returns one score per "
                                     f"non-blank line (completion: {text[:80]!r})")
                for score, pos in zip(scores, positions or [max(0, len(toks) - 1)]):
                    rewards[row, start + pos] += score
                    ends[row, start + pos] = True
                row += 1
        return rewards, ends

    def train(self, batch: dict[str, Any], rewards: list[float], steps: list[list[float]] | None = None,
              gens: list[Any] | None = None) -> dict[str, float]:
        import ray

        metrics: dict[str, float] = {}
        if self.is_ppo:
            values = ray.get([c.compute_values.remote(batch) for c in self.critics])[0]
            advantages, returns = self.advantages(rewards, batch, values)
            critic_batch = dict(batch, returns=returns, old_values=values)
            critic_refs = [c.train_step.remote(critic_batch) for c in self.critics]
        else:
            advantages, _ = self.advantages(rewards, batch, steps=steps, gens=gens)
            critic_refs = []
        learner_metrics = ray.get([w.train_step.remote(dict(batch, advantages=advantages))
                                   for w in self.learners])[0]
        metrics.update(learner_metrics)
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


def line_end_tokens(token_ids: list[int], tokenizer: Any) -> list[int]:
    """For each non-blank line of the decoded completion, the index of the token that ends it.

    A line ends at the token holding its newline (the last line at the last token). Tokens are
    decoded one by one only to find newlines, which byte-level and SentencePiece tokenizers both
    keep whole in a single token.
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    newline_tokens = [i for i, t in enumerate(token_ids)
                      for _ in range(tokenizer.decode([t], skip_special_tokens=True).count("\n"))]
    out = []
    for k, line in enumerate(text.split("\n")):
        if line.strip():
            out.append(newline_tokens[k] if k < len(newline_tokens) else max(0, len(token_ids) - 1))
    return out


def _node_ip(_: Any) -> str:
    import ray

    return ray.util.get_node_ip_address()


def _free_port(_: Any) -> int:
    from .learner import free_port

    return free_port()


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def run_rl(job: PostTrainingJob, opts: Any) -> dict[str, Any]:
    """Run a grpo/ppo job to the end; returns the summary (also written to summary.json)."""
    from posttrain.api.rl import RLSpec
    from posttrain.jobs import driver
    from posttrain.jobs.rewards.score import RewardError, build_rewards

    from .actors import reward_function

    spec = job.spec
    rl = spec.rl or RLSpec()
    if spec.rl is None:
        job = job.model_copy(update={"spec": spec.model_copy(update={"rl": rl})})
        spec = job.spec
    started = time.time()
    preflight(job)
    folder = outputs.RunFolder(driver.output_location(job, opts))
    state_of_folder = folder.prepare(overwrite=opts.overwrite)
    ckpts = Checkpoints(driver.checkpoint_location(job, folder.loc, opts))

    # Bad input fails here, before the first write: model, tokenizer, prompts, reward functions. The
    # driver needs only the tokenizer; every actor materialises the model on its own pod.
    tok_spec = spec.model.model_copy(update={"source": spec.model.tokenizer}) if spec.model.tokenizer else spec.model
    tokenizer = models.load_tokenizer(models.materialize(tok_spec, base=opts.base_dir, weights=False),
                                      revision=models.hub_revision(tok_spec),
                                      trust_remote_code=spec.model.trust_remote_code)
    max_prompt = spec.training.max_seq_length - rl.max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"spec.training.maxSeqLength ({spec.training.max_seq_length}) must exceed "
                         f"spec.rl.maxNewTokens ({rl.max_new_tokens}): prompts need room")
    prompts, stats = data_mod.build_prompts(spec.data, tokenizer, seed=spec.training.seed,
                                            max_prompt_len=max_prompt, base=opts.base_dir)
    for i, r in enumerate(spec.rewards):
        if r.function is not None:  # import it now: a typo must not cost a cluster start
            try:
                build_rewards([reward_function(r, opts.base_dir)])
            except RewardError as exc:
                raise ValueError(f"spec.rewards[{i}].function: {exc}") from None
    steps = total_steps(spec, len(prompts))

    if state_of_folder == "finished":
        folder.clear()
    folder.pull()
    folder.work.mkdir(parents=True, exist_ok=True)
    run_file = folder.path(outputs.RUN_FILE)
    resume = ckpts.latest()
    resume_step = resume[1] if resume else 0
    run_info = outputs.read_json(run_file) if resume else {}
    run_info.update({"job": job.metadata.name, "spec": spec.wire()})
    outputs.write_json(run_file, run_info)
    outputs.restore_metrics(folder.path(outputs.METRICS_FILE), after_step=resume_step, log_history=[])
    folder.push()

    state = RunState(job=job.metadata.name, algorithm=spec.algorithm.value, step=resume_step, total_steps=steps)
    metrics = Metrics(state)
    server = ProgressServer(metrics, opts.metrics_port, opts.metrics_host) if opts.metrics_port is not None else None
    if server:
        log.info("serving /metrics and /progress on port %d", server.port)
    writer = outputs.MetricsWriter(folder.path(outputs.METRICS_FILE))
    summary: dict[str, Any] = {
        "status": "running", "job": job.metadata.name, "algorithm": spec.algorithm.value,
        "model": spec.model.source, "adapter": spec.adapter.type.value, "placement": spec.placement,
        "resumed_from_step": resume_step or None,
        "data": {"train_examples": stats.train_examples, "dropped": stats.dropped, "sets": stats.sets},
        "output": folder.loc.uri, "checkpoint_dir": ckpts.root.uri, "versions": driver.versions(),
    }

    def event(kind: str, /, **fields: Any) -> None:
        metrics.refresh(new_checkpoints=1 if kind == "checkpoint" else 0)
        if opts.on_event:
            opts.on_event(state, {"type": kind, **fields})

    if resume:
        log.info("resuming from %s (step %d)", resume[0], resume_step)
    event("resume" if resume else "start", step=resume_step)
    error: BaseException | None = None
    artifact: dict[str, Any] = {}
    started_ray = False
    run: RLRun | None = None
    try:
        started_ray = driver.ensure_ray(opts)
        local_cpus = os.cpu_count() if started_ray and not opts.ray_address else None
        run = RLRun(job, tokenizer=tokenizer, prompts=prompts, ckpts=ckpts, base_dir=opts.base_dir,
                    local_cpus=local_cpus, total_steps=steps)
        summary["roles"] = run.start()
        if resume:
            run.load(resume[0])
            run.sync.push(resume_step)  # the engines start from the checkpoint's policy
        state.phase = "training"
        event("begin", step=resume_step, max_steps=steps)
        _loop(run, state, writer, event, start=resume_step, steps=steps, folder=folder)
        writer.flush()
        if spec.checkpoint.every_steps and state.step % spec.checkpoint.every_steps and state.step > resume_step:
            _checkpoint(run, state, writer, event, folder)
        state.phase = "saving"
        artifact = _save_outputs(run, folder.loc, spec)
        event("saved", **artifact)
    except BaseException as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised
        error = _unwrap(exc)
    finally:
        writer.flush()
        if run is not None:
            run.shutdown()
        if started_ray:
            import ray

            ray.shutdown()
        if server:
            server.close()

    final = outputs.read_metrics(folder.path(outputs.METRICS_FILE))
    rewards = [m["reward_mean"] for m in final if m.get("reward_mean") is not None]
    head, tail = rewards[:3], rewards[-3:]
    newest = ckpts.latest()
    summary.update({
        "status": "failed" if error else "succeeded",
        "steps": state.step, "total_steps": steps,
        "wall_seconds": round(time.time() - started, 2),
        "first_reward": rewards[0] if rewards else None, "last_reward": rewards[-1] if rewards else None,
        "reward_first_steps_mean": sum(head) / len(head) if head else None,
        "reward_last_steps_mean": sum(tail) / len(tail) if tail else None,
        "first_loss": next((m["loss"] for m in final if m.get("loss") is not None), None),
        "last_loss": next((m["loss"] for m in reversed(final) if m.get("loss") is not None), None),
        "tokens_per_second": _mean([m.get("tokens_per_second") for m in final]),
        "seconds_per_step": _mean([m.get("time_step") for m in final[1:] or final]),  # step 1 warms up
        "sync_seconds_mean": _mean([m.get("time_sync") for m in final]),
        "last_checkpoint": newest[0].uri if newest else None,
        "artifact": artifact or None,
    })
    return driver.finish(summary, error, state, metrics, folder)


def _unwrap(exc: BaseException) -> BaseException:
    """The error an actor raised (a reward's RewardError, ...) rather than Ray's wrapper around it."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) else None
    return cause if isinstance(cause, BaseException) else exc


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


def _checkpoint(run: RLRun, state: RunState, writer: Any, event: Any, folder: outputs.RunFolder) -> None:
    writer.flush()  # metrics up to a checkpoint are stored before it counts
    folder.push(outputs.METRICS_FILE, outputs.RUN_FILE)
    saved = run.save(state.step, run.spec.checkpoint.keep)
    state.last_checkpoint = saved.uri
    state.checkpoints_saved += 1
    event("checkpoint", step=state.step, path=saved.uri)


def _loop(run: RLRun, state: RunState, writer: Any, event: Any, *, start: int, steps: int,
          folder: outputs.RunFolder) -> None:
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
        t1 = time.perf_counter()
        scored = run.score(prompts, gens)
        t_reward = time.perf_counter() - t1
        batch, generated = run.batch(gens)
        t2 = time.perf_counter()
        train_metrics = run.train(batch, scored.rewards, scored.steps, gens)
        t_train = time.perf_counter() - t2
        if pending is not None:  # the sync waits for the engines' running generation anyway
            ray.wait(pending[1], num_returns=len(pending[1]))
        t3 = time.perf_counter()
        sync = run.sync.push(step + 1)
        t_sync = time.perf_counter() - t3
        lengths = [len(t) for g in gens for t in g.token_ids]
        line: dict[str, Any] = {
            "reward_mean": sum(scored.rewards) / len(scored.rewards),
            "reward_std": _std(scored.rewards),
            **{f"reward_{label}": mean for label, mean in scored.means.items()},
            "loss": train_metrics.get("loss"), "kl": train_metrics.get("kl"),
            "entropy": train_metrics.get("entropy"), "clip_fraction": train_metrics.get("clip_fraction"),
            "grad_norm": train_metrics.get("grad_norm"), "learning_rate": train_metrics.get("lr"),
            "response_length_mean": sum(lengths) / len(lengths),
            "tokens_per_second": generated / t_gen if t_gen > 0 else None,
            "time_generate": t_gen, "time_reward": t_reward, "time_train": t_train, "time_sync": t_sync,
            "time_step": time.perf_counter() - t0,
            "sync_bytes": sync.bytes, "staleness": staleness,
        }
        skipped = sum(scored.skipped.values())
        if skipped or scored.unscored:
            line.update(reward_skipped=skipped, reward_unscored=scored.unscored)
        for key in ("value_loss", "value_clip_fraction", "value_mean"):
            if key in train_metrics:
                line[key] = train_metrics[key]
        line = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in line.items()}
        state.step = step + 1
        state.loss, state.reward = line["loss"], line["reward_mean"]
        state.grad_norm, state.learning_rate = line["grad_norm"], line["learning_rate"]
        state.tokens_per_second = line["tokens_per_second"]
        state.tokens_seen += generated
        state.rl = {k: v for k, v in line.items() if isinstance(v, (int, float)) and not k.startswith("reward_")}
        state.rl["reward_std"] = line["reward_std"]
        state.reward_functions = {label: m for label, m in scored.means.items() if m is not None}
        writer.add(step + 1, line)
        writer.flush()
        event("log", step=step + 1, **line)
        if every and (step + 1) % every == 0:
            _checkpoint(run, state, writer, event, folder)
    if pending is not None:
        ray.wait(pending[1], num_returns=len(pending[1]))


def _save_outputs(run: RLRun, out: storage.Location, spec: Any) -> dict[str, Any]:
    """The trained policy, written by learner rank 0 straight to the output (with the tokenizer's files):
    `adapter/` for LoRA, `model/` for full fine-tuning, both with `mergeAdapter`."""
    import ray

    with tempfile.TemporaryDirectory(prefix="posttrain-tokenizer-") as tmp:
        run.tokenizer.save_pretrained(tmp)
        tokenizer_files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

    def publish(dest: storage.Location, *, merge: bool) -> str:
        return ray.get([w.save_pretrained.remote(dest.address, merge=merge, extra_files=tokenizer_files)
                        for w in run.learners])[0]

    if run.is_lora:
        publish(out.child("adapter"), merge=False)
        if not spec.output.merge_adapter:
            return {"kind": "adapter", "path": out.child("adapter").uri}
        publish(out.child("model"), merge=True)
        return {"kind": "model", "path": out.child("model").uri, "adapter_path": out.child("adapter").uri}
    publish(out.child("model"), merge=False)
    return {"kind": "model", "path": out.child("model").uri}
