"""Cross-field rules of `adapter.type: bottleneck` (Houlsby adapters, `posttrain.jobs.bottleneck`).

    check_bottleneck(spec)   # raises ValueError("@<field>: ...") for what a bottleneck adapter cannot do

A bottleneck adapter adds layers (a nonlinearity between two projections) that no weight matrix of the
base can absorb, so everything that needs the adapter merged into the weights is refused here, naming
the field that asks for it: `output.mergeAdapter`, a reward model (written whole), the RL algorithms
(their rollout engines serve merged weights) and a training job's `evaluation` (run on those engines).
"""

from __future__ import annotations

from typing import Any

NOT_MERGEABLE = ("a bottleneck adapter cannot be folded into the base weights (it adds a nonlinearity between "
                 "two new projections)")


def check_bottleneck(spec: Any) -> None:
    """Raise ValueError("@<field>: ...") when a job with a bottleneck adapter asks for something that needs the
    adapter merged; a job with another adapter type passes."""
    if spec.adapter.type.value != "bottleneck":
        return
    algorithm = spec.algorithm.value
    if spec.output.merge_adapter:
        raise ValueError(f"@output.mergeAdapter: {NOT_MERGEABLE}; remove mergeAdapter (the adapter is written to "
                         "adapter/ and loads onto its base with posttrain.jobs.bottleneck.load), or use a LoRA type")
    if algorithm == "reward":
        raise ValueError(f"@adapter.type: reward writes a whole scoring model and {NOT_MERGEABLE}; use none or a "
                         "LoRA type")
    if spec.algorithm.is_rl():
        raise ValueError(f"@adapter.type: {algorithm} samples with rollout engines (vLLM or transformers) that load "
                         f"merged weights, and {NOT_MERGEABLE}; use lora, rslora or none for {algorithm}")
    if spec.evaluation is not None and spec.algorithm.trains():
        raise ValueError(f"@evaluation: evaluates the trained model on rollout engines that load merged weights, and "
                         f"{NOT_MERGEABLE}; remove evaluation (data.eval still reports the eval loss) or use a "
                         "LoRA type")
