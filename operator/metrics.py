"""Operator metrics and its HTTP endpoint: /metrics, /healthz (liveness), /readyz (readiness).

Names start with `posttrain_operator_`; the chart's alerts and dashboard use them.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from posttrain.api.status import Phase


class OperatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reconciles = Counter("posttrain_operator_reconcile", "Reconcile passes by result.", ["result"], registry=r)
        self.duration = Histogram("posttrain_operator_reconcile_duration_seconds", "Time one reconcile pass takes.",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.jobs = Gauge("posttrain_operator_jobs", "PostTrainingJobs by phase.", ["phase"], registry=r)
        self.job_phase = Gauge("posttrain_operator_job_phase", "1 for the job's current phase.",
                               ["namespace", "name", "phase"], registry=r)
        self.job_step = Gauge("posttrain_operator_job_step", "Steps done, from the driver.", ["namespace", "name"], registry=r)
        self.job_total = Gauge("posttrain_operator_job_total_steps", "Steps the job runs.", ["namespace", "name"], registry=r)
        self.job_progress_time = Gauge("posttrain_operator_job_last_progress_time_seconds",
                                       "Unix time the job's step last increased.", ["namespace", "name"], registry=r)
        self.job_restarts = Gauge("posttrain_operator_job_restarts", "RayJobs replaced after failures.",
                                  ["namespace", "name"], registry=r)
        self.restarts = Counter("posttrain_operator_restarts", "Runs restarted from a checkpoint.", registry=r)
        self.exhausted = Counter("posttrain_operator_restarts_exhausted", "Jobs failed with no restarts left.", registry=r)
        self.leader = Gauge("posttrain_operator_leader", "1 while this replica leads.", registry=r)
        self._phases: dict[tuple[str, str], str] = {}
        self._steps: dict[tuple[str, str], int] = {}
        for phase in Phase:
            self.jobs.labels(phase=phase.value).set(0)

    def observe_job(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        key = (namespace, name)
        phase = status.get("phase")
        old = self._phases.get(key)
        if phase and phase != old:
            if old:
                self.job_phase.labels(namespace, name, old).set(0)
            self.job_phase.labels(namespace, name, phase).set(1)
            self._phases[key] = phase
            self._recount()
        progress = status.get("progress") or {}
        step = int(progress.get("step") or 0)
        if step != self._steps.get(key):
            self._steps[key] = step
            self.job_step.labels(namespace, name).set(step)
            self.job_progress_time.labels(namespace, name).set(time.time())
        if progress.get("totalSteps"):
            self.job_total.labels(namespace, name).set(progress["totalSteps"])
        self.job_restarts.labels(namespace, name).set(status.get("restarts", 0))

    def forget_job(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        phase = self._phases.pop(key, None)
        self._steps.pop(key, None)
        for gauge in (self.job_step, self.job_total, self.job_progress_time, self.job_restarts):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        if phase:
            try:
                self.job_phase.remove(namespace, name, phase)
            except KeyError:
                pass
        self._recount()

    def _recount(self) -> None:
        counts = {p.value: 0 for p in Phase}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.jobs.labels(phase=phase).set(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: OperatorMetrics, port: int, *, ready: Any, host: str = "0.0.0.0") -> Any:
    """Start the endpoint on kopf's event loop; returns the aiohttp runner (call `.cleanup()` to stop).

    `ready()` answers /readyz: true once the operator watches its resources.
    """
    from aiohttp import web

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready\n") if ready() else web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics_view), web.get("/healthz", healthz), web.get("/readyz", readyz)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
