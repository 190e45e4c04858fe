"""The base of every API object: camelCase on the wire, unknown fields rejected, floats finite."""

from __future__ import annotations

import string
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields rejected, floats finite."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
        # `.nan` / `.inf` in YAML would reach the trainer as a learning rate or a clip range.
        allow_inf_nan=False,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it appears in YAML / the Kubernetes API (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def check_template(template: str, *, required: set[str], allowed: set[str], field: str, hint: str) -> None:
    """A `str.format` template must name every `required` placeholder and none outside `allowed`;
    raises ValueError("@<field>: ...") otherwise (the loader turns that into the field's path)."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"@{field}: not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    missing = sorted(required - names)
    if missing:
        raise ValueError(f"@{field}: {hint} must contain " + " and ".join(f"{{{m}}}" for m in missing))
    unknown = sorted(names - allowed)
    if unknown:
        raise ValueError(f"@{field}: unknown placeholders {unknown}; only "
                         + ", ".join(f"{{{a}}}" for a in sorted(allowed))
                         + " are filled in (write literal braces as {{ and }})")


def check_trains_nothing(spec: Any, *, runs_on: str, adapter_hint: str) -> None:
    """The rules of a job that samples and trains nothing (generate, evaluate): no learner or trainer, no
    adapter to train, no learner to share devices with; raises ValueError("@<field>: ...")."""
    name = spec.algorithm.value
    if spec.roles.learner is not None:
        raise ValueError(f"@roles.learner: {name} trains nothing; it runs on {runs_on}")
    if spec.roles.trainer != type(spec.roles.trainer)():
        raise ValueError(f"@roles.trainer: {name} runs on {runs_on}")
    if spec.adapter.type.value != "none":
        raise ValueError(f"@adapter.type: {name} trains no adapter; {adapter_hint}")
    if spec.placement != "disaggregated":
        raise ValueError(f"@placement: {name} has no learner to share devices with; remove placement")
