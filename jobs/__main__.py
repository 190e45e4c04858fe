"""`python -m posttrain.jobs --spec FILE`: what a RayJob's entrypoint runs.

The operator mounts the resolved spec (a ConfigMap) as a file and runs this on
the head pod; Ray is already up there (RAY_ADDRESS), so the driver joins it.
"""

from __future__ import annotations

import argparse
import sys

from posttrain.api import runtime
from posttrain.jobs.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.jobs")
    parser.add_argument("--spec", required=True, help="PostTrainingJob YAML or JSON file")
    parser.add_argument("--output", help="override spec.output.uri")
    parser.add_argument("--metrics-port", type=int, default=runtime.DRIVER_METRICS_PORT)
    args = parser.parse_args(argv)
    forwarded = ["run", args.spec, "--metrics-port", str(args.metrics_port)]
    if args.output:
        forwarded += ["--output", args.output]
    return cli_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
