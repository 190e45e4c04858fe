"""What distinguishes one RL method from another, declared once: the loop reads this, never the name.

    method = METHODS.get("ppo")
    method.critic, method.default_advantage        # (True, "gae")

An advantage estimator declares what it needs from the loop itself (`needs_values`,
`step_rewards`; see `math.algos`), so `Method` plus the estimator fully decide a step's shape.
"""

from __future__ import annotations

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
