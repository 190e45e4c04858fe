"""What every RL worker (rollout, reward, learner, critic) has: `call`, `pid`, and only its own GPUs.

`call(fn, *args)` runs `fn(self, *args)` inside the actor: the weight-sync layer uses it to run its
sender and receiver code where the tensors live, without the workers knowing about the transport.

Devices: Ray 2.60 no longer blanks `CUDA_VISIBLE_DEVICES` for an actor that asked for no GPU, so a
CPU rollout or reward actor on a GPU node saw every GPU (vLLM then started on the learner's GPU, or
failed on a CPU pod with "Failed to infer device type"). Each worker, when built, makes the variable
say exactly the GPUs Ray assigned it (none: blank), before anything imports CUDA; engines and models
then decide their device from `torch.cuda.is_available()`.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def only_assigned_gpus(assigned: list[Any], environ: Any = os.environ) -> str:
    """Set `CUDA_VISIBLE_DEVICES` to the GPUs Ray assigned this process (blank for none); returns it."""
    value = ",".join(str(g) for g in assigned)
    environ["CUDA_VISIBLE_DEVICES"] = value
    return value


class ActorBase:
    """`call(fn, *args, **kwargs)` -> `fn(self, *args, **kwargs)`, run in the actor's process."""

    def __init__(self) -> None:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:  # in an actor
            only_assigned_gpus(ray.get_gpu_ids())

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    def pid(self) -> int:
        return os.getpid()
