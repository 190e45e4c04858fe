"""Environment of a job's containers: `spec.env` and `spec.envFrom`, credentials through Secrets.

The operator copies these into every Ray container of the job (head and workers), after its
own variables. A credential never appears in the spec as a plain value: names that look like
one (`HF_TOKEN`, `AWS_SECRET_ACCESS_KEY`, `..._PASSWORD`, `..._KEY`) must come from a Secret
through `valueFrom.secretKeyRef`, so the token is not stored in the PostTrainingJob, its spec
ConfigMap, Events or error messages.

    >>> EnvVar.model_validate({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}).wire()
    {'name': 'HF_TOKEN', 'valueFrom': {'secretKeyRef': {'name': 'hf', 'key': 'token'}}}
    >>> looks_like_credential("WANDB_API_KEY"), looks_like_credential("TOKENIZERS_PARALLELISM")
    (True, False)
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from posttrain.api.base import ApiModel

_CREDENTIAL = re.compile(r"(TOKEN$|SECRET|PASSWORD|PASSWD|_KEY$|^KEY$|CREDENTIAL)")
# Set by the operator (POSTTRAIN_*, HF_HOME) or by KubeRay's token auth (RAY_AUTH_*): a job that set
# RAY_AUTH_MODE=disabled would switch its Ray head's authentication off.
RESERVED_PREFIXES = ("POSTTRAIN_", "RAY_AUTH_")
RESERVED_NAMES = frozenset({"HF_HOME"})
_ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
_OBJECT_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


def looks_like_credential(name: str) -> bool:
    """True for names such as HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, OPENAI_API_KEY."""
    return bool(_CREDENTIAL.search(name.upper()))


class KeySelector(ApiModel):
    name: str = Field(min_length=1, max_length=253, pattern=_OBJECT_NAME,
                      description="Name of the Secret or ConfigMap in the job's namespace.")
    key: str = Field(min_length=1, max_length=253, description="The key within it.")
    optional: bool | None = Field(None, description="Start the pod even when the object or key is missing.")


class EnvVarSource(ApiModel):
    secret_key_ref: KeySelector | None = Field(None, description="A key of a Secret (for credentials).")
    config_map_key_ref: KeySelector | None = Field(None, description="A key of a ConfigMap.")

    @model_validator(mode="after")
    def _one(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("@secretKeyRef: give exactly one of secretKeyRef or configMapKeyRef")
        return self


class EnvVar(ApiModel):
    name: str = Field(min_length=1, max_length=256, pattern=_ENV_NAME, description="Variable name.")
    value: str | None = Field(None, description="A plain value; never a credential (use valueFrom.secretKeyRef).")
    value_from: EnvVarSource | None = Field(None, description="Read the value from a Secret or ConfigMap key.")

    @model_validator(mode="after")
    def _check(self) -> EnvVar:
        # Messages name the variable, never its value: they end up in status conditions and logs.
        if (self.value is None) == (self.value_from is None):
            raise ValueError(f"@value: give exactly one of value or valueFrom for {self.name}")
        if self.name.startswith(RESERVED_PREFIXES) or self.name in RESERVED_NAMES:
            raise ValueError(f"@name: {self.name} is set by posttrain or KubeRay in every job container "
                             f"(reserved: {', '.join(p + '*' for p in RESERVED_PREFIXES)}, "
                             f"{', '.join(sorted(RESERVED_NAMES))}); choose another name")
        if self.value is not None and looks_like_credential(self.name):
            raise ValueError(
                f"@value: {self.name} looks like a credential; a plain value would be stored in the "
                "PostTrainingJob and its spec ConfigMap, readable by anyone who can read them. Put it in a "
                f"Secret (kubectl create secret generic <name> --from-literal=<key>=...) and write "
                f"{{name: {self.name}, valueFrom: {{secretKeyRef: {{name: <secret>, key: <key>}}}}}}")
        return self


class ObjectRef(ApiModel):
    name: str = Field(min_length=1, max_length=253, pattern=_OBJECT_NAME,
                      description="Name of the Secret or ConfigMap in the job's namespace.")
    optional: bool | None = Field(None, description="Start the pod even when the object is missing.")


class EnvFromSource(ApiModel):
    prefix: str | None = Field(None, pattern=_ENV_NAME, description="Prepended to every key of the object.")
    secret_ref: ObjectRef | None = Field(None, description="Every key of a Secret becomes a variable.")
    config_map_ref: ObjectRef | None = Field(None, description="Every key of a ConfigMap becomes a variable.")

    @model_validator(mode="after")
    def _one(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("@secretRef: give exactly one of secretRef or configMapRef")
        return self
