"""Where the actors of a grpo/ppo run go: how many of each role, what each holds, and Ray's options for them.

    placement = Placement(spec, method, local_cpus=os.cpu_count())
    placement.roles["learner"].count, placement.roles["rollout"].resources()
    placement.reserve()                                   # the placement group, when roles share bundles
    Learner = ray.remote(LearnerWorker).options(**placement.options("learner", rank))

`disaggregated` gives every role its own actors (and, on a cluster, its own worker group: each
actor asks for its role's custom resource `posttrain_<role>`). Learner rank i's placement-group
bundle (that rank's devices and CPUs) is shared by PPO's critic rank i always, and with
`colocated` by rollout engine i too: the phases take turns on the device, so each member holds an
equal share of the bundle and uses every thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from posttrain.api import runtime
from posttrain.api.spec import PostTrainingJobSpec, RoleSpec

from .methods import Method


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


def role_actors(name: str, role: RoleSpec, *, local_cpus: int | None, per_gpu: bool) -> Role:
    """The actors of one role: one per GPU of each replica (`per_gpu`), or one per replica."""
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


def on_cluster() -> bool:
    """In a RayJob built by the operator: each role's actors go to that role's worker group."""
    return os.environ.get(runtime.PLACEMENT_ENV) == runtime.PLACEMENT_ROLES


def actor_options(role: Role) -> dict[str, Any]:
    """Ray options of one actor of `role` outside a placement group (on a cluster it asks for that role's
    worker group)."""
    opts: dict[str, Any] = {"num_cpus": role.cpus, "num_gpus": role.gpus}
    if on_cluster():
        opts["resources"] = {runtime.ray_resource(role.name): 1}
    return opts


class Placement:
    """The roles of one run and the Ray options of each actor."""

    def __init__(self, spec: PostTrainingJobSpec, method: Method, *, local_cpus: int | None) -> None:
        roles = spec.roles
        self.roles = {
            "learner": role_actors("learner", roles.learner or RoleSpec(), local_cpus=local_cpus, per_gpu=True),
            "rollout": role_actors("rollout", roles.rollout or RoleSpec(), local_cpus=local_cpus, per_gpu=True),
        }
        if method.teacher:  # the samples' scorers: the teacher (one actor per GPU), or the rewards
            self.roles["teacher"] = role_actors("teacher", roles.teacher or RoleSpec(), local_cpus=local_cpus,
                                                per_gpu=True)
        else:
            self.roles["reward"] = role_actors("reward", roles.reward or RoleSpec(), local_cpus=local_cpus,
                                               per_gpu=False)
        self.colocated = spec.placement == "colocated"
        self.bundle_members = ["learner"] + (["critic"] if method.critic else []) + (["rollout"] if self.colocated else [])
        learner = self.roles["learner"]
        self.bundle = learner.resources()
        share = len(self.bundle_members)
        for name in self.bundle_members:
            self.roles[name] = Role(name, learner.count, learner.cpus / share, learner.gpus / share, learner.threads)
        self.pg: Any = None

    @property
    def shares_bundles(self) -> bool:
        return len(self.bundle_members) > 1

    def reserve(self) -> None:
        """Create (and wait for) one placement-group bundle per learner rank, when roles share them."""
        if not self.shares_bundles:
            return
        import ray
        from ray.util.placement_group import placement_group

        bundle = dict(self.bundle)
        if on_cluster():
            bundle[runtime.ray_resource("learner")] = 1
        self.pg = placement_group([dict(bundle) for _ in range(self.roles["learner"].count)], strategy="PACK")
        ray.get(self.pg.ready())

    def options(self, name: str, index: int) -> dict[str, Any]:
        """`ray.remote(...).options(**)` for actor `index` of role `name`."""
        role = self.roles[name]
        opts: dict[str, Any] = {"num_cpus": role.cpus, "num_gpus": role.gpus}
        if self.shares_bundles and name in self.bundle_members:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index)
        elif on_cluster():
            opts["resources"] = {runtime.ray_resource("learner" if name == "critic" else name): 1}
        return opts

    def release(self) -> None:
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
