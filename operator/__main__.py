"""`posttrain-operator`: the controller's command line.

    posttrain-operator run [--namespaces a,b] [--runtime-image IMG] [--metrics-port 8080] [--leader-election]
    posttrain-operator render job.yaml [--runtime-image IMG] [--run N]   # the children it would create, as YAML
    posttrain-operator crd                                              # the PostTrainingJob CRD
    posttrain-operator remove-finalizers [--namespace NS] [--dry-run]    # clean up after earlier versions

Every `run` flag also reads an environment variable (the Helm chart sets those):
POSTTRAIN_WATCH_NAMESPACES, POSTTRAIN_RUNTIME_IMAGE, POSTTRAIN_METRICS_PORT,
POSTTRAIN_LEADER_ELECTION, POSTTRAIN_LEADER_ELECTION_NAMESPACE, POSTTRAIN_POD_NAME,
POSTTRAIN_LEASE_SECONDS, POSTTRAIN_LOG_LEVEL, POSTTRAIN_PROGRESS_INTERVAL,
POSTTRAIN_JOB_NETWORK_POLICY (JSON, the chart's `jobNetworkPolicy`), POSTTRAIN_JOB_TMP_SIZE_LIMIT.

`remove-finalizers` takes the `posttrain.dev/finalizer` that earlier operator versions put on
every PostTrainingJob off all of them (this version adds none and removes it as it goes). Run it
when the operator is gone and a namespace or the CRD hangs in deletion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from posttrain.api.crd import crd_yaml

DEFAULT_RUNTIME_IMAGE = "ghcr.io/posttrain/runtime:0.1.0"


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def cmd_render(args: argparse.Namespace) -> int:
    from posttrain.api.load import InvalidJob, load_job
    from posttrain.operator import builders

    try:
        job = load_job(args.file, args.set, require_available=False)
    except InvalidJob as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    if job.metadata.namespace is None:
        job.metadata.namespace = args.namespace
    settings = build_settings(args)
    children = builders.build_children(job, run=args.run, owner_uid=args.owner_uid, settings=settings)
    sys.stdout.write(yaml.dump_all(children, Dumper=_ReadableDumper, sort_keys=False, width=120))
    return 0


class _ReadableDumper(yaml.SafeDumper):
    """YAML for people: multi-line strings as blocks, no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_ReadableDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


async def _operate(config: Any, args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    import kopf
    from kubernetes import client, config as kconfig

    from posttrain.operator import handlers, kube, leader, metrics as metrics_mod

    # API calls run in threads (the kubernetes client is synchronous): give them enough threads
    # that a burst of jobs is not queued behind asyncio's default of cpu_count + 4.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=args.api_workers))
    try:
        kconfig.load_incluster_config()
    except kconfig.ConfigException:
        kconfig.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = args.api_workers  # one pooled connection per API thread
    api_client = client.ApiClient(cfg)
    metrics = metrics_mod.OperatorMetrics()
    controller = handlers.Controller(config, kube_api=kube.Kube(api_client), metrics=metrics)
    registry = kopf.OperatorRegistry()
    # A registry of our own carries none of kopf's default login handlers: log in like the client
    # above (in-cluster service account, else KUBECONFIG).
    kopf.on.login(registry=registry)(kopf.login_via_client)
    handlers.register(registry, controller)
    ready = threading.Event()  # kopf sets it once it watches
    standby = threading.Event()  # a healthy replica waiting for the Lease is ready too (rollouts, PDBs)
    runner = await metrics_mod.serve(metrics, config.metrics_port, ready=lambda: ready.is_set() or standby.is_set())
    stop_flag: asyncio.Event = asyncio.Event()
    if stop is not None:
        asyncio.get_running_loop().run_in_executor(None, lambda: (stop.wait(), stop_flag.set()))
    lost = asyncio.Event()
    hold_task = None
    if args.leader_election:
        identity = os.environ.get("POSTTRAIN_POD_NAME") or socket.gethostname()
        namespace = os.environ.get("POSTTRAIN_LEADER_ELECTION_NAMESPACE", "default")
        lock = leader.LeaseLock(client.CoordinationV1Api(api_client), namespace=namespace, identity=identity,
                                lease_seconds=args.lease_seconds)
        acquired = asyncio.Event()
        standby.set()
        hold_task = asyncio.create_task(leader.hold(lock, acquired=acquired, lost=lost,
                                                    renew_seconds=max(1.0, args.lease_seconds / 3)))
        await asyncio.wait([asyncio.create_task(acquired.wait()), asyncio.create_task(stop_flag.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if stop_flag.is_set():
            hold_task.cancel()
            await runner.cleanup()
            return 0
        standby.clear()  # from here on, ready means kopf is watching
    metrics.leader.set(1)
    lost_watch = asyncio.create_task(_relay(lost, stop_flag))
    try:
        await kopf.operator(registry=registry, standalone=True, clusterwide=not config.namespaces,
                            namespaces=config.namespaces, stop_flag=stop_flag, ready_flag=ready)
    finally:
        metrics.leader.set(0)
        lost_watch.cancel()
        if hold_task:
            hold_task.cancel()
            if not lost.is_set():
                await asyncio.to_thread(lock.release)
        await runner.cleanup()
    return 1 if lost.is_set() else 0


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


def build_settings(args: argparse.Namespace) -> Any:
    from posttrain.operator import builders
    from posttrain.operator.network import NetworkPolicySettings

    text = (args.job_network_policy or "").strip()
    try:
        policy = NetworkPolicySettings.from_json(json.loads(text)) if text else NetworkPolicySettings()
    except (ValueError, TypeError, AttributeError) as exc:
        raise SystemExit(f"--job-network-policy / POSTTRAIN_JOB_NETWORK_POLICY: not a JSON object ({exc})") from None
    return builders.BuildSettings(image=args.runtime_image, tmp_size_limit=args.job_tmp_size_limit,
                                  network_policy=policy)


async def _remove_finalizers(args: argparse.Namespace) -> int:
    from kubernetes import config as kconfig

    from posttrain.operator import kube, vocab

    try:
        kconfig.load_incluster_config()
    except kconfig.ConfigException:
        kconfig.load_kube_config()
    api = kube.Kube()
    cleaned = 0
    for body in await api.list_jobs(args.namespace):
        meta = body["metadata"]
        legacy = [f for f in meta.get("finalizers") or [] if f in vocab.LEGACY_FINALIZERS]
        if not legacy:
            continue
        print(f"{meta['namespace']}/{meta['name']}: {'would remove' if args.dry_run else 'removing'} {', '.join(legacy)}")
        if not args.dry_run:
            await api.remove_finalizers(body, vocab.LEGACY_FINALIZERS)
        cleaned += 1
    print(f"{cleaned} PostTrainingJob(s) {'to clean' if args.dry_run else 'cleaned'}")
    return 0


def config_from_args(args: argparse.Namespace) -> Any:
    from posttrain.operator import handlers

    namespaces = [n.strip() for n in (args.namespaces or "").split(",") if n.strip()]
    return handlers.OperatorConfig(
        build=build_settings(args),
        namespaces=namespaces,
        metrics_port=args.metrics_port,
        progress_interval=args.progress_interval,
    )


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_operate(config_from_args(args), args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain-operator", description="The posttrain Kubernetes operator.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("crd", help="print the PostTrainingJob CustomResourceDefinition (YAML)")
    r = sub.add_parser("run", help="run the controller")
    r.add_argument("--namespaces", default=os.environ.get("POSTTRAIN_WATCH_NAMESPACES", ""),
                   help="comma-separated namespaces to watch (default: all)")
    r.add_argument("--runtime-image", default=os.environ.get("POSTTRAIN_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE))
    r.add_argument("--metrics-port", type=int, default=int(os.environ.get("POSTTRAIN_METRICS_PORT", "8080")))
    r.add_argument("--progress-interval", type=float,
                   default=float(os.environ.get("POSTTRAIN_PROGRESS_INTERVAL", "10")))
    r.add_argument("--leader-election", action="store_true", default=_env_bool("POSTTRAIN_LEADER_ELECTION"))
    r.add_argument("--lease-seconds", type=int, default=int(os.environ.get("POSTTRAIN_LEASE_SECONDS", "15")),
                   help="leader Lease duration; the leader renews it every third of that")
    r.add_argument("--api-workers", type=int, default=int(os.environ.get("POSTTRAIN_API_WORKERS", "32")),
                   help="threads for Kubernetes API calls")
    r.add_argument("--log-level", default=os.environ.get("POSTTRAIN_LOG_LEVEL", "info"))
    _job_pod_flags(r)
    d = sub.add_parser("render", help="print the children the operator would create for a job file")
    d.add_argument("file")
    d.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    d.add_argument("--namespace", default="default")
    d.add_argument("--runtime-image", default=os.environ.get("POSTTRAIN_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE))
    d.add_argument("--run", type=int, default=0, help="restart index of the RayJob to render")
    d.add_argument("--owner-uid", default="00000000-0000-0000-0000-000000000000",
                   help="uid for the ownerReferences (the API server assigns the real one)")
    _job_pod_flags(d)
    f = sub.add_parser("remove-finalizers", help="take the finalizer older versions added off every PostTrainingJob")
    f.add_argument("--namespace", "-n", default=None, help="one namespace (default: all)")
    f.add_argument("--dry-run", action="store_true", help="list what would change, change nothing")
    return parser


def _job_pod_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job-network-policy", default=os.environ.get("POSTTRAIN_JOB_NETWORK_POLICY", ""),
                   help='JSON like the chart\'s jobNetworkPolicy value; {"enabled": false} creates none')
    p.add_argument("--job-tmp-size-limit", default=os.environ.get("POSTTRAIN_JOB_TMP_SIZE_LIMIT", "64Gi"),
                   help="sizeLimit of the /tmp emptyDir of every job pod (Ray logs, spill, model cache)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(crd_yaml())
        return 0
    if args.command == "render":
        return cmd_render(args)
    if args.command == "remove-finalizers":
        logging.basicConfig(level=logging.WARNING)
        return asyncio.run(_remove_finalizers(args))
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
