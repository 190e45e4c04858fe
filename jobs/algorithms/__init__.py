"""The algorithm table: each `spec.algorithm` names one module whose `run(ctx) -> summary` does the work.

    from posttrain.jobs.algorithms import ALGORITHMS
    summary = ALGORITHMS.load("sft")(RunContext(job, opts))     # what the driver does, and all it does

A new post-training method is one module here with `run(ctx: RunContext) -> dict` (see
`posttrain.jobs.run.context` for what the context does for it) and one `ALGORITHMS.add` line below;
`posttrain.api.spec.AVAILABLE_ALGORITHMS` lists the same names (a test pins the two equal), so
`posttrain validate`, `posttrain run` and the operator accept and refuse the same ones. Entries are
"module:function" strings, imported only when that algorithm runs.
"""

from __future__ import annotations

from typing import Any

from posttrain.jobs.registry import Registry

ALGORITHMS: Registry[Any] = Registry("algorithm")
ALGORITHMS.add("sft", "posttrain.jobs.algorithms.sft:run")
ALGORITHMS.add("grpo", "posttrain.jobs.algorithms.rl:run")
ALGORITHMS.add("ppo", "posttrain.jobs.algorithms.rl:run")
# dpo, kto, orpo, simpo and reward run on the SFT path with their own TRL trainer (see `methods.METHODS`).
ALGORITHMS.add("dpo", "posttrain.jobs.algorithms.sft:run")
ALGORITHMS.add("kto", "posttrain.jobs.algorithms.sft:run")
ALGORITHMS.add("orpo", "posttrain.jobs.algorithms.sft:run")
ALGORITHMS.add("simpo", "posttrain.jobs.algorithms.sft:run")
ALGORITHMS.add("reward", "posttrain.jobs.algorithms.sft:run")
# distill (mode logits) too, with the teacher's cached scores in its rows (see `algorithms.distill`).
ALGORITHMS.add("distill", "posttrain.jobs.algorithms.distill:run")
ALGORITHMS.add("generate", "posttrain.jobs.algorithms.generate:run")
ALGORITHMS.add("evaluate", "posttrain.jobs.algorithms.evaluate:run")
