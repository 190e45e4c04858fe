"""Name -> function tables for the RL math; the only way the loop picks one by name.

    ADVANTAGE_ESTIMATORS = Registry("advantage estimator")

    @ADVANTAGE_ESTIMATORS.register("grpo")
    def grpo_advantages(...): ...

    fn = ADVANTAGE_ESTIMATORS.get(config.advantage)   # ValueError lists the choices

Registering a name twice is an error, so one name always means one function
(no silent override by a later import), and there is no side path around the
table (no `if name == "grpo"` in the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """A name -> function table that rejects duplicate names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # what the entries are, for error messages: "advantage estimator"
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding `fn` under `name`; raises ValueError if the name is taken."""

        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered "
                                 f"(by {self._entries[name].__qualname__}); pick another name")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        """The function registered as `name`; ValueError naming the choices if there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self.names())})"
