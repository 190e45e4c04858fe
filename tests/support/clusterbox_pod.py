"""One clusterbox pod: the host's handle on it (`Pod`) and, run as a script, its first process.

`Pod.start()` writes the pod's plan and starts, as PID 1 of a fresh mount and PID namespace,

    unshare --mount --pid --fork --mount-proc --kill-child=SIGKILL python -I clusterbox_pod.py PLAN.json

PLAN.json (built by `clusterbox` from the pod spec) holds `mounts` (in mount order: parents first),
`env`, `workdir` and `argv`. Mount sources are host paths that the new /tmp may cover, so each
one is opened before anything is mounted and mounted through /proc/self/fd/N (mount(2) follows
that link; mount(8) would canonicalise it back to the covered path).

A mount point that does not exist is not created on the host's filesystem: its nearest existing
ancestor gets a copy-on-write overlay (upper layer in the pod's own folder) first, so `mkdir`
lands in the pod alone. The overlay hides any mounts below that ancestor from the pod.

Standard library only: the script runs before the pod has a /tmp, with `python -I`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target} ({fstype or 'bind'}): {os.strerror(err)}")


def ensure_mountpoint(path: str, *, ours: list[str], scratch: str, counter: list[int]) -> None:
    """Make `path` exist inside this pod without writing to the host's filesystem."""
    if os.path.isdir(path):
        return
    ancestor = os.path.dirname(path)
    while not os.path.isdir(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not any(ancestor == m or ancestor.startswith(m.rstrip("/") + "/") for m in ours):
        if ancestor == "/":  # an overlay over / would hide /proc, /dev and /sys
            raise OSError(f"mountPath {path}: clusterbox makes mount points only below an existing folder other than /")
        counter[0] += 1
        upper, work = (os.path.join(scratch, f"overlay-{counter[0]}-{part}") for part in ("upper", "work"))
        os.makedirs(upper)
        os.makedirs(work)
        mount("overlay", ancestor, "overlay", 0, f"lowerdir={ancestor},upperdir={upper},workdir={work}")
        ours.append(ancestor)
    os.makedirs(path, exist_ok=True)


class Pod:
    """One pod: PID 1 of its own mount and PID namespace, running its container's command."""

    def __init__(self, name: str, *, group: str, folder: Path, plan: dict[str, Any],
                 files: dict[str, dict[str, str]], port_base: int) -> None:
        self.name, self.group, self.folder, self.plan = name, group, folder, plan
        self.files, self.port_base = files, port_base
        self.env: dict[str, str] = plan["env"]
        self.proc: subprocess.Popen | None = None
        self.pid_ns = ""
        self.killed = self.reaped = False
        self._ns_fd: int | None = None
        self._kill_lock = threading.Lock()

    def start(self) -> None:
        (self.folder / "scratch").mkdir(parents=True)
        for folder, data in self.files.items():
            Path(folder).mkdir(parents=True, exist_ok=True)
            for key, text in data.items():
                (Path(folder) / key).write_text(text)
        plan_file = self.folder / "plan.json"
        plan_file.write_text(json.dumps({**self.plan, "scratch": str(self.folder / "scratch")}, indent=1))
        log = open(self.folder / "container.log", "ab")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL", "--propagation",
             "private", sys.executable, "-I", str(Path(__file__).resolve()), str(plan_file)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={})
        log.close()
        host_ns, deadline = os.readlink("/proc/self/ns/pid"), time.monotonic() + 30
        error: OSError | None = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            # Until unshare(2) has run, its children's namespace is ours; /proc can also refuse the
            # link for a moment while the process execs. Holding the namespace open keeps its
            # inode number ours until kill() has seen it empty.
            try:
                fd = os.open(f"/proc/{self.proc.pid}/ns/pid_for_children", os.O_RDONLY)
            except OSError as exc:
                error = exc
                time.sleep(0.01)
                continue
            ns = os.readlink(f"/proc/self/fd/{fd}")
            if ns != host_ns:
                self._ns_fd, self.pid_ns = fd, ns
                break
            os.close(fd)
            time.sleep(0.01)
        if not self.pid_ns:
            code = self.proc.poll()
            raise RuntimeError(f"pod {self.name}: no PID namespace (unshare exit code {code}, last error {error}):\n"
                               f"{self.log()}")

    @property
    def init_pid(self) -> int | None:
        """The host PID of the pod's PID 1."""
        if self.proc is None:
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def processes(self) -> list[int]:
        """Host PIDs of every process of this pod (empty once it is gone).

        A process belongs to the pod while it is in the pod's PID namespace, or when it carries the
        pod's RAY_CLOUD_INSTANCE_ID (every process of a pod inherits it). The namespace alone is not
        enough once the pod is gone: the kernel reuses a dead namespace's inode number.
        """
        marker = f"\0RAY_CLOUD_INSTANCE_ID={self.name}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (not self.reaped and os.readlink(entry / "ns" / "pid") == self.pid_ns) or \
                        marker in b"\0" + (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def kill(self) -> None:
        """SIGKILL the pod's PID 1: the kernel ends every process of its PID namespace."""
        with self._kill_lock:  # the test and the harness's teardown may both kill a pod
            self._kill()

    def _kill(self) -> None:
        self.killed = True
        if self.proc is None or self.reaped:
            return
        init = self.init_pid
        for target in (init, None):
            try:
                if target:
                    os.kill(target, signal.SIGKILL)
                else:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            raise RuntimeError(f"pod {self.name}: processes {left} outlived its PID namespace")
        self.reaped = True  # its namespace is dead: from now on its inode number may name another pod's
        if self._ns_fd is not None:
            os.close(self._ns_fd)
            self._ns_fd = None

    def exec(self, command: str, *, timeout: float = 60) -> subprocess.CompletedProcess:
        """`kubectl exec POD -- bash -c COMMAND`: run in the pod's namespaces with its env."""
        init = self.init_pid
        if init is None:
            raise RuntimeError(f"pod {self.name} is not running")
        argv = ["nsenter", "--target", str(init), "--mount", "--pid", "--wd", "--",
                "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in self.env.items()], "/bin/bash", "-c", command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def host_path(self, path: str) -> Path:
        """Where a path inside the pod lives on the host (bind-mounted volumes only)."""
        for m in sorted(self.plan["mounts"], key=lambda m: len(m["target"]), reverse=True):
            target = m["target"].rstrip("/")
            if m.get("source") and (path == target or path.startswith(target + "/")):
                return Path(m["source"]) / path[len(target):].lstrip("/")
        raise ValueError(f"{path} is not on a host-backed volume of pod {self.name}")

    def log(self, tail: int = 4000) -> str:
        path = self.folder / "container.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""


def main(plan_path: str) -> None:
    with open(plan_path, encoding="utf-8") as fh:
        plan = json.load(fh)
    scratch_fd = os.open(plan["scratch"], os.O_PATH | os.O_DIRECTORY)
    sources = {}
    for m in plan["mounts"]:
        if m.get("source"):
            sources[m["source"]] = os.open(m["source"], os.O_PATH | os.O_DIRECTORY)
    scratch = f"/proc/self/fd/{scratch_fd}"
    ours: list[str] = []
    counter = [0]
    for m in plan["mounts"]:
        target = m["target"]
        ensure_mountpoint(target, ours=ours, scratch=scratch, counter=counter)
        if m["kind"] == "tmpfs":
            mount("tmpfs", target, "tmpfs", 0, "mode=1777")
        else:
            mount(f"/proc/self/fd/{sources[m['source']]}", target, None, MS_BIND | MS_REC)
        if m.get("readOnly"):
            mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        ours.append(target)
    for fd in (*sources.values(), scratch_fd):
        os.close(fd)
    for folder in plan.get("mkdirs", []):
        os.makedirs(folder, exist_ok=True)
    os.chdir(plan["workdir"])
    sys.stdout.flush()
    os.execvpe(plan["argv"][0], plan["argv"], plan["env"])


if __name__ == "__main__":
    main(sys.argv[1])
