"""The controller: one level-based pass per job, `Controller.reconcile(namespace, name)`.

A pass, under a per-job lock: read the job and its children -> decide which spec to run (the
one it started with, see `reconcile.effective_spec`) -> `reconcile.plan` (pure) -> create what is
missing (NetworkPolicy, spec ConfigMap, RayJob), suspend or stop runs -> write the status if it
changed -> emit Events for transitions. Everything that goes wrong reaches the status: an invalid
spec or a refused child is a terminal `Failed` with a reason; an API error, a missing claim or a
namesake's leftover ConfigMap is a `Blocked` condition and a retry with exponential backoff.

A job that names other jobs (`ptj://`) and has not started waits for them without a timer: the pass of
any job ends by running the passes of the jobs waiting for it when its phase changed (`depends`).

The driver's /progress is polled on a timer only (`poll_once`); a pass uses the last answer kept
in memory, so a status write, which triggers a pass of its own, never triggers a poll.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from posttrain.api import refs
from posttrain.api.cluster import cluster_errors, pvc_claims
from posttrain.api.load import InvalidJob, known_fields, parse_job
from posttrain.api.spec import PostTrainingJob
from posttrain.api.status import Phase
from posttrain.operator import builders, depends, kube, observe, reconcile, vocab
from posttrain.operator.adopt import Held, classify, configmap_verdict
from posttrain.operator.metrics import OperatorMetrics
from posttrain.operator.network import build_networkpolicy

log = logging.getLogger("posttrain.operator")
TERMINAL = (Phase.succeeded.value, Phase.failed.value)


@dataclass
class OperatorConfig:
    build: builders.BuildSettings
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    metrics_port: int = 8080
    driver_port: int = vocab.DRIVER_METRICS_PORT
    progress_interval: float = 10.0  # seconds between polls of running jobs (and timed checks)
    progress_timeout: float = 3.0
    retry_base: float = 5.0  # first backoff after a transient error; doubles up to retry_max
    retry_max: float = 300.0
    # How long after its creation a job may name (ptj://) a job that does not exist yet before it fails:
    # `kubectl apply -f` of a file creates its jobs one by one, in the file's order.
    dependency_grace: float = 60.0


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _job_document(body: dict[str, Any], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"), "labels": meta.get("labels") or {}},
        "spec": spec if spec is not None else body.get("spec"),
    }


def _status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """An RFC 7386 merge patch from `old` to `new`: keys that disappear, at any depth, are set to null
    (a nested dict such as `progress` would otherwise keep a field the new status dropped)."""
    old = old or {}
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        both = isinstance(value, dict) and isinstance(old.get(key), dict)
        patch[key] = _status_patch(old[key], value) if both else value
    return patch


def _same_but_status(read: dict[str, Any], written: dict[str, Any]) -> bool:
    """Whether `written` (a status write's answer) is `read` but for its status and resourceVersion."""
    def rest(body: dict[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in body.get("metadata", {}).items() if k not in ("resourceVersion", "managedFields")}
        return {**{k: v for k, v in body.items() if k != "status"}, "metadata": meta}

    return rest(read) == rest(written)


def _errors(exc: InvalidJob) -> str:
    return "; ".join(str(e) for e in exc.errors)


@dataclass
class _Decision:
    job: PostTrainingJob | None
    plan: reconcile.Plan
    configmap: dict[str, Any] | None = None  # the adopted spec ConfigMap, when there is one
    rayjobs: list[dict[str, Any]] = field(default_factory=list)
    waiting: bool = False  # for a job its spec names (ptj://): woken by that job's changes, not polled


class Controller:
    def __init__(self, config: OperatorConfig, *, kube_api: kube.Kube, metrics: OperatorMetrics) -> None:
        self.config = config
        self.kube = kube_api
        self.metrics = metrics
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._active: dict[tuple[str, str], tuple[str, str | None]] = {}  # job -> (current run, progress URL)
        self._progress: dict[tuple[str, str], tuple[str, dict[str, Any] | None]] = {}  # job -> (run, answer)
        self._retries: dict[tuple[str, str], tuple[int, asyncio.TimerHandle]] = {}
        self._protected: set[tuple[str, str]] = set()  # jobs whose NetworkPolicy this process ensured
        self.dependencies = depends.Index()  # waiting job -> the jobs it names (ptj://), and the reverse
        self._phases: dict[tuple[str, str], str | None] = {}  # job -> phase last written (or kept)
        self._told: dict[tuple[str, str], str | None] = {}  # job -> phase its waiting dependents last saw
        self._grace: dict[tuple[str, str], asyncio.TimerHandle] = {}  # wake-up at a missing dependency's grace end
        # (kind, namespace, job) -> (object, resourceVersion) of this process's last write that no pass needs to
        # see again: the job as its status write left it, the RayJob as created (see `own_change`).
        self._own: dict[tuple[str, str, str], tuple[str, str]] = {}

    # --- entry points ------------------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        started = time.perf_counter()
        result = "success"
        try:
            async with lock:
                result = await self._reconcile(namespace, name)
        except Exception:
            result = "error"
            log.exception("reconcile of %s/%s failed", namespace, name)
        finally:
            self.metrics.reconciles.labels(result=result).inc()
            self.metrics.duration.observe(time.perf_counter() - started)
        await self._wake_dependents(namespace, name)

    def own_change(self, kind: str, namespace: str, job: str, name: str, resource_version: str | None) -> bool:
        """Whether a watch event (`kind` "job" or "rayjob", of `job`) shows exactly what a pass of this process
        wrote and already acted on: its status write, when nothing else had changed the job, or its RayJob's
        creation. Such an event needs no pass; under a burst these were two of every three passes."""
        key = (kind, namespace, job)
        if resource_version is None or self._own.get(key) != (name, resource_version):
            return False
        del self._own[key]
        return True

    async def deleted(self, namespace: str, name: str) -> None:
        """The job is gone (its children go through garbage collection); jobs waiting for it learn so."""
        self.forget(namespace, name)
        await self._wake_dependents(namespace, name)

    async def _wake_dependents(self, namespace: str, name: str) -> None:
        """Run a pass of the jobs that wait for this one when its phase changed (or it went away) since they
        last heard: this is how a waiting job learns that its dependency succeeded, failed or appeared."""
        key = (namespace, name)
        phase = self._phases.get(key)
        if key in self._told and self._told[key] == phase:
            return
        self._told[key] = phase
        if phase is None and key not in self._locks:
            self._told.pop(key, None)  # gone: the next job of this name starts afresh
        await asyncio.gather(*(self.reconcile(namespace, job) for job in self.dependencies.dependents(namespace, name)))

    async def poll_once(self) -> None:
        """Read every running job's /progress, then run one pass over every active job (the pass
        also checks the clocks: progress deadline, pods that cannot start)."""
        # A job waiting out a backoff is left to its retry timer.
        jobs = [(key, run) for key, run in self._active.items() if key not in self._retries]

        async def fetch(key: tuple[str, str], run: str, url: str | None) -> None:
            raw = await kube.fetch_progress(url, self.config.progress_timeout) if url else None
            self._progress[key] = (run, observe.sanitize_progress(raw))

        await asyncio.gather(*(fetch(key, run, url) for key, (run, url) in jobs))
        await asyncio.gather(*(self.reconcile(*key) for key, _ in jobs))

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.progress_interval)
            await self.poll_once()

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self._locks.pop(key, None)
        self._active.pop(key, None)
        self._progress.pop(key, None)
        self._protected.discard(key)
        self._phases.pop(key, None)
        self._own.pop(("job", *key), None)
        self._own.pop(("rayjob", *key), None)
        self.dependencies.set(namespace, name, set())
        if key in self._retries:
            self._retries.pop(key)[1].cancel()
        if key in self._grace:
            self._grace.pop(key).cancel()
        self.metrics.forget_job(namespace, name)

    # --- one pass ----------------------------------------------------------------------------------

    async def _reconcile(self, namespace: str, name: str) -> str:
        key = (namespace, name)
        try:
            body = await self.kube.get_job(namespace, name)
        except kube.KubeError as exc:
            log.warning("cannot read %s/%s: %s", namespace, name, exc)
            self._retry_later(key)
            return "retry"
        if body is not None and any(f in vocab.LEGACY_FINALIZERS for f in body["metadata"].get("finalizers") or []):
            # Older versions put kopf's finalizer on every job; it blocks namespace and CRD deletion.
            try:
                await self.kube.remove_finalizers(body, vocab.LEGACY_FINALIZERS)
                body = await self.kube.get_job(namespace, name)
            except kube.KubeError as exc:
                log.warning("cannot take the old finalizer off %s/%s: %s", namespace, name, exc)
                self._retry_later(key)
                return "retry"
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return "success"
        now = now_rfc3339()
        try:
            decision = await self._decide(body, now)
            await self._apply(body, decision)
        except (kube.KubeError, Held) as exc:
            held = exc if isinstance(exc, Held) else classify(exc)
            fallback = (reconcile.terminal if held.permanent else reconcile.blocked)(body, held.reason, held.message, now)
            try:
                await self._write(body, fallback)
            except kube.KubeError as write_error:  # e.g. no right to write the status: keep retrying
                log.warning("cannot write the status of %s/%s (%s) after: %s", namespace, name, write_error, held)
                self._retry_later(key)
                return "retry"
            if held.permanent:
                self._active.pop(key, None)
                return "error"
            self._retry_later(key)
            return "retry"
        if key in self._retries:
            self._retries.pop(key)[1].cancel()
        return "success"

    def _retry_later(self, key: tuple[str, str]) -> None:
        attempts = self._retries[key][0] + 1 if key in self._retries else 1
        if key in self._retries:
            self._retries[key][1].cancel()
        delay = min(self.config.retry_max, self.config.retry_base * 2 ** (attempts - 1))
        handle = asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(self.reconcile(*key)))
        self._retries[key] = (attempts, handle)

    async def _decide(self, body: dict[str, Any], now: str) -> _Decision:
        meta, prev = body["metadata"], body.get("status") or {}
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        finished = prev.get("phase") in TERMINAL and bool(prev.get("completionTime"))
        # Read tolerantly: fields a newer CRD defaults are reported, not failed on.
        doc, unknown = known_fields(_job_document(body))
        requested, invalid_text = None, ""
        try:
            requested = parse_job(doc, source=f"{namespace}/{name}", require_available=True)
        except InvalidJob as exc:
            invalid_text = _errors(exc)

        configmap = await self.kube.get_configmap(namespace, vocab.configmap_name(name))
        rayjobs = await self.kube.list_rayjobs(namespace, name, uid)
        verdict = configmap_verdict(configmap, uid=uid, recorded=prev.get("specHash"), job=name)
        if verdict.held is not None and not (finished or rayjobs):
            raise verdict.held  # a namesake's leftover or someone else's ConfigMap: wait, adopt nothing
        started = verdict.spec is not None or bool(rayjobs)
        obs = reconcile.Observed(rayjobs=rayjobs, spec_in_configmap=verdict.spec, progress=None, now=now,
                                 unknown_fields=unknown, spec_hash=verdict.hash)
        if verdict.tampered:
            obs.refuse = (vocab.REASON_SPEC_TAMPERED, verdict.tampered)

        if requested is None:
            if finished:
                return _Decision(None, reconcile.Plan(status=dict(prev)))
            if not started:
                return _Decision(None, reconcile.invalid(body, invalid_text, now))
            # Never mark a job that has started as invalid: it keeps running the spec it started with.
            if verdict.spec is None:
                raise Held(vocab.REASON_INVALID_SPEC, f"{invalid_text}; fix the spec (its runs keep going)")
            obs.spec_problem = (vocab.REASON_INVALID_SPEC, f"{invalid_text}; the job keeps the spec it started with")
            job, requested_wire = self._stored_job(body, verdict.spec, obs), None
        else:
            requested_wire = requested.spec.wire()
            job = requested
            if verdict.spec is not None:
                effective = reconcile.effective_spec(requested_wire, verdict.spec)
                job = self._stored_job(body, effective, obs) or requested
        if job is None:  # neither the spec as edited nor the one it started with can be read
            raise Held(vocab.REASON_STORED_SPEC_INVALID, f"{invalid_text}; and {obs.no_new_runs[1]}")
        # A started job runs its references resolved; compare what the user wrote with that, references put back.
        obs.requested_spec = requested_wire
        if requested_wire is not None and verdict.spec is not None:
            obs.spec_in_configmap = refs.keep_references(verdict.spec, requested_wire)

        if not started and not finished:
            if errors := cluster_errors(job):  # before waiting for the jobs it names: it could never run
                return _Decision(None, reconcile.invalid(body, "; ".join(map(str, errors)), now))
            if refs.references(job.spec.wire()):
                gated = await self._gate(body, job, now)
                if isinstance(gated, _Decision):
                    return gated
                job = gated
            size = builders.configmap_bytes(builders.build_configmap(job, owner_uid=uid))
            if size > vocab.CONFIGMAP_MAX_BYTES:
                return _Decision(None, reconcile.terminal(
                    body, vocab.REASON_SPEC_TOO_LARGE,
                    f"the resolved spec takes {size} bytes and a ConfigMap holds at most {vocab.CONFIGMAP_MAX_BYTES}; "
                    "move large inline values (reward kwargs, templates) into files on shared storage", now))
            obs.spec_hash = builders.spec_hash(job)

        current = max(rayjobs, key=reconcile.run_of) if rayjobs else None
        key = (namespace, name)
        if current is not None:
            run_name = current["metadata"]["name"]
            cached = self._progress.get(key)
            obs.progress = cached[1] if cached and cached[0] == run_name else None
            outcome = observe.outcome(current)
            if not finished and outcome in ("starting", "running") and not (obs.progress or {}).get("step"):
                obs.pods_cannot_start = await self._pods_cannot_start(current, namespace, name)
        plan = reconcile.plan(job, body, obs)
        if plan.needs_volumes() and pvc_claims(job.spec):
            obs.volumes = {claim: await self.kube.get_pvc(namespace, claim) for claim in pvc_claims(job.spec)}
            plan = reconcile.plan(job, body, obs)
        return _Decision(job, plan, configmap if verdict.spec is not None else None, rayjobs)

    async def _gate(self, body: dict[str, Any], job: PostTrainingJob, now: str) -> PostTrainingJob | _Decision:
        """A job that names other jobs (ptj://) and has not started: the job with its references resolved once
        they all succeeded, else the decision to wait (Pending, woken by their changes) or to fail."""
        meta = body["metadata"]
        namespace, name, key = meta["namespace"], meta["name"], (meta["namespace"], meta["name"])
        spec = job.spec.wire()
        # In the index before reading them: a change that lands after the read still wakes this job.
        self.dependencies.set(namespace, name, {r.job for r in refs.references(spec)})
        found, cycle = await depends.read(namespace, name, spec, self.kube.get_job)
        waited = depends.seconds_between(meta.get("creationTimestamp"), now, default=self.config.dependency_grace)
        gate = depends.gate(name, spec, found, cycle=cycle, waited=waited, grace=self.config.dependency_grace,
                            namespace=namespace)
        if key in self._grace:
            self._grace.pop(key).cancel()
        if gate.wait is not None:
            if gate.wake_in is not None:
                self._grace[key] = asyncio.get_running_loop().call_later(
                    gate.wake_in + 0.5, lambda: asyncio.ensure_future(self.reconcile(*key)))
            return _Decision(None, reconcile.waiting(body, *gate.wait, now), waiting=True)
        self.dependencies.set(namespace, name, set())
        if gate.fail is not None:
            return _Decision(None, reconcile.terminal(body, *gate.fail, now))
        doc, _ = known_fields(_job_document(body, gate.spec))
        try:
            return parse_job(doc, source=f"{namespace}/{name}")
        except InvalidJob as exc:
            return _Decision(None, reconcile.invalid(body, f"with its references resolved: {_errors(exc)}", now))

    def _stored_job(self, body: dict[str, Any], spec: dict[str, Any], obs: reconcile.Observed) -> PostTrainingJob | None:
        """The job as it started (its stored spec, read tolerantly); None, with the reason in
        `obs.no_new_runs`, when that spec no longer parses."""
        doc, _ = known_fields(_job_document(body, spec))
        try:
            return parse_job(doc)
        except InvalidJob as exc:
            text = (f"the spec stored in {vocab.configmap_name(body['metadata']['name'])} no longer parses "
                    f"({_errors(exc)}); create the job again")
            obs.spec_problem = obs.no_new_runs = (vocab.REASON_STORED_SPEC_INVALID, text)
            return None

    async def _pods_cannot_start(self, rayjob: dict[str, Any], namespace: str, job: str) -> str | None:
        selector = f"{vocab.LABEL_JOB}={job},{vocab.LABEL_RUN}={reconcile.run_of(rayjob)}"
        pods = await self.kube.list_pods(namespace, selector)
        cluster = (rayjob.get("status") or {}).get("rayClusterName")
        events = await self.kube.list_events(namespace, kind="RayCluster", name=cluster) if cluster else []
        return observe.pods_cannot_start(pods, events)

    async def _apply(self, body: dict[str, Any], decision: _Decision) -> None:
        meta, plan, job = body["metadata"], decision.plan, decision.job
        namespace, name, key = meta["namespace"], meta["name"], (meta["namespace"], meta["name"])
        policy = self.config.build.network_policy
        live = plan.status.get("phase") not in TERMINAL
        if job is not None and policy is not None and (plan.create_run is not None or (
                live and decision.configmap is not None and key not in self._protected)):
            # Before any pod exists; for a job started by a version without policies, on its first pass.
            await self.kube.create_or_get_networkpolicy(build_networkpolicy(
                name, namespace, owner_uid=meta["uid"], settings=policy))
            self._protected.add(key)
        if plan.create_run is not None and job is not None:
            if decision.configmap is None:
                await self._create_configmap(job, meta["uid"])
            manifest = builders.build_rayjob(job, run=plan.create_run, owner_uid=meta["uid"], settings=self.config.build)
            made = await self.kube.create_rayjob(manifest)  # None: there already (a retry, another pass)
            if made is not None:
                self._own[("rayjob", namespace, name)] = (made["metadata"]["name"], made["metadata"]["resourceVersion"])
        if plan.set_suspend is not None:
            await self.kube.set_rayjob_suspend(namespace, *plan.set_suspend)
        if plan.stop_run is not None:
            await self.kube.stop_rayjob(namespace, *plan.stop_run)
        await self._write(body, plan)
        current = plan.status.get("rayJob")
        if plan.status.get("phase") in TERMINAL or decision.waiting:
            self._active.pop(key, None)
        else:
            rayjob = next((r for r in decision.rayjobs if r["metadata"]["name"] == current), None)
            running = rayjob is not None and observe.outcome(rayjob) == "running"
            self._active[key] = (current or "", kube.progress_url(rayjob, self.config.driver_port) if running else None)

    async def _create_configmap(self, job: PostTrainingJob, uid: str) -> None:
        body = builders.build_configmap(job, owner_uid=uid)
        if await self.kube.create_configmap(body) is None:  # 409: someone's, or a namesake's: look closer
            found = await self.kube.get_configmap(job.metadata.namespace or "", body["metadata"]["name"])
            verdict = configmap_verdict(found, uid=uid, recorded=None, job=job.metadata.name)
            if verdict.held is not None:
                raise verdict.held
            if verdict.tampered:
                raise Held(vocab.REASON_SPEC_TAMPERED, verdict.tampered, permanent=True)

    async def _write(self, body: dict[str, Any], plan: reconcile.Plan) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        old = body.get("status") or {}
        self._phases[(namespace, name)] = plan.status.get("phase")
        if reconcile.status_changed(old, plan.status):
            # The status is written here and nowhere else, and only when it changed.
            written = await self.kube.patch_status(namespace, name, _status_patch(old, plan.status))
            if written and _same_but_status(body, written):  # else someone changed the job meanwhile: see it
                self._own[("job", namespace, name)] = (name, written["metadata"]["resourceVersion"])
            for kind, reason, message in plan.events:
                await self.kube.post_event(body, type=kind, reason=reason, message=message)
            if plan.status.get("restarts", 0) > old.get("restarts", 0):
                self.metrics.restarts.inc(plan.status["restarts"] - old.get("restarts", 0))
            if (plan.status.get("phase") == Phase.failed.value and old.get("phase") != Phase.failed.value
                    and any(c.get("reason") == vocab.REASON_RESTARTS_EXHAUSTED for c in plan.status["conditions"])):
                self.metrics.exhausted.inc()
        self.metrics.observe_job(namespace, name, plan.status)
