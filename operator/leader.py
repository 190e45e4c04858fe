"""Leader election on a coordination.k8s.io Lease: with several replicas, only one acts.

Replicas that do not hold the Lease wait; the leader renews it every `renew_seconds`. Two rules
keep two replicas from acting at once, neither of which trusts another machine's clock:

- A follower judges another holder's Lease expired only when the Lease record (holder,
  renewTime, transitions) has not changed for `leaseDurationSeconds` of its *own* monotonic
  clock, counted from when it first saw that record (as client-go's leaderelection does); the
  renewTime written by another replica is compared for equality only, never against local time.
- The leader steps down when it has not renewed successfully for `lease_seconds - renew_seconds`
  of its own monotonic clock, whether or not the renewal call has returned: a renewal hung on a
  dead connection cannot keep a stale leader acting. Every API call has a request timeout too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any, Callable

log = logging.getLogger("posttrain.operator.leader")

LEASE_NAME = "posttrain-operator-leader"
REQUEST_TIMEOUT = (5.0, 10.0)  # (connect, read) seconds of each Lease call


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class LeaseLock:
    def __init__(self, coordination: Any, *, namespace: str, identity: str, name: str = LEASE_NAME,
                 lease_seconds: int = 15, clock: Callable[[], dt.datetime] = _now,
                 monotonic: Callable[[], float] = time.monotonic,
                 request_timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        self.api, self.namespace, self.identity, self.name = coordination, namespace, identity, name
        self.lease_seconds, self.clock, self.monotonic = lease_seconds, clock, monotonic
        self.request_timeout = request_timeout
        self._observed: tuple[Any, ...] | None = None  # the Lease record last seen
        self._observed_at = 0.0  # local monotonic time it was first seen

    def _observe(self, lease: Any) -> float:
        """Seconds (local, monotonic) since the Lease's record last changed."""
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions, spec.lease_duration_seconds)
        if record != self._observed:
            self._observed, self._observed_at = record, self.monotonic()
        return self.monotonic() - self._observed_at

    def try_acquire(self) -> bool:
        """Take or renew the Lease; False when another live holder has it (or we lost a race)."""
        from kubernetes import client

        now, timeout = self.clock(), self.request_timeout
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_seconds,
                                        acquire_time=now, renew_time=now, lease_transitions=0),
            )
            try:
                created = self.api.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
            except client.ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
            self._observe(created)
            return True
        spec = lease.spec
        unchanged_for = self._observe(lease)
        held_by_other = spec.holder_identity not in (None, "", self.identity)
        if held_by_other and unchanged_for <= (spec.lease_duration_seconds or self.lease_seconds):
            return False
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, now, self.lease_seconds
        try:
            # resourceVersion guards the race: of two replicas replacing the same version, one gets 409.
            replaced = self.api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=timeout)
        except client.ApiException as exc:
            if exc.status == 409:
                return False
            raise
        self._observe(replaced)
        return True

    def release(self) -> None:
        """Give the Lease up on a clean stop, so a standby takes over at once instead of after expiry."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.request_timeout)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                self.api.replace_namespaced_lease(self.name, self.namespace, lease,
                                                  _request_timeout=self.request_timeout)
        except Exception as exc:  # noqa: BLE001 - best effort: the Lease expires anyway
            log.warning("could not release the leader Lease: %s", exc)


async def hold(lock: LeaseLock, *, acquired: asyncio.Event, lost: asyncio.Event, renew_seconds: float = 5.0) -> None:
    """Wait for the Lease, then keep renewing it; set `lost` (and return) when it slips away."""
    while not await asyncio.to_thread(_safe, lock):
        log.info("waiting for the leader Lease %s/%s", lock.namespace, lock.name)
        await asyncio.sleep(renew_seconds)
    log.info("leading as %s", lock.identity)
    acquired.set()
    # Others may take over `lease_seconds` after our last renewal; stop acting well before that.
    renew_deadline = max(renew_seconds, lock.lease_seconds - renew_seconds)
    last_ok = lock.monotonic()
    while True:
        await asyncio.sleep(renew_seconds)
        remaining = last_ok + renew_deadline - lock.monotonic()
        attempt = asyncio.ensure_future(asyncio.to_thread(_safe, lock)) if remaining > 0 else None
        if attempt is not None:
            done, _ = await asyncio.wait({attempt}, timeout=remaining)
            if attempt in done and attempt.result():
                last_ok = lock.monotonic()
                continue
        if lock.monotonic() - last_ok >= renew_deadline:
            log.error("could not renew the leader Lease for %.1fs; stopping so another replica can lead",
                      lock.monotonic() - last_ok)
            lost.set()
            return


def _safe(lock: LeaseLock) -> bool:
    try:
        return lock.try_acquire()
    except Exception as exc:  # noqa: BLE001 - an API hiccup is a failed renewal, not a crash
        log.warning("lease renewal failed: %s", exc)
        return False
