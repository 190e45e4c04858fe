"""What every RL worker (rollout, reward, learner, critic) has: `call` and `pid`.

`call(fn, *args)` runs `fn(self, *args)` inside the actor: the weight-sync layer uses it to run its
sender and receiver code where the tensors live, without the workers knowing about the transport.
"""

from __future__ import annotations

import os
from typing import Any, Callable


class ActorBase:
    """`call(fn, *args, **kwargs)` -> `fn(self, *args, **kwargs)`, run in the actor's process."""

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    def pid(self) -> int:
        return os.getpid()
