"""What distinguishes one RL method from another, declared once: the loop reads this, never the name.

    method = METHODS.get("ppo")
    method.critic, method.default_advantage        # (True, "gae")
    METHODS.get("distill").teacher                 # True: teacher actors score the samples, no rewards

An advantage estimator declares what it needs from the loop itself (`needs_values`,
`step_rewards`; see `math.algos`), so `Method` plus the estimator fully decide a step's shape.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from posttrain.api.spec import AdapterType
from posttrain.jobs.registry import Registry

from .math.algos import ADVANTAGE_ESTIMATORS


@dataclass(frozen=True)
class Method:
    name: str
    critic: bool  # a value model trains beside the policy (its values feed the estimator)
    default_advantage: str
    adapters: tuple[AdapterType, ...] = (AdapterType.none, AdapterType.lora, AdapterType.rslora)
    # True: teacher actors (roles.teacher) score the samples' tokens instead of reward actors, and the learner
    # minimises spec.distill.loss to them instead of a policy-gradient loss (no advantages)
    teacher: bool = False
    learner: str = "posttrain.jobs.rl.workers.learner:LearnerWorker"  # the learner actor's class, imported lazily

    def learner_class(self) -> type:
        module, _, name = self.learner.partition(":")
        return getattr(importlib.import_module(module), name)

    def advantage(self, requested: str | None) -> str:
        """The estimator a run uses: the spec's `rl.advantage`, else this method's default."""
        name = requested or self.default_advantage
        ADVANTAGE_ESTIMATORS.get(name)  # ValueError naming the choices
        return name

    def step_rewards(self, advantage: str) -> bool:
        """Whether rewards are scored per reasoning step for this estimator."""
        return bool(getattr(ADVANTAGE_ESTIMATORS.get(advantage), "step_rewards", False))


METHODS: Registry[Method] = Registry("RL method")
METHODS.add("grpo", Method("grpo", critic=False, default_advantage="grpo"))
METHODS.add("ppo", Method("ppo", critic=True, default_advantage="gae"))
# distill mode on_policy (GKD): the student samples, the teacher scores its tokens (`distill.on_policy`)
METHODS.add("distill", Method("distill", critic=False, default_advantage="grpo", teacher=True,
                              learner="posttrain.jobs.distill.on_policy:DistillLearnerWorker"))
