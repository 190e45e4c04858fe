"""Play KubeRay v1.7's RayJob controller (HTTPMode) against the API emulator, with clusterbox pods.

    with kubeemu.Cluster() as k8s, clusterbox.ClusterBox(tmp / "box", pvcs=...) as box, \\
            KubeRay(k8s, box) as kuberay, kubeemu.Operator(k8s, registry):
        k8s.create(job)                                    # the operator creates <job>-r0
        cluster = kuberay.wait_cluster("tune-r0")          # its pods run as Ray nodes
        cluster.pod("trainer").kill()                      # the Ray job fails, r0 Failed, the operator makes r1
        kuberay.wait_cluster("tune-r1")                    # a brand-new cluster: fresh /tmp everywhere
        kuberay.logs("tune-r1")                            # the driver's log while its cluster is up
        kuberay.runs["tune-r0"].statuses                   # every status patch written, in order

A thread polls the emulator's RayJobs; each new one gets its own thread that walks the states of
`rayjob_controller.go`: `Initializing` (status.jobId, rayClusterName, startTime; a RayCluster
object owned by the RayJob), pods started and every node ALIVE -> `Running` with `dashboardURL`
(host:port of the head's dashboard), the entrypoint POSTed to /api/jobs/
(`reconcileHTTPModeJobNotFound`), then `jobStatus` and `message` as the dashboard reports them,
until a terminal job status gives `Complete` (or `Failed`, reason AppFailed, for FAILED) with
endTime, rayJobInfo and the succeeded/failed counts. `shutdownAfterJobFinishes` deletes the
cluster `ttlSecondsAfterFinished` after endTime; deleting the RayJob stops the Ray job and deletes
the cluster at once.

Where this is not KubeRay: it polls every `poll` seconds (KubeRay requeues every 3 s); Secrets live
in `box.secrets` (the emulator serves no Secrets); a pod that dies is not replaced, and a dead
head makes the RayJob `Failed` with a message saying so (KubeRay would recreate the head and
resubmit); a cluster that cannot start (bad volume, missing PVC folder, no ALIVE nodes in
`ready_timeout`) makes the RayJob `Failed` with reason `SubmissionFailed` and the cause as
message, where KubeRay would leave pods pending until `preRunningDeadlineSeconds`; `backoffLimit`
retries are not played (our operator sets backoffLimit 0 and owns retries), and a suspended RayJob
simply waits unstarted (no Suspending/Suspended states) until it is resumed or deleted.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

import clusterbox
import clusterbox_build as build
import kubeemu

log = logging.getLogger("clusterbox.kuberay")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _ms_time(ms: int | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z")


class Run:
    """What the harness did for one RayJob: its cluster, submission id, and every status it wrote."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cluster: clusterbox.RayCluster | None = None
        self.submission_id: str | None = None
        self.statuses: list[dict[str, Any]] = []
        self.error: str | None = None
        self.deleted = threading.Event()
        self.done = threading.Event()
        self.torn_down = threading.Event()
        self.thread: threading.Thread | None = None


class KubeRay:
    def __init__(self, k8s: kubeemu.Cluster, box: clusterbox.ClusterBox, *, namespace: str = "default",
                 poll: float = 0.5, ready_timeout: float = 240) -> None:
        self.k8s, self.box, self.namespace = k8s, box, namespace
        self.poll, self.ready_timeout = poll, ready_timeout
        self.runs: dict[str, Run] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> KubeRay:
        self._watcher = threading.Thread(target=self._watch, name="kuberay-watch", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._watcher:
            self._watcher.join(timeout=30)
        for run in list(self.runs.values()):
            run.deleted.set()
        for run in list(self.runs.values()):
            if run.thread:
                run.thread.join(timeout=120)

    # --- for tests ---------------------------------------------------------------------------------

    def wait_cluster(self, rayjob: str, *, timeout: float = 300) -> clusterbox.RayCluster:
        """The RayJob's cluster once every pod is up (raises with the harness's error if it failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.runs.get(rayjob)
            if run and run.error:
                raise RuntimeError(f"{rayjob}: {run.error}")
            if run and run.cluster and run.submission_id:
                return run.cluster
            time.sleep(0.2)
        raise TimeoutError(f"no running cluster for RayJob {rayjob} after {timeout}s")

    def logs(self, rayjob: str) -> str:
        """The driver's log (`kubectl logs` of the job), while its cluster is up."""
        run = self.runs.get(rayjob)
        if not run or not run.cluster or not run.submission_id or run.torn_down.is_set():
            return ""
        return run.cluster.job_logs(run.submission_id)

    # --- the controller ----------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                present = {r["metadata"]["name"]: r for r in self.k8s.list(*kubeemu.RAYJOB, self.namespace)}
            except Exception as exc:  # noqa: BLE001 - the emulator is shutting down; keep polling until told
                log.debug("listing RayJobs failed: %s", exc)
                present = None
            if present is not None:
                for name in present:
                    if name not in self.runs:
                        run = self.runs[name] = Run(name)
                        run.thread = threading.Thread(target=self._reconcile, args=(run,), name=f"kuberay-{name}",
                                                      daemon=True)
                        run.thread.start()
                for name, run in self.runs.items():
                    if name not in present:
                        run.deleted.set()
            self._stop.wait(self.poll)

    def _status(self, run: Run, **fields: Any) -> None:
        status = {k: v for k, v in fields.items() if v is not None}
        run.statuses.append(status)
        try:
            self.k8s.patch_status(*kubeemu.RAYJOB, self.namespace, run.name, status)
        except kubeemu.ApiError as exc:
            if exc.status != 404:
                raise
            run.deleted.set()

    def _reconcile(self, run: Run) -> None:
        try:
            self._play(run)
        except Exception as exc:  # noqa: BLE001 - a harness failure becomes the RayJob's status
            log.exception("clusterbox KubeRay: %s", run.name)
            run.error = f"{type(exc).__name__}: {exc}"
            if not run.deleted.is_set():
                self._status(run, jobDeploymentStatus="Failed", reason="SubmissionFailed",
                             message=f"clusterbox: {run.error}"[:2000], endTime=_now())
        finally:
            self._teardown(run)
            run.done.set()

    def _play(self, run: Run) -> None:
        rayjob = self.k8s.get(*kubeemu.RAYJOB, self.namespace, run.name)
        spec = rayjob["spec"]
        if spec.get("submissionMode", "K8sJobMode") != "HTTPMode":
            raise build.Unsupported(f"spec.submissionMode {spec.get('submissionMode')!r}: "
                                    "clusterbox plays HTTPMode only")
        while spec.get("suspend") and not run.deleted.wait(self.poll):
            spec = self.k8s.get(*kubeemu.RAYJOB, self.namespace, run.name)["spec"]
        if run.deleted.is_set():
            return
        job_id, cluster_name = f"{run.name}-{clusterbox._suffix()}", f"{run.name}-{clusterbox._suffix()}"
        self._status(run, jobDeploymentStatus="Initializing", jobId=job_id, rayClusterName=cluster_name,
                     jobStatus="", startTime=_now())
        self._create_raycluster(rayjob, cluster_name)
        configmaps = {}
        for group in [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"].get("workerGroupSpecs", [])]:
            for vol in (group["template"].get("spec") or {}).get("volumes", []):
                if "configMap" in vol:
                    found = self.k8s.find(*kubeemu.CONFIGMAP, self.namespace, vol["configMap"]["name"])
                    if found is not None:
                        configmaps[vol["configMap"]["name"]] = found.get("data") or {}
        cluster = self.box.start(rayjob, configmaps=configmaps, name=cluster_name, timeout=self.ready_timeout)
        run.cluster = cluster
        if run.deleted.is_set():
            return
        self._status(run, jobDeploymentStatus="Running", dashboardURL=cluster.dashboard_url)
        run.submission_id = cluster.submit(rayjob, job_id)
        seen: tuple[str, str] | None = None
        while not run.deleted.wait(self.poll):
            if not cluster.head.running():
                self._status(run, jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed",
                             message=f"clusterbox: head pod {cluster.head.name} exited (KubeRay would recreate it "
                                     "and resubmit the job)", endTime=_now(), failed=1, succeeded=0)
                return self._after_finish(run, spec)
            try:
                info = cluster.job_info(job_id)
            except OSError as exc:  # the dashboard is busy or restarting: try again, as KubeRay does
                log.debug("%s: job info: %s", run.name, exc)
                continue
            state, message = info.get("status", ""), info.get("message") or ""
            if (state, message) == seen:
                continue
            seen = (state, message)
            job_info = {"startTime": _ms_time(info.get("start_time")), "endTime": _ms_time(info.get("end_time"))}
            fields: dict[str, Any] = {"jobStatus": state, "message": message,
                                      "rayJobInfo": {k: v for k, v in job_info.items() if v}}
            if state in TERMINAL:
                failed = state == "FAILED"
                fields.update(jobDeploymentStatus="Failed" if failed else "Complete", endTime=_now(),
                              reason="AppFailed" if failed else None, failed=int(failed),
                              succeeded=int(state == "SUCCEEDED"))
                self._status(run, **fields)
                return self._after_finish(run, spec)
            self._status(run, **fields)
        if run.submission_id:  # deleted while running: KubeRay's finalizer stops the Ray job first
            try:
                cluster.request("POST", f"/api/jobs/{job_id}/stop", timeout=10)
            except OSError:
                pass

    def _after_finish(self, run: Run, spec: dict[str, Any]) -> None:
        if not spec.get("shutdownAfterJobFinishes"):
            run.deleted.wait()  # the cluster stays until the RayJob goes
            return
        run.deleted.wait(float(spec.get("ttlSecondsAfterFinished") or 0))

    def _create_raycluster(self, rayjob: dict[str, Any], name: str) -> None:
        """The RayCluster object KubeRay creates for the RayJob (owned by it, so deletion cascades)."""
        meta = rayjob["metadata"]
        self.k8s.create({
            "apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": name, "namespace": self.namespace,
                         "labels": {"ray.io/originated-from-crd": "RayJob",
                                    "ray.io/originated-from-cr-name": meta["name"]},
                         "ownerReferences": [{"apiVersion": "ray.io/v1", "kind": "RayJob", "name": meta["name"],
                                              "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
            "spec": rayjob["spec"]["rayClusterSpec"],
        })

    def _teardown(self, run: Run) -> None:
        if run.cluster is not None and not run.torn_down.is_set():
            run.cluster.teardown()
            with self.box._lock:
                if run.cluster in self.box.clusters:
                    self.box.clusters.remove(run.cluster)
        run.torn_down.set()
        name = (run.statuses[0].get("rayClusterName") if run.statuses else None)
        if name:
            try:
                self.k8s.delete(*kubeemu.RAYCLUSTER, self.namespace, name)
            except kubeemu.ApiError as exc:
                if exc.status != 404:
                    log.warning("deleting RayCluster %s: %s", name, exc)
            except Exception as exc:  # noqa: BLE001 - the emulator may already be closed at exit
                log.debug("deleting RayCluster %s: %s", name, exc)
