"""The first process of a clusterbox pod: mount the pod's volumes, then exec its container command.

`clusterbox.Pod` starts it as PID 1 of a fresh mount and PID namespace:

    unshare --mount --pid --fork --mount-proc --kill-child=SIGKILL python -I clusterbox_pod.py PLAN.json

PLAN.json (written by clusterbox on the host) holds `mounts` (in mount order: parents first),
`env`, `workdir` and `argv`. Mount sources are host paths that the new /tmp may cover, so each
one is opened before anything is mounted and mounted through /proc/self/fd/N (mount(2) follows
that link; mount(8) would canonicalise it back to the covered path).

A mount point that does not exist is not created on the host's filesystem: its nearest existing
ancestor gets a copy-on-write overlay (upper layer in the pod's own folder) first, so `mkdir`
lands in the pod alone. The overlay hides any mounts below that ancestor from the pod.

Standard library only: this runs before the pod has a /tmp, with `python -I`.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

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
        counter[0] += 1
        upper, work = (os.path.join(scratch, f"overlay-{counter[0]}-{part}") for part in ("upper", "work"))
        os.makedirs(upper)
        os.makedirs(work)
        mount("overlay", ancestor, "overlay", 0, f"lowerdir={ancestor},upperdir={upper},workdir={work}")
        ours.append(ancestor)
    os.makedirs(path, exist_ok=True)


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
