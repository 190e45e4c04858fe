"""Where things live, and the few file operations a run needs on any of them.

URIs accepted everywhere a spec names data, a model, checkpoints or output:

- a plain path or `file:///abs/path` (relative paths are relative to the job file's folder);
- `pvc://claim/sub/path`: a PersistentVolumeClaim the operator mounts at `$POSTTRAIN_PVC_ROOT/claim`
  (default `/mnt/pvc`) in every pod of the job;
- `s3://bucket/key`, `gs://` / `gcs://`, `az://` / `abfs://`: object storage through fsspec (`pip install
  posttrain[s3]` / `[gcs]`, or `adlfs`). Credentials and endpoints come from the environment as those
  libraries read them (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, ...);
  on a cluster pass them with `spec.env` from a Secret;
- `hf://org/name[@revision]` (models) and `hf://datasets/org/name` (data): the Hugging Face hub.

On a cluster every pod has its own filesystem: only PVC paths and object storage are shared, so
every process that writes a result writes it there itself, and every process that reads an input
materialises it on its own pod (`fetch`, cached per pod under `$POSTTRAIN_CACHE`). Writes never leave
half a thing behind: `write_text` replaces a file whole, `publish_tree` puts a finished folder in
place of the old one (the same layout on every rerun), and folders that take several writers (a
checkpoint) count only once a marker, written last, is in them (see `checkpoints`).

    >>> loc = resolve("s3://bucket/runs/a").child("model")
    >>> loc.uri, loc.is_remote
    ('s3://bucket/runs/a/model', True)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from posttrain.api import runtime
from posttrain.api.runtime import OBJECT_SCHEMES

PLUGINS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# Files a tokenizer or config read needs; everything else in a model folder is weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


@dataclass(frozen=True)
class Location:
    """A resolved URI: a filesystem path (`local`), an object-storage URI (`remote`) or a hub id."""

    uri: str  # as the spec (or a parent Location) names it, for messages and summaries
    local: Path | None = None  # plain paths, file:// and pvc://
    remote: str | None = None  # object storage, without a trailing slash
    hub_id: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.hub_id is not None

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    @property
    def address(self) -> str:
        """What a process passes to another to name the same place: the path, or the object-storage URI."""
        if self.remote:
            return self.remote
        if self.local is None:
            raise ValueError(f"{self.uri} is a hub reference, not a place to read or write files")
        return str(self.local)

    def child(self, *names: str) -> Location:
        """The location `names` below this one (`a/b` for child("a", "b"))."""
        rel = "/".join(names)
        uri = f"{self.uri.rstrip('/')}/{rel}" if "://" in self.uri or self.local is None else str(
            self.local.joinpath(*names))
        if self.remote:
            return Location(uri, remote=f"{self.remote}/{rel}")
        if self.local is None:
            raise ValueError(f"{self.uri} is a hub reference; it has no children")
        return Location(uri, local=self.local.joinpath(*names))

    def __str__(self) -> str:
        return self.uri


def cache_root() -> Path:
    return Path(os.environ.get(runtime.CACHE_ENV, Path.home() / ".cache" / "posttrain"))


def pvc_root() -> Path:
    return Path(os.environ.get(runtime.PVC_ROOT_ENV, runtime.PVC_ROOT))


def resolve(uri: str, *, base: Path | None = None) -> Location:
    """Map a URI onto this machine.

    >>> resolve("pvc://ckpt/run1").local.as_posix().endswith("ckpt/run1")
    True
    >>> resolve("hf://HuggingFaceTB/SmolLM2-135M@main").revision
    'main'
    >>> resolve("gs://bucket/out/").remote
    'gs://bucket/out'
    """
    if uri.startswith("hf://"):
        ref, _, revision = uri[len("hf://") :].partition("@")
        return Location(uri, hub_id=ref, revision=revision or None)
    if uri.startswith("pvc://"):
        return Location(uri, local=pvc_root() / uri[len("pvc://") :])
    if uri.startswith(OBJECT_SCHEMES):
        return Location(uri, remote=uri.rstrip("/"))
    if uri.startswith("file://"):
        return Location(uri, local=Path(uri[len("file://") :]))
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a path, file://, pvc://, s3://, gs:// or hf://")
    path = Path(uri).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return Location(uri, local=path)


def filesystem(remote: str):
    """The fsspec filesystem of an object-storage URI, or an error saying which package it needs."""
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec ships with datasets
        raise RuntimeError("object storage needs fsspec: pip install fsspec") from exc
    protocol = remote.split("://", 1)[0]
    try:
        # No listings cache: other pods write the same prefixes (checkpoints, markers) while we read them.
        return fsspec.filesystem(protocol, use_listings_cache=False)
    except (ImportError, ValueError) as exc:
        plugin = PLUGINS.get(protocol, protocol)
        raise RuntimeError(f"{remote}: {protocol}:// needs the {plugin} package (pip install {plugin})") from exc


# --- reading and writing single files -----------------------------------------------------------

def exists(loc: Location) -> bool:
    if loc.remote:
        return filesystem(loc.remote).exists(loc.remote)
    return _path(loc).exists()


def read_text(loc: Location) -> str | None:
    """The file's text, or None when there is none."""
    if loc.remote:
        fs = filesystem(loc.remote)
        try:
            with fs.open(loc.remote, "r") as fh:
                return fh.read()
        except FileNotFoundError:
            return None
    path = _path(loc)
    return path.read_text() if path.is_file() else None


def write_text(loc: Location, text: str) -> None:
    """Replace the file whole: readers see the old content or the new, never half of it."""
    if loc.remote:
        with filesystem(loc.remote).open(loc.remote, "w") as fh:  # an object appears when closed
            fh.write(text)
        return
    path = _path(loc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def list_names(loc: Location) -> list[str]:
    """Names directly below a folder or prefix (empty when it does not exist)."""
    if loc.remote:
        fs = filesystem(loc.remote)
        try:
            entries = fs.ls(loc.remote, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})
    path = _path(loc)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def remove(loc: Location) -> None:
    """Delete a file or a whole folder / prefix; nothing there is fine."""
    if loc.remote:
        fs = filesystem(loc.remote)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(loc.remote, recursive=True)
        return
    path = _path(loc)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- folders -----------------------------------------------------------------------------------

def files_below(folder: Path) -> list[str]:
    """Every file below `folder`, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def upload_tree(src: Path, dest: Location) -> list[str]:
    """Copy every file below `src` to the same relative path below `dest`, file by file (a rerun writes
    the same objects again; fsspec's recursive `put` nests a folder under an existing prefix instead).
    Files already at `dest` that `src` lacks stay (several ranks may fill one folder). Returns the names."""
    names = files_below(src)
    if dest.remote:
        fs = filesystem(dest.remote)
        for rel in names:
            fs.put_file(str(src / rel), f"{dest.remote}/{rel}")
    else:
        root = _path(dest)
        for rel in names:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, target)
    return names


def publish_tree(src: Path, dest: Location) -> None:
    """Put the finished folder `src` at `dest`, replacing what was there, without a moment where neither
    the old nor the new one is whole.

    On a filesystem: copied next to `dest`, then swapped in by renames; the old folder is deleted only
    after the new one is in place. On object storage: every file uploaded (same keys on every run),
    then the keys of an older version that the new one lacks are deleted.
    """
    if dest.remote:
        fs = filesystem(dest.remote)
        names = set(upload_tree(src, dest))
        for key in fs.find(dest.remote):
            rel = str(key).split(dest.remote.split("://", 1)[1].rstrip("/") + "/", 1)[-1]
            if rel not in names:
                fs.rm(key)
        return
    target = _path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    partial = target.with_name(f".{target.name}.partial-{tag}")
    try:
        shutil.copytree(src, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{tag}")
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def download_tree(src: Location, dest: Path, *, skip_suffixes: tuple[str, ...] = ()) -> Path:
    """Copy the folder `src` (object storage or a path) into the local folder `dest`, whole or not at all:
    it is filled under a temporary name and renamed when complete. Returns `dest`."""
    tmp = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        if src.remote:
            fs = filesystem(src.remote)
            prefix = src.remote.split("://", 1)[1].rstrip("/") + "/"
            keys = fs.find(src.remote)
            if not keys:
                raise FileNotFoundError(f"{src.uri}: nothing there")
            for key in keys:
                rel = str(key).split(prefix, 1)[-1]
                if str(key).startswith(prefix) and not rel.endswith(skip_suffixes):
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(key, str(tmp / rel))
        else:
            shutil.copytree(_path(src), tmp, dirs_exist_ok=True,
                            ignore=lambda _d, names: [n for n in names if n.endswith(skip_suffixes)])
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed): several workers of one pod that need the
    same download or conversion do it once, the others wait and reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(loc: Location, *, weights: bool = True) -> Path:
    """An input as a local path on this pod: paths as they are; object storage downloaded once into the
    pod's cache (whole, under a lock). `weights=False` leaves model weights out (enough for a tokenizer
    and config, e.g. on the head, which never loads the model)."""
    if loc.local is not None:
        return loc.local
    if loc.remote is None:
        raise ValueError(f"{loc.uri} is a hub reference, not a file")
    digest = hashlib.sha256(loc.remote.encode()).hexdigest()[:16]
    folder = cache_root() / ("objects" if weights else "objects-light") / digest
    dest = folder / (Path(loc.remote).name or "object")
    with file_lock(folder.with_suffix(".lock")):
        if not dest.exists():
            fs = filesystem(loc.remote)
            if fs.isfile(loc.remote):
                folder.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.partial")
                fs.get_file(loc.remote, str(tmp))
                tmp.rename(dest)
            elif fs.exists(loc.remote):
                download_tree(loc, dest, skip_suffixes=() if weights else WEIGHT_SUFFIXES)
            else:
                raise FileNotFoundError(f"{loc.uri} does not exist")
    return dest


def _path(loc: Location) -> Path:
    if loc.local is None:
        raise ValueError(f"{loc.uri} is not a filesystem path")
    return loc.local
