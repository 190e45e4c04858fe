"""`posttrain-operator`: the controller's command line.

    posttrain-operator crd    # print the PostTrainingJob CRD generated from posttrain.api
"""

from __future__ import annotations

import argparse
import sys

from posttrain.api.crd import crd_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain-operator", description="The posttrain Kubernetes operator.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("crd", help="print the PostTrainingJob CustomResourceDefinition (YAML)")
    args = parser.parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(crd_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
