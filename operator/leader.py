"""Leader election on a coordination.k8s.io Lease: with several replicas, only one acts.

Replicas that do not hold the Lease wait; the leader renews it every
`renew_seconds`. A leader that cannot renew before the Lease expires stops
(the Deployment restarts it as a follower), so two replicas never reconcile
at once for longer than one lease duration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any, Callable

log = logging.getLogger("posttrain.operator.leader")

LEASE_NAME = "posttrain-operator-leader"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class LeaseLock:
    def __init__(self, coordination: Any, *, namespace: str, identity: str, name: str = LEASE_NAME,
                 lease_seconds: int = 15, clock: Callable[[], dt.datetime] = _now) -> None:
        self.api, self.namespace, self.identity, self.name = coordination, namespace, identity, name
        self.lease_seconds, self.clock = lease_seconds, clock

    def try_acquire(self) -> bool:
        """Take or renew the Lease; False when another live holder has it (or we lost a race)."""
        from kubernetes import client

        now = self.clock()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_seconds,
                                        acquire_time=now, renew_time=now, lease_transitions=0),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
                return True
            except client.ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        spec = lease.spec
        expired = spec.renew_time is None or spec.renew_time + dt.timedelta(
            seconds=spec.lease_duration_seconds or self.lease_seconds) < now
        if spec.holder_identity not in (None, "", self.identity) and not expired:
            return False
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, now, self.lease_seconds
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)  # resourceVersion guards the race
            return True
        except client.ApiException as exc:
            if exc.status == 409:
                return False
            raise


    def release(self) -> None:
        """Give the Lease up on a clean stop, so a standby takes over at once instead of after expiry."""
        from kubernetes import client

        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except client.ApiException as exc:
            log.warning("could not release the leader Lease: %s", exc)


async def hold(lock: LeaseLock, *, acquired: asyncio.Event, lost: asyncio.Event, renew_seconds: float = 5.0) -> None:
    """Wait for the Lease, then keep renewing it; set `lost` when it slips away."""
    while not await asyncio.to_thread(_safe, lock):
        log.info("waiting for the leader Lease %s/%s", lock.namespace, lock.name)
        await asyncio.sleep(renew_seconds)
    log.info("leading as %s", lock.identity)
    acquired.set()
    last_ok = asyncio.get_running_loop().time()
    while True:
        await asyncio.sleep(renew_seconds)
        if await asyncio.to_thread(_safe, lock):
            last_ok = asyncio.get_running_loop().time()
        elif asyncio.get_running_loop().time() - last_ok > lock.lease_seconds - renew_seconds:
            log.error("lost the leader Lease; stopping so another replica can lead")
            lost.set()
            return


def _safe(lock: LeaseLock) -> bool:
    try:
        return lock.try_acquire()
    except Exception as exc:  # noqa: BLE001 - an API hiccup is a failed renewal, not a crash
        log.warning("lease renewal failed: %s", exc)
        return False
