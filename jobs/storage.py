"""Where things live: turning the URIs of a spec into local paths.

Forms accepted everywhere a spec names data, a model, checkpoints or output:

- a plain path or `file:///abs/path` (relative paths are relative to the job file's folder);
- `pvc://claim/sub/path`: a PersistentVolumeClaim the operator mounts at `$POSTTRAIN_PVC_ROOT/claim`
  (default `/mnt/pvc`);
- `s3://bucket/key`, `gs://bucket/key`: object storage through fsspec (install `s3fs` / `gcsfs`);
  inputs are downloaded to the cache, outputs are uploaded when the run ends;
- `hf://org/name[@revision]` (models) and `hf://datasets/org/name` (data): the Hugging Face hub.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

OBJECT_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")


@dataclass(frozen=True)
class Location:
    """A resolved URI: `local` is where to read or write on this machine."""

    uri: str
    local: Path | None  # None for hub references
    remote: str | None = None  # object-storage URI mirrored at `local`
    hub_id: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.hub_id is not None


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def pvc_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_PVC_ROOT", "/mnt/pvc"))


def resolve(uri: str, *, base: Path | None = None) -> Location:
    """Map a URI onto this machine.

    >>> resolve("pvc://ckpt/run1").local.as_posix().endswith("ckpt/run1")
    True
    >>> resolve("hf://HuggingFaceTB/SmolLM2-135M@main").revision
    'main'
    """
    if uri.startswith("hf://"):
        ref = uri[len("hf://") :]
        ref, _, revision = ref.partition("@")
        return Location(uri, None, hub_id=ref, revision=revision or None)
    if uri.startswith("pvc://"):
        return Location(uri, pvc_root() / uri[len("pvc://") :])
    if uri.startswith(OBJECT_SCHEMES):
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        return Location(uri, cache_root() / "objects" / digest / Path(uri.rstrip("/")).name, remote=uri)
    if uri.startswith("file://"):
        return Location(uri, Path(uri[len("file://") :]))
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a path, file://, pvc://, s3://, gs:// or hf://")
    path = Path(uri).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return Location(uri, path)


def _filesystem(remote: str):
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec ships with datasets
        raise RuntimeError("object storage needs fsspec: pip install fsspec") from exc
    protocol = remote.split("://", 1)[0]
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        plugin = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(protocol, protocol)
        raise RuntimeError(f"{remote}: reading {protocol}:// needs the {plugin} package (pip install {plugin})") from exc


def fetch(loc: Location) -> Path:
    """Make an input available locally (downloads object storage once into the cache)."""
    if loc.local is None:
        raise ValueError(f"{loc.uri} is a hub reference, not a file")
    if loc.remote and not loc.local.exists():
        fs = _filesystem(loc.remote)
        loc.local.parent.mkdir(parents=True, exist_ok=True)
        fs.get(loc.remote, str(loc.local), recursive=True)
    return loc.local


def publish(local: Path, loc: Location) -> None:
    """Upload an output folder to object storage (no-op for local and PVC locations)."""
    if loc.remote:
        _filesystem(loc.remote).put(str(local), loc.remote, recursive=True)
