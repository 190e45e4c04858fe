"""Split brain: leader election judged on the local clock, and no API call without a timeout.

A fake coordination API (in memory, kubernetes client objects) drives `LeaseLock` with clocks the
test controls; a TCP server that accepts and never answers stands in for a hung API server.

    .venv/bin/python -m pytest tests/test_leader.py -q
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import socket
import threading
import time

import pytest
from kubernetes import client

from posttrain.operator import kube, leader

WALL = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)


class FakeLeases:
    """read/create/replace_namespaced_lease over one stored Lease, with resourceVersion checks."""

    def __init__(self) -> None:
        self.lease: client.V1Lease | None = None
        self.timeouts: list[object] = []
        self.hang = threading.Event()  # set: replace blocks until released
        self.release = threading.Event()

    def read_namespaced_lease(self, name, namespace, _request_timeout=None):
        self.timeouts.append(_request_timeout)
        if self.lease is None:
            raise client.ApiException(status=404)
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace, body, _request_timeout=None):
        self.timeouts.append(_request_timeout)
        if self.lease is not None:
            raise client.ApiException(status=409)
        body.metadata.resource_version = "1"
        self.lease = copy.deepcopy(body)
        return copy.deepcopy(body)

    def replace_namespaced_lease(self, name, namespace, body, _request_timeout=None):
        self.timeouts.append(_request_timeout)
        if self.hang.is_set():
            self.release.wait(30)
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise client.ApiException(status=409)
        body.metadata.resource_version = str(int(body.metadata.resource_version) + 1)
        self.lease = copy.deepcopy(body)
        return copy.deepcopy(body)

    def held_by(self, holder: str, renew: dt.datetime, duration: int = 10) -> None:
        self.lease = client.V1Lease(metadata=client.V1ObjectMeta(name=leader.LEASE_NAME, namespace="ops",
                                                                 resource_version="7"),
                                    spec=client.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=duration,
                                                            renew_time=renew, acquire_time=renew, lease_transitions=2))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lock_for(api, clock, *, wall=WALL, identity="b", lease_seconds=10):
    return leader.LeaseLock(api, namespace="ops", identity=identity, lease_seconds=lease_seconds,
                            clock=lambda: wall, monotonic=clock)


def test_another_holders_lease_expires_by_local_observation_not_by_its_renew_time():
    api, mono = FakeLeases(), Clock()
    # The holder's clock runs an hour behind: its renewTime looks long expired to a wall-clock check.
    api.held_by("a", WALL - dt.timedelta(hours=1))
    lock = lock_for(api, mono)
    assert lock.try_acquire() is False, "first sight of a record: it is live for a full lease duration"
    mono.t += 9
    assert lock.try_acquire() is False
    mono.t += 2  # 11 s of local time without a change of the record
    assert lock.try_acquire() is True and api.lease.spec.holder_identity == "b"
    assert api.lease.spec.lease_transitions == 3


def test_a_renewing_holder_keeps_the_lease_even_with_a_clock_far_ahead_or_behind():
    api, mono = FakeLeases(), Clock()
    lock = lock_for(api, mono)
    for step in range(5):
        # The holder renews every 5 s of our time; its clock claims a time two hours off.
        api.held_by("a", WALL + dt.timedelta(hours=2, seconds=5 * step))
        mono.t += 5
        assert lock.try_acquire() is False


def test_a_released_lease_is_taken_at_once_and_every_call_has_a_timeout():
    api, mono = FakeLeases(), Clock()
    api.held_by("", WALL)
    assert lock_for(api, mono).try_acquire() is True
    fresh = FakeLeases()
    assert lock_for(fresh, mono).try_acquire() is True  # creates it
    assert api.timeouts and fresh.timeouts and all(t == leader.REQUEST_TIMEOUT for t in api.timeouts + fresh.timeouts)


@pytest.mark.timeout(60)
def test_a_hung_renewal_does_not_keep_a_stale_leader_acting():
    api = FakeLeases()
    lock = leader.LeaseLock(api, namespace="ops", identity="a", lease_seconds=3)

    async def scenario() -> tuple[bool, float]:
        acquired, lost = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(leader.hold(lock, acquired=acquired, lost=lost, renew_seconds=1.0))
        await asyncio.wait_for(acquired.wait(), 10)
        api.hang.set()  # every renewal from now on blocks (a dead connection)
        hung_at = time.monotonic()
        await asyncio.wait_for(lost.wait(), 20)
        took = time.monotonic() - hung_at
        still_hung = not api.release.is_set()
        api.release.set()  # let the stuck call return, so the loop's threads can finish
        task.cancel()
        return still_hung, took

    still_hung, took = asyncio.run(scenario())
    assert still_hung, "stepped down while the renewal call had not returned"
    assert took < 3 + 1.0, f"stepped down {took:.1f}s after the last renewal, past the lease of 3s"


class Silent:
    """A TCP server that accepts connections and never answers (a hung API server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.mark.timeout(60)
def test_every_kube_call_gives_up_on_a_hung_api_server():
    server = Silent()
    try:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{server.port}"
        api = kube.Kube(client.ApiClient(cfg), timeout=(0.5, 0.5))
        calls = {
            "get_job": lambda: api.get_job("ns", "j"),
            "list_rayjobs": lambda: api.list_rayjobs("ns", "j", "u"),
            "get_configmap": lambda: api.get_configmap("ns", "j-spec"),
            "get_pvc": lambda: api.get_pvc("ns", "c"),
            "list_pods": lambda: api.list_pods("ns", "a=b"),
            "patch_status": lambda: api.patch_status("ns", "j", {"phase": "Running"}),
        }
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(kube.KubeError) as info:
                asyncio.run(call())
            assert info.value.status is None, name
            assert time.monotonic() - started < 10, f"{name} waited {time.monotonic() - started:.1f}s"
        lease_api = client.CoordinationV1Api(client.ApiClient(cfg))
        lock = leader.LeaseLock(lease_api, namespace="ops", identity="a", request_timeout=(0.5, 0.5))
        started = time.monotonic()
        assert leader._safe(lock) is False
        assert time.monotonic() - started < 10
    finally:
        server.close()
