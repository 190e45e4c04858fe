"""Loading rewards by name and combining several on one batch.

A reward is named `module:function` (`posttrain.jobs.rewards.builtin:exact_answer`,
`my_rewards:check`, or a file, `path/to/rewards.py:check`) and described by a
`RewardFunction` (name, weight, kwargs). `RewardFunction.build()` loads it
once: a function is bound to its kwargs with `functools.partial`; a class
(`posttrain.jobs.rewards.scorers:RewardModel`, `...:HttpVerifier`) is
constructed with its kwargs and the instance is the reward.

`combine(rewards, prompts, completions, fields=...)` calls each reward on the
batch, validates what it returns, and sums the weighted rewards per sample:

    total[i] = sum(weight_f * r_f[i] for each reward f where r_f[i] is not None)

(the TRL convention: no renormalisation by the weights of the rewards that
applied). A sample no reward applies to gets 0.0 and is counted in `unscored`.

With `on_error="raise"` (the default) a reward that raises, returns the wrong
number of values, or returns NaN/inf/a non-number stops the step with a
`RewardError` naming it. With `on_error="skip"` the affected samples get None
from that reward instead, and `RewardBatch.skipped` counts them per reward.

Tests: `.venv/bin/python -m pytest tests/test_rewards.py -q`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

log = logging.getLogger(__name__)

BUILTIN_MODULE = "posttrain.jobs.rewards.builtin"
RewardFn = Callable[..., Sequence[Any]]  # fn(prompts, completions, **fields) -> list[float | None]


class RewardError(RuntimeError):
    """A reward failed or cannot be loaded; the message starts with the reward's name."""

    def __init__(self, function: str, message: str):
        super().__init__(f"reward {function!r}: {message}")
        self.function, self.message = function, message

    def __reduce__(self):  # raised inside reward actors: Ray pickles it back to the driver
        return type(self), (self.function, self.message)


def _import_module(spec: str, module_name: str):
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise RewardError(spec, f"file {module_name!r} does not exist")
        mod_name = f"posttrain_user_reward_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
        sys.modules[mod_name] = module  # so dataclasses and pickling inside it work
        try:
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise RewardError(spec, f"running {module_name} raised {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise RewardError(spec, f"no module named {module_name!r}; is it installed or on PYTHONPATH?") from None
        raise RewardError(spec, f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise RewardError(spec, f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc


def load_reward(spec: str) -> Callable[..., Any]:
    """The callable named by `spec`, "module:attribute" (the attribute may be dotted).

    Raises `RewardError` naming `spec` when it is malformed, the module cannot be
    imported, the attribute is missing, or it is not callable.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        hint = ""
        if spec and ":" not in spec:
            hint = f" (a built-in is named {BUILTIN_MODULE}:{spec})"
        raise RewardError(spec, f"expected 'module:function', e.g. '{BUILTIN_MODULE}:exact_answer'{hint}")
    obj: Any = _import_module(spec, module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(obj).items() if callable(v) and not n.startswith("_"))
            listed = ", ".join(public[:12]) + (", ..." if len(public) > 12 else "")
            raise RewardError(spec, f"{module_name!r} has no attribute {attr!r}"
                                    + (f"; it has: {listed}" if listed else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(spec, f"{attr!r} in {module_name!r} is a {type(obj).__name__}, not a callable")
    return obj


@dataclass(frozen=True)
class Reward:
    """A loaded reward: a callable with the reward signature, its weight, and the label it is logged under."""

    label: str
    fn: RewardFn
    weight: float = 1.0


@dataclass(frozen=True)
class RewardFunction:
    """One reward in a job spec.

    name: "module:function" (or "module:Class" for a scorer class), see `load_reward`.
    weight: multiplies the reward in the sum; 0 computes and logs it without training on it.
    kwargs: keyword arguments bound to the function (or passed to the class constructor).
    label: the name it is logged under; defaults to the attribute ("exact_answer").
    """

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) or not math.isfinite(self.weight):
            raise RewardError(self.name, f"weight must be a finite number, got {self.weight!r}")

    @property
    def key(self) -> str:
        return self.label or self.name.rpartition(":")[2].rpartition(".")[2]

    def build(self) -> Reward:
        obj = load_reward(self.name)
        kwargs = dict(self.kwargs)
        if isinstance(obj, type):
            try:
                fn = obj(**kwargs)
            except Exception as exc:
                raise RewardError(self.name, f"constructing it with kwargs {kwargs} raised "
                                             f"{type(exc).__name__}: {exc}") from exc
            if not callable(fn):
                raise RewardError(self.name, "is a class whose instances are not callable")
            return Reward(self.key, fn, float(self.weight))
        if kwargs:
            self._check_kwargs(obj, kwargs)
            obj = functools.partial(obj, **kwargs)
        return Reward(self.key, obj, float(self.weight))

    def _check_kwargs(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        """Spec kwargs must be named parameters: a `**_` catch-all would swallow typos silently."""
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return
        named = [n for n, p in params.items()
                 if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in ("prompts", "completions")]
        unknown = sorted(set(kwargs) - set(named))
        if unknown:
            raise RewardError(self.name, f"kwargs {unknown} are not parameters of it; "
                                         f"its parameters are {named or 'none'}")


def build_rewards(specs: Sequence[RewardFunction]) -> list[Reward]:
    """Load every spec once; labels must be unique, since metrics are keyed by them."""
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.key in seen:
            raise RewardError(spec.name, f"label {spec.key!r} is already used by {seen[spec.key]!r}; "
                                         "give one of them a distinct label")
        seen[spec.key] = spec.name
    return [spec.build() for spec in specs]


@dataclass
class RewardBatch:
    """What `combine` returns for one batch of n samples.

    rewards: n floats, the weighted sum per sample.
    per_function: label -> n values (None where not applicable or skipped).
    means: label -> mean over its non-None values (None if it had none), for logging.
    skipped: label -> samples set to None because that reward failed (on_error="skip").
    unscored: samples no reward applied to (their total is 0.0).
    """

    rewards: list[float]
    per_function: dict[str, list[Any]]
    means: dict[str, float | None]
    skipped: dict[str, int]
    unscored: int
    steps: list[list[float]] | None = None  # process mode: each sample's weighted score per step


def _step_scores(v: Any) -> list[float] | None:
    """A process reward's value for one sample: a non-empty list of finite numbers, as floats (else None)."""
    if isinstance(v, (list, tuple)) and v and all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        return [float(x) for x in v]
    return None


def _validated(reward: Reward, result: Any, n: int, skip: bool,
               process: bool = False) -> tuple[list[Any], int]:
    """The reward's values as floats/None (process mode: also lists of step scores), and how many were skipped."""
    if hasattr(result, "tolist"):  # numpy arrays, torch tensors
        result = result.tolist()
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Sequence):
        problem = f"returned a {type(result).__name__}; a reward returns a list of floats or None"
    elif len(result) != n:
        problem = f"returned {len(result)} values for {n} samples"
    else:
        values: list[Any] = []
        bad: list[str] = []
        for i, v in enumerate(result):
            if v is None:
                values.append(None)
            elif isinstance(v, numbers.Real) and math.isfinite(v):
                values.append(float(v))
            elif process and _step_scores(v) is not None:
                values.append(_step_scores(v))
            else:
                bad.append(f"{v!r} at index {i}")
                values.append(None)
        if not bad:
            return values, 0
        problem = (f"returned {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; rewards must be finite numbers or None"
                   + ("" if process else " (lists of step scores are process rewards: rl.advantage grpo_process)"))
        if skip:
            log.warning("reward %r %s; skipping %d sample(s)", reward.label, problem, len(bad))
            return values, len(bad)
        raise RewardError(reward.label, problem)
    if skip:
        log.warning("reward %r %s; skipping the batch (%d samples)", reward.label, problem, n)
        return [None] * n, n
    raise RewardError(reward.label, problem)


def combine(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str], *,
            fields: Mapping[str, Sequence[Any]] | None = None,
            on_error: Literal["raise", "skip"] = "raise", process: bool = False) -> RewardBatch:
    """Score one batch with every reward and sum them with their weights (see the module docstring).

    fields: data set columns, each a sequence with one entry per sample, passed
    to every reward as keyword arguments.
    process: rewards may also return, per sample, a list with one score per
    reasoning step (process rewards, for grpo_process). `steps[i]` is then the
    weighted sum per step; a plain number (an outcome reward) adds to the last
    step; process rewards that disagree on a sample's step count are an error.
    `rewards[i]` is the sum of `steps[i]`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}; use 'raise' or 'skip'")
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{n} prompts but {len(completions)} completions")
    fields = dict(fields or {})
    for name, column in fields.items():
        if len(column) != n:
            raise ValueError(f"field {name!r} has {len(column)} values for {n} samples")
    labels = [r.label for r in rewards]
    if len(set(labels)) != len(labels):
        raise ValueError(f"reward labels must be unique, got {labels}")

    skip = on_error == "skip"
    per_function: dict[str, list[float | None]] = {}
    skipped: dict[str, int] = {}
    for reward in rewards:
        try:
            result = reward.fn(list(prompts), list(completions), **fields)
        except RewardError:
            if not skip:  # already names the reward (a judge's unreadable reply, a verifier that failed)
                raise
            log.warning("reward %r failed; skipping the batch (%d samples)", reward.label, n)
            per_function[reward.label], skipped[reward.label] = [None] * n, n
            continue
        except Exception as exc:
            if not skip:
                raise RewardError(reward.label, f"raised {type(exc).__name__}: {exc}") from exc
            log.warning("reward %r raised %s: %s; skipping the batch (%d samples)",
                        reward.label, type(exc).__name__, exc, n)
            per_function[reward.label], skipped[reward.label] = [None] * n, n
            continue
        per_function[reward.label], skipped[reward.label] = _validated(reward, result, n, skip, process)

    totals: list[float] = []
    step_totals: list[list[float]] = []
    unscored = 0
    for i in range(n):
        applied = [(r, per_function[r.label][i]) for r in rewards if per_function[r.label][i] is not None]
        unscored += not applied
        if not process:
            totals.append(float(sum(r.weight * v for r, v in applied)))
            continue
        lists = [(r, v) for r, v in applied if isinstance(v, list)]
        for r, v in lists[1:]:
            if len(v) != len(lists[0][1]):
                raise RewardError(r.label, f"returned {len(v)} step scores for sample {i}, but "
                                           f"{lists[0][0].label!r} returned {len(lists[0][1])}")
        steps = [0.0] * (len(lists[0][1]) if lists else 1)
        for r, v in applied:
            if isinstance(v, list):
                for j, x in enumerate(v):
                    steps[j] += r.weight * x
            else:
                steps[-1] += r.weight * v
        step_totals.append(steps)
        totals.append(float(sum(steps)))
    means: dict[str, float | None] = {}
    for label, values in per_function.items():
        present = [x for v in values if v is not None for x in (v if isinstance(v, list) else [v])]
        means[label] = sum(present) / len(present) if present else None
    return RewardBatch(rewards=totals, per_function=per_function, means=means, skipped=skipped, unscored=unscored,
                       steps=step_totals if process else None)
