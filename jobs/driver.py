"""The driver: one program that runs a PostTrainingJob, locally or in a RayJob, through the algorithm table.

    posttrain run examples/sft-lora.yaml --output out/      # embedded Ray on this machine
    python -m posttrain.jobs --spec /etc/posttrain/job.json # inside the RayJob's head pod

It looks the job's algorithm up in `algorithms.ALGORITHMS` and hands that entry a `RunContext`,
which owns everything the algorithms share (output, checkpoints, progress, trackers, Ray, the
summary). Order of work inside every entry, so that bad input costs nothing: validate, check the
output, resolve the model and read the data; only then write, start Ray and train. Checkpoints
resume automatically.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from posttrain.api import refs
from posttrain.api.spec import PostTrainingJob
from posttrain.jobs.algorithms import ALGORITHMS
from posttrain.jobs.run.context import RunContext, RunFailed, RunOptions

__all__ = ["RunFailed", "RunOptions", "run", "setup_logging"]

log = logging.getLogger("posttrain")


def run(job: PostTrainingJob, opts: RunOptions) -> dict[str, Any]:
    """Run one job to the end; returns the summary (also written to summary.json). An algorithm that is not
    in the table is refused (ValueError naming the choices) before anything is written."""
    name = job.spec.algorithm.value
    for ref in refs.references(job.spec.wire()):
        # Resolved by `posttrain run` (jobs run together) or by the operator, never at this point.
        raise ValueError(f"{ref.path}: {ref.uri} is the output of job {ref.job}, which this run cannot see; run "
                         f"both together (posttrain run {ref.job}.yaml {job.metadata.name}.yaml) or on a cluster")
    try:
        entry = ALGORITHMS.load(name)
    except ValueError as exc:
        raise ValueError(f"spec.algorithm: {exc}") from None
    return entry(RunContext(job, opts))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "urllib3", "filelock", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
