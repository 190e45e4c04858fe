"""The base of every API object: camelCase on the wire, unknown fields rejected, floats finite."""

from __future__ import annotations

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
