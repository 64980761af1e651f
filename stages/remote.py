"""A folder on an object store: committed without rename, materialised into a verified local mirror.

Commit (`upload_folder`): an object store has no rename, so the folder's marker (a stage output's
manifest.json, a cache folder's files.json, listing every file with its size and sha256) is the commit
marker. An earlier marker is deleted first (the old output is no longer committed), every file is
uploaded under the final prefix, objects no file of the folder accounts for (left by a killed writer)
are removed, and the marker is uploaded last, in one PUT. A writer killed before that last PUT leaves
no marker: readers see nothing and the next run recomputes. Two writers of the same key upload the
same bytes (same inputs, config and code give the same bytes); if they did not, the marker of one and
the files of the other differ in sha256 and readers refuse the output.

Read (`materialise`): the files are downloaded into `stages.fs.local_mirror(prefix)` and each one's
sha256 checked against the marker; a file that differs raises IntegrityError naming the object. The
mirror records the ETag and size the store listed for each object (`.alol-objects.json`); a later read
whose listing shows the same ETags and sizes (one LIST request) re-hashes the local files, as a
local read does, and downloads nothing unless one of them changed; an object replaced or damaged in
the store since (another ETag) is downloaded and checked again.
Processes of one host materialising the same folder take turns (a `flock` on `.<name>.lock` beside
the mirror). Materialised folders beyond the local cache bound (stages.fs.local_cache_bytes) are
evicted, least recently used first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from stages import fs
from stages.faults import failpoint

log = logging.getLogger("alol.io")

MIRROR_RECORD = ".alol-objects.json"
"""In a materialised folder: the marker's sha256 and the ETag and size of every object it was made from."""


class RemoteIntegrityError(RuntimeError):
    """An object in the store that is missing or differs from the marker (stages.io.IntegrityError wraps it)."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a committed folder, as its marker lists it."""

    path: str
    bytes: int
    sha256: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def upload_folder(local: Path, remote: str, files: list[FileEntry], marker: str) -> None:
    """Commit the local folder `local` (its files listed in `files`, its marker file `local/marker`
    already written) as the prefix `remote`; the marker goes last. Leaves a mirror record in `local`,
    so that the folder can become the verified local mirror of `remote` without a download."""
    marker_url = fs.join(remote, marker)
    fs.remove(marker_url)
    for entry in files:
        failpoint("io.upload")
        fs.put_file(local / entry.path, fs.join(remote, entry.path))
    kept = {entry.path for entry in files} | {marker}
    for stray in sorted(set(fs.listing(remote)) - kept):
        log.warning("removing %s, left by an interrupted commit", fs.join(remote, stray))
        fs.remove(fs.join(remote, stray))
    failpoint("io.upload")
    fs.put_file(local / marker, marker_url)
    _write_record(local, (local / marker).read_bytes(), fs.listing(remote))


def _write_record(folder: Path, marker_bytes: bytes, objects: dict[str, fs.ObjectInfo]) -> None:
    record = {
        "marker_sha256": hashlib.sha256(marker_bytes).hexdigest(),
        "bytes": sum(o.size for o in objects.values()),
        "objects": {p: [o.size, o.etag] for p, o in sorted(objects.items())},
    }
    (folder / MIRROR_RECORD).write_text(json.dumps(record), encoding="utf-8")


def materialise(remote: str, files: list[FileEntry], marker: str, marker_bytes: bytes) -> tuple[Path, int]:
    """The verified local mirror of the committed folder `remote` and the bytes downloaded for it."""
    objects = fs.listing(remote)
    for entry in files:
        found = objects.get(entry.path)
        if found is None:
            raise RemoteIntegrityError(f"{fs.join(remote, entry.path)}: listed in {fs.join(remote, marker)} but missing")
        if found.size != entry.bytes:
            raise RemoteIntegrityError(f"{fs.join(remote, entry.path)}: content differs from the sha256 in {fs.join(remote, marker)}")
    mirror = fs.local_mirror(remote)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    # Processes of this host (torchrun ranks, two runs) materialising the same folder take turns.
    with open(mirror.with_name(f".{mirror.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            downloaded = _materialise_locked(remote, mirror, files, marker, marker_bytes, objects)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if downloaded:
        evict(keep=mirror)
    return mirror, downloaded


def _materialise_locked(
    remote: str, mirror: Path, files: list[FileEntry], marker: str, marker_bytes: bytes, objects: dict[str, fs.ObjectInfo]
) -> int:
    if _mirror_matches(mirror, files, marker_bytes, objects) and all(_sha256(mirror / e.path) == e.sha256 for e in files):
        os.utime(mirror / MIRROR_RECORD)
        return 0
    for stale in mirror.parent.glob(f".{mirror.name}.download-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed download (the lock is ours)
    tmp = mirror.with_name(f".{mirror.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    downloaded = 0
    try:
        for entry in files:
            target = tmp / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(fs.join(remote, entry.path), target)
            downloaded += target.stat().st_size
            if target.stat().st_size != entry.bytes or _sha256(target) != entry.sha256:
                raise RemoteIntegrityError(f"{fs.join(remote, entry.path)}: content differs from the sha256 in {fs.join(remote, marker)}")
        (tmp / marker).write_bytes(marker_bytes)
        _write_record(tmp, marker_bytes, {p: objects[p] for p in (e.path for e in files)} | _marker_info(objects, marker))
        install_mirror(tmp, mirror)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return downloaded


def _marker_info(objects: dict[str, fs.ObjectInfo], marker: str) -> dict[str, fs.ObjectInfo]:
    return {marker: objects[marker]} if marker in objects else {}


def _mirror_matches(mirror: Path, files: list[FileEntry], marker_bytes: bytes, objects: dict[str, fs.ObjectInfo]) -> bool:
    try:
        record = json.loads((mirror / MIRROR_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if record.get("marker_sha256") != hashlib.sha256(marker_bytes).hexdigest():
        return False
    seen = record.get("objects", {})
    for entry in files:
        local = mirror / entry.path
        if seen.get(entry.path) != [objects[entry.path].size, objects[entry.path].etag] or not local.is_file() or local.stat().st_size != entry.bytes:
            return False
    return True


def install_mirror(folder: Path, mirror: Path) -> None:
    """Put the verified folder `folder` in place as `mirror` (replacing an older copy)."""
    mirror.parent.mkdir(parents=True, exist_ok=True)
    if mirror.exists():
        old = mirror.with_name(f".{mirror.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(mirror, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, mirror)


def evict(keep: Path | None = None) -> list[Path]:
    """Remove the least recently used materialised folders while the local cache holds more than its bound."""
    records = []
    for record in fs.local_cache_root().rglob(MIRROR_RECORD):
        try:
            size = json.loads(record.read_text(encoding="utf-8")).get("bytes", 0)
            records.append((record.stat().st_mtime, record.parent, size))
        except (OSError, ValueError):
            continue
    total = sum(size for _, _, size in records)
    removed = []
    for _, folder, size in sorted(records, key=lambda r: r[0]):
        if total <= fs.local_cache_bytes():
            break
        if keep is not None and folder == keep:
            continue
        log.info("evicting %s from the local cache (%.1f MB)", folder, size / 1e6)
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed.append(folder)
    return removed


FOLDER_MARKER = "files.json"
"""The commit marker of a shared cache folder on a store (e.g. a converted model): its files, sizes and sha256."""


def shared_folder(url: str, build_locally: Callable[[Path], Path]) -> Path:
    """A local, verified copy of the cache folder `url` (committed with a `files.json` marker); when the
    store has none (or a damaged one), `build_locally(mirror)` makes the folder at the local mirror
    path, and it is committed to `url` for the other workers."""
    marker_url = fs.join(url, FOLDER_MARKER)
    try:
        marker_bytes = fs.read_bytes(marker_url)
    except FileNotFoundError:
        marker_bytes = None
    if marker_bytes is not None:
        files = [FileEntry(**f) for f in json.loads(marker_bytes)["files"]]
        try:
            return materialise(url, files, FOLDER_MARKER, marker_bytes)[0]
        except RemoteIntegrityError as exc:
            log.warning("building %s again: %s", url, exc)
    local = build_locally(fs.local_mirror(url))
    files = [
        FileEntry(p.relative_to(local).as_posix(), p.stat().st_size, _sha256(p))
        for p in sorted(local.rglob("*"))
        if p.is_file() and p.name not in (FOLDER_MARKER, MIRROR_RECORD)
    ]
    (local / FOLDER_MARKER).write_text(json.dumps({"files": [asdict(f) for f in files]}, indent=1), encoding="utf-8")
    upload_folder(local, url, files, FOLDER_MARKER)
    return local
