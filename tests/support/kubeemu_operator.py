"""Running a real kopf operator against a `kubeemu.Cluster`, on a background thread.

`Operator(cluster, handlers)` loads the handlers (a kopf.OperatorRegistry, a dotted module name
or a .py path), logs kopf in to the cluster with a `@kopf.on.login` handler of its own, applies
`operator_settings`, and runs `kopf.operator(...)` on a new event loop until the `with` block
ends; kopf's exception, if any, is re-raised in the test. Import it through `kubeemu`.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import importlib.util
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kopf

if TYPE_CHECKING:
    from kubeemu import Cluster


def operator_settings(settings: kopf.OperatorSettings) -> None:
    """kopf settings for posttrain against this emulator; the first block holds on real clusters too.

    Without the persistence settings kopf writes `status.kopf` (pruned by our CRD's status schema)
    and `kopf.zalando.org/*` keys; STYLE.md asks for our own group.
    """
    settings.persistence.finalizer = "posttrain.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="posttrain.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="posttrain.dev", key="last-handled-configuration")
    # Test speed only: no peering resources exist; fail fast; retry and stop quickly.
    settings.peering.standalone = True
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 5
    settings.networking.error_backoffs = (0.1, 0.5, 1)
    settings.watching.connect_timeout = 5
    settings.watching.server_timeout = 60
    settings.queueing.exit_timeout = 2
    settings.queueing.idle_timeout = 1
    settings.execution.default_backoff = 1


_target: contextvars.ContextVar[kopf.ConnectionInfo] = contextvars.ContextVar("kubeemu_target")
_registries: dict[str, kopf.OperatorRegistry] = {}
_logged_in: weakref.WeakSet[kopf.OperatorRegistry] = weakref.WeakSet()


async def _login(**_: Any) -> kopf.ConnectionInfo:
    return _target.get()  # set by the operator's thread; each Operator sees its own Cluster


def load_registry(module: str | os.PathLike[str]) -> kopf.OperatorRegistry:
    """The registry that `module` (dotted name or .py path) registers its handlers in, loading it once.

    A module-level `registry` (a kopf.OperatorRegistry) wins; else the handlers land in a fresh
    default registry while the module is first imported here. A module imported before (outside
    this function) has put its handlers in kopf's global default registry, which is used then.
    """
    is_path = isinstance(module, os.PathLike) or str(module).endswith(".py")
    key = str(Path(module).resolve()) if is_path else str(module)
    if key in _registries:
        return _registries[key]
    already = not is_path and key in sys.modules
    previous, fresh = kopf.get_default_registry(), kopf.OperatorRegistry()
    kopf.set_default_registry(fresh)
    try:
        if is_path:
            name = f"kubeemu_handlers_{len(_registries)}"
            spec = importlib.util.spec_from_file_location(name, key)
            assert spec is not None and spec.loader is not None, key
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            spec.loader.exec_module(loaded)
        else:
            loaded = importlib.import_module(key)
    finally:
        kopf.set_default_registry(previous)
    own = getattr(loaded, "registry", None)
    registry = own if isinstance(own, kopf.OperatorRegistry) else previous if already else fresh
    _registries[key] = registry
    return registry


class Operator:
    """A real kopf operator (`kopf.operator`) on a background thread, logged in to `cluster`.

    `handlers` is a kopf.OperatorRegistry, or a module that registers handlers (dotted name or
    .py path; see `load_registry`). A login handler for `cluster` is added to the registry; it
    outranks any login the module has; `token` is the bearer token it calls with (default: the
    cluster admin's; with `Cluster(rbac=True)` give a ServiceAccount's to test the chart's RBAC).
    `namespaces=None` serves the whole cluster. `settings`
    runs after `operator_settings` and before the module's startup handlers. Leaving the `with`
    block sets kopf's stop flag, joins the thread, and re-raises the operator's exception if any.
    """

    def __init__(self, cluster: Cluster, handlers: str | os.PathLike[str] | kopf.OperatorRegistry, *,
                 namespaces: Iterable[str] | None = None,
                 settings: Callable[[kopf.OperatorSettings], None] | None = None,
                 memo: Mapping[str, Any] | None = None, ready_timeout: float = 20.0, stop_timeout: float = 20.0,
                 token: str | None = None) -> None:
        self.cluster, self.handlers, self.token = cluster, handlers, token
        self.namespaces = list(namespaces) if namespaces is not None else None
        self._configure, self._memo = settings, dict(memo or {})
        self._ready_timeout, self._stop_timeout = ready_timeout, stop_timeout
        self._ready, self._stop = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Operator:
        handlers = self.handlers
        registry = handlers if isinstance(handlers, kopf.OperatorRegistry) else load_registry(handlers)
        if registry not in _logged_in:
            kopf.on.login(registry=registry, id="kubeemu_login")(_login)
            _logged_in.add(registry)
        self._thread = threading.Thread(target=self._run, args=(registry,), name="kopf-operator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._ready_timeout
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._stop.set()
                self._thread.join(timeout=self._stop_timeout)
                raise RuntimeError(f"kopf operator {self.handlers} did not get ready") from self._error
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._stop_timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"kopf operator {self.handlers} did not stop in {self._stop_timeout}s")
        if self._error is not None and exc is None:
            raise self._error

    def _run(self, registry: kopf.OperatorRegistry) -> None:
        _target.set(self.cluster.connection_info() if self.token is None else self.cluster.connection_info(self.token))
        settings = kopf.OperatorSettings()
        operator_settings(settings)
        if self._configure is not None:
            self._configure(settings)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(kopf.operator(
                registry=registry, settings=settings, standalone=True, clusterwide=self.namespaces is None,
                namespaces=self.namespaces or (), stop_flag=self._stop, ready_flag=self._ready,
                memo=kopf.Memo(self._memo)))
        except BaseException as e:  # noqa: BLE001 -- re-raised in the test thread by __exit__
            self._error = e
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
