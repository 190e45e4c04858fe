"""Name -> entry tables: the one way the runtime picks an algorithm, an engine or a piece of RL math by name.

    ADVANTAGE_ESTIMATORS = Registry("advantage estimator")

    @ADVANTAGE_ESTIMATORS.register("grpo")
    def grpo_advantages(...): ...

    fn = ADVANTAGE_ESTIMATORS.get(config.advantage)   # ValueError lists the choices
    ALGORITHMS.add("sft", "posttrain.jobs.algorithms.sft:run")   # a lazily imported entry

Registering a name twice is an error, so one name always means one entry
(no silent override by a later import), and there is no side path around the
table (no `if name == "grpo"` in the loop). Entries given as "module:attribute"
strings are imported only when `load` asks for them, so a table can name code
that needs heavy imports (vLLM, torch) without importing it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """A name -> function table that rejects duplicate names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # what the entries are, for error messages: "advantage estimator"
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding `fn` under `name`; raises ValueError if the name is taken."""

        def add(fn: F) -> F:
            return self.add(name, fn)

        return add

    def add(self, name: str, entry: F) -> F:
        """Add `entry` (a callable, or a lazy "module:attribute" string) under `name`; ValueError if taken."""
        if name in self._entries:
            owner = self._entries[name]
            raise ValueError(f"{self.kind} {name!r} is already registered "
                             f"(by {getattr(owner, '__qualname__', owner)}); pick another name")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Take `name` out of the table (tests register toy entries and remove them again)."""
        self._entries.pop(name, None)

    def load(self, name: str) -> Any:
        """The entry registered as `name`, importing a "module:attribute" entry on first use."""
        entry = self.get(name)
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            return getattr(importlib.import_module(module), attr)
        return entry

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
