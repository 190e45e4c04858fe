"""Live progress of a run: one in-memory state, served as Prometheus metrics and JSON.

The driver owns a `RunState`; Ray workers push events to a `ProgressTracker`
actor, the driver drains it and applies each event here. With
`--metrics-port N` the driver serves:

- `GET /metrics`: Prometheus text format, every name starting with `posttrain_`;
- `GET /progress`: `{"step", "totalSteps", "loss", "tokensPerSecond", "phase", ...}`,
  what the operator polls for `status.progress`;
- `GET /healthz`: 200 while the driver runs.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PHASES = ("initializing", "evaluating", "training", "saving", "succeeded", "failed")
FINAL_PHASES = ("succeeded", "failed")

# grpo/ppo values of a metrics.jsonl line that are served as gauges `posttrain_<name>`
# (reward_mean, loss, grad_norm, learning_rate and tokens_per_second have their own gauges above).
RL_GAUGES = {
    "reward_std": "Standard deviation of the latest step's rewards.",
    "kl": "KL estimate to the reference policy (latest step).",
    "entropy": "Mean token entropy of the policy on its rollouts (latest step).",
    "clip_fraction": "Fraction of tokens whose probability ratio was clipped (latest step).",
    "response_length_mean": "Mean completion length in tokens (latest step).",
    "value_loss": "PPO critic loss (latest step).",
    "sync_bytes": "Bytes sent by the latest weight sync.",
    "staleness": "Policy steps between the rollout weights and the learner (async: at most 1).",
    "teacher_kl": "distill on_policy: per-token KL(teacher || student) on the latest step's samples.",
}
RL_PHASE_TIMES = ("generate", "reward", "teacher", "train", "sync")  # teacher: distill on_policy's scoring
# dpo/kto/reward values of a metrics.jsonl line served as gauges `posttrain_<name>` and in /progress.
PREFERENCE_GAUGES = {
    "rewards_chosen": "Mean reward of the chosen completions (dpo/kto: implicit reward; reward: the model's score).",
    "rewards_rejected": "Mean reward of the rejected completions (latest step).",
    "rewards_margin": "Mean reward margin, chosen minus rejected (latest step).",
    "rewards_accuracy": "Fraction of pairs whose chosen completion out-scores the rejected one (latest step).",
    "eval_rewards_margin": "Mean reward margin on the evaluation pairs (latest evaluation).",
    "eval_rewards_accuracy": "Preference accuracy on the evaluation pairs (latest evaluation).",
}


@dataclass
class RunState:
    job: str
    algorithm: str
    phase: str = "initializing"
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    reward: float | None = None
    score: float | None = None  # evaluate: the latest (model, method)'s score
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    tokens_seen: int = 0
    last_checkpoint: str | None = None
    checkpoints_saved: int = 0
    started: float = field(default_factory=time.time)
    rl: dict[str, float] = field(default_factory=dict)  # grpo/ppo: the latest step's RL_GAUGES values
    reward_functions: dict[str, float] = field(default_factory=dict)  # label -> mean of the latest step
    preference: dict[str, float] = field(default_factory=dict)  # dpo/kto/reward: the latest PREFERENCE_GAUGES values
    eval_scores: dict[tuple[str, str], float] = field(default_factory=dict)  # evaluation: (model, method) -> score

    def progress(self) -> dict[str, Any]:
        """The JSON body of GET /progress (camelCase, like the status it feeds)."""
        return {
            "job": self.job,
            "phase": self.phase,
            "step": self.step,
            "totalSteps": self.total_steps,
            "loss": self.loss,
            "evalLoss": self.eval_loss,
            "reward": self.reward,
            **({"score": self.score} if self.score is not None else {}),
            "learningRate": self.learning_rate,
            "tokensPerSecond": self.tokens_per_second,
            "lastCheckpoint": self.last_checkpoint,
            "elapsedSeconds": round(time.time() - self.started, 3),
            **({"rl": dict(self.rl), "rewardFunctions": dict(self.reward_functions)} if self.rl else {}),
            **({"preference": {_camel(k): v for k, v in self.preference.items()}} if self.preference else {}),
            **({"evaluation": self.evaluation()} if self.eval_scores else {}),
        }

    def evaluation(self) -> dict[str, dict[str, float]]:
        """model -> method -> score of the evaluations done so far (an evaluate job's models, or a training
        job's `base` and `trained`: its before and after)."""
        out: dict[str, dict[str, float]] = {}
        for (model, method), score in dict(self.eval_scores).items():
            out.setdefault(model, {})[method] = score
        return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class Metrics:
    """Prometheus collectors for one run, in a registry of their own."""

    def __init__(self, state: RunState) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.state = state
        self.registry = CollectorRegistry()
        labels = ["job", "algorithm"]
        g = lambda name, doc: Gauge(name, doc, labels, registry=self.registry)  # noqa: E731
        self.step = g("posttrain_step", "Optimizer steps done.")
        self.total_steps = g("posttrain_total_steps", "Optimizer steps the run will do.")
        self.loss = g("posttrain_loss", "Latest training loss.")
        self.eval_loss = g("posttrain_eval_loss", "Latest evaluation loss.")
        self.reward = g("posttrain_reward_mean", "Latest mean reward (RL algorithms).")
        self.lr = g("posttrain_learning_rate", "Current learning rate.")
        self.grad_norm = g("posttrain_grad_norm", "Gradient norm of the latest step.")
        self.tps = g("posttrain_tokens_per_second", "Training tokens per second (all workers).")
        self.tokens = g("posttrain_tokens_seen", "Training tokens processed so far.")
        self.phase = Gauge("posttrain_phase", "1 for the run's current phase.", labels + ["phase"], registry=self.registry)
        self.checkpoints = Counter("posttrain_checkpoints", "Checkpoints saved.", labels, registry=self.registry)
        self.started = g("posttrain_start_time_seconds", "Unix time the run started.")
        self.updated = g("posttrain_last_update_time_seconds", "Unix time of the latest progress event.")
        self.rl = {name: g(f"posttrain_{name}", doc) for name, doc in RL_GAUGES.items()}
        self.phase_seconds = Gauge("posttrain_phase_seconds", "Seconds the latest step spent in each RL phase.",
                                   labels + ["phase"], registry=self.registry)
        self.preference = {name: g(f"posttrain_{name}", doc) for name, doc in PREFERENCE_GAUGES.items()}
        self.reward_fn = Gauge("posttrain_reward_function_mean", "Latest step's mean of each reward function.",
                               labels + ["function"], registry=self.registry)
        self.eval_score = Gauge("posttrain_eval_score", "Evaluation score of each model and method (at the largest N).",
                                labels + ["model", "method"], registry=self.registry)
        self._key = {"job": state.job, "algorithm": state.algorithm}
        self.started.labels(**self._key).set(state.started)
        self.refresh()

    def refresh(self, *, new_checkpoints: int = 0) -> None:
        s, k = self.state, self._key
        self.step.labels(**k).set(s.step)
        for gauge, value in (
            (self.total_steps, s.total_steps),
            (self.loss, s.loss),
            (self.eval_loss, s.eval_loss),
            (self.reward, s.reward),
            (self.lr, s.learning_rate),
            (self.grad_norm, s.grad_norm),
            (self.tps, s.tokens_per_second),
        ):
            if value is not None:
                gauge.labels(**k).set(value)
        self.tokens.labels(**k).set(s.tokens_seen)
        for name, gauge in self.rl.items():
            if name in s.rl:
                gauge.labels(**k).set(s.rl[name])
        for name, gauge in self.preference.items():
            if name in s.preference:
                gauge.labels(**k).set(s.preference[name])
        for phase in RL_PHASE_TIMES:
            if f"time_{phase}" in s.rl:
                self.phase_seconds.labels(**k, phase=phase).set(s.rl[f"time_{phase}"])
        for label, value in s.reward_functions.items():
            self.reward_fn.labels(**k, function=label).set(value)
        for (model, method), value in s.eval_scores.items():
            self.eval_score.labels(**k, model=model, method=method).set(value)
        for phase in PHASES:
            self.phase.labels(**k, phase=phase).set(1.0 if phase == s.phase else 0.0)
        if new_checkpoints:
            self.checkpoints.labels(**k).inc(new_checkpoints)
        self.updated.labels(**k).set(time.time())

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class ProgressServer:
    """/metrics, /progress and /healthz on a background thread.

    `close(linger=...)` at the end of a run waits, when a poller (the operator) has read /progress within the
    last `linger` seconds, until it has read the final answer (phase succeeded or failed, the evaluation's
    before and after) or `linger` seconds have passed: the driver's exit would otherwise take the run's
    last figures with it, and the PostTrainingJob's status would keep the ones of a poll before.
    """

    def __init__(self, metrics: Metrics, port: int, host: str = "0.0.0.0") -> None:
        self.metrics = metrics
        lock = threading.Lock()
        self.lock = lock
        self.last_read: float | None = None  # monotonic time of the latest /progress answer
        self.final_read = threading.Event()  # a /progress answer carried a final phase
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                with lock:
                    if path == "/metrics":
                        body, ctype = metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"
                    elif path == "/progress":
                        body, ctype = json.dumps(metrics.state.progress()).encode(), "application/json"
                        server.last_read = time.monotonic()
                        if metrics.state.phase in FINAL_PHASES:
                            server.final_read.set()
                    elif path == "/healthz":
                        body, ctype = b"ok\n", "text/plain"
                    else:
                        self.send_error(404, "try /metrics, /progress or /healthz")
                        return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return  # scrapes every few seconds would drown the job's log

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="posttrain-metrics", daemon=True)
        self.thread.start()

    def close(self, *, linger: float = 0.0) -> bool:
        """Stop serving; with `linger`, first wait (see the class) for a poller to read the final answer.
        True when it did (or nobody was polling)."""
        polled = self.last_read is not None and time.monotonic() - self.last_read <= linger
        read = self.final_read.wait(linger) if polled else True
        self.httpd.shutdown()
        self.httpd.server_close()
        return read


def tracker_actor():
    """The Ray actor class workers push events to (created lazily: importing ray is heavy)."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressTracker:
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def push(self, event: dict[str, Any]) -> None:
            self.events.append(event)

        def extend(self, events: list[dict[str, Any]]) -> None:  # a batch, in order: one call, not one per event
            self.events.extend(events)

        def drain(self) -> list[dict[str, Any]]:
            events, self.events = self.events, []
            return events

    return ProgressTracker

