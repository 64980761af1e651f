"""The one filesystem layer: local folders as `pathlib.Path`, object stores (`s3://bucket/prefix`, any
fsspec URL) as URL strings, both through the same few functions.

A location is a `Path` (local, resolved) or a `str` URL (remote); `location(text)` makes one from a
setting such as `run.root`. Remote access goes through fsspec (`s3fs` for `s3://`, the `s3` extra),
with credentials and endpoint from the standard AWS environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION) and `run.storage_options`, which
`configure` hands to fsspec and which is never written anywhere.

Files of a remote location that a library needs on disk (transformers' model folders, DuckDB and
pyarrow reading a stage's tables) are materialised into a local mirror, `local_mirror(location)`:
`<local cache>/<protocol>/<bucket>/<key>`, the same layout as the store, so that relative links
between outputs are the same as in a local run root. The local cache is `ALOL_LOCAL_CACHE`
(default `~/.cache/alol/objects`), bounded by `ALOL_LOCAL_CACHE_GB` (default 20): stages.io evicts
the least recently used materialised outputs beyond it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

Location = Path | str
"""A local folder or file (Path) or a remote URL (str)."""

LOCAL_CACHE_VARIABLE = "ALOL_LOCAL_CACHE"
LOCAL_CACHE_GB_VARIABLE = "ALOL_LOCAL_CACHE_GB"

_storage_options: dict[str, Any] = {}


def configure(storage_options: Mapping[str, Any] | None) -> None:
    """The fsspec options (`run.storage_options`) every remote location of this process is opened with."""
    global _storage_options
    options = dict(storage_options or {})
    if options != _storage_options:
        _storage_options = options
        reset()


def reset() -> None:
    """Forget the opened filesystems, e.g. after the AWS_* environment variables changed."""
    _filesystem.cache_clear()


def is_remote(where: Location) -> bool:
    """Whether `where` is a URL of an object store (not a local path; `file://` counts as local)."""
    return isinstance(where, str) and "://" in where and not where.startswith("file://")


def location(text: str | Path) -> Location:
    """A setting such as `run.root` as a location: a resolved Path, or the URL without a trailing slash."""
    text = str(text)
    if is_remote(text):
        return text.rstrip("/")
    return Path(text.removeprefix("file://")).resolve()


def join(where: Location, *parts: str) -> Location:
    if isinstance(where, Path):
        return where.joinpath(*parts)
    return "/".join([where.rstrip("/"), *(p.strip("/") for p in parts if p)])


def parent(where: Location) -> Location:
    return where.parent if isinstance(where, Path) else where.rstrip("/").rsplit("/", 1)[0]


def relative(where: Location, root: Location) -> str | None:
    """`where` relative to `root` (posix), or None when it is not under it."""
    if isinstance(where, Path) and isinstance(root, Path):
        return where.relative_to(root).as_posix() if where.is_relative_to(root) else None
    where, root = str(where).rstrip("/"), str(root).rstrip("/")
    return where[len(root) + 1:] if where.startswith(root + "/") else None


@lru_cache(maxsize=16)
def _filesystem(protocol: str, options: tuple[tuple[str, Any], ...]) -> Any:
    import fsspec

    try:
        # fsspec's own instance cache is skipped: this cache is the one, and `reset` empties it.
        return fsspec.filesystem(protocol, skip_instance_cache=True, **{k: _unhashable(v) for k, v in options})
    except ImportError as exc:
        raise ImportError(f"{protocol}:// locations need the fsspec backend for {protocol}: pip install 'alol[s3]' ({exc})") from None


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of a remote URL and the URL's path in it (`bucket/key` for s3)."""
    protocol, _, path = url.partition("://")
    return _filesystem(protocol, tuple(sorted((k, _hashable(v)) for k, v in _storage_options.items()))), path


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _unhashable(value: Any) -> Any:
    """The inverse of `_hashable`, for fsspec constructors that want dicts."""
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
        return {k: _unhashable(v) for k, v in value}
    return value


def exists(where: Location) -> bool:
    if isinstance(where, Path):
        return where.exists()
    store, path = filesystem(where)
    return store.exists(path)


def is_file(where: Location) -> bool:
    if isinstance(where, Path):
        return where.is_file()
    store, path = filesystem(where)
    return store.isfile(path)


def read_bytes(where: Location) -> bytes:
    if isinstance(where, Path):
        return where.read_bytes()
    store, path = filesystem(where)
    return store.cat_file(path)


def read_text(where: Location) -> str:
    return read_bytes(where).decode("utf-8")


def write_bytes(where: str, data: bytes) -> None:
    """One PUT: an object store makes a single object visible whole or not at all."""
    store, path = filesystem(where)
    store.pipe_file(path, data)


def put_file(local: Path, where: str) -> None:
    store, path = filesystem(where)
    store.put_file(str(local), path)


def get_file(where: str, local: Path) -> None:
    store, path = filesystem(where)
    store.get_file(path, str(local))


def remove(where: str, recursive: bool = False) -> None:
    """Remove an object (or every object under a prefix); missing is fine."""
    store, path = filesystem(where)
    try:
        store.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says of one object: its size and the store's tag of its content (S3's ETag)."""

    size: int
    etag: str


def listing(where: str) -> dict[str, ObjectInfo]:
    """Every object under the prefix `where`: path relative to it -> size and ETag (one LIST per 1000 objects)."""
    store, path = filesystem(where)
    store.invalidate_cache(path)
    try:
        found = store.find(path, detail=True)
    except FileNotFoundError:
        return {}
    prefix = path.rstrip("/") + "/"
    out = {}
    for key, info in found.items():
        if info.get("type") == "directory" or not key.startswith(prefix):
            continue
        out[key[len(prefix):]] = ObjectInfo(size=int(info.get("size", 0)), etag=str(info.get("ETag") or info.get("etag") or ""))
    return out


def local_cache_root() -> Path:
    return Path(os.environ.get(LOCAL_CACHE_VARIABLE) or Path.home() / ".cache" / "alol" / "objects").expanduser().resolve()


def local_cache_bytes() -> int:
    return int(float(os.environ.get(LOCAL_CACHE_GB_VARIABLE) or 20) * 1e9)


def local_mirror(where: Location) -> Path:
    """Where the files of a remote location are materialised on this machine (a local one is itself)."""
    if isinstance(where, Path):
        return where
    protocol, _, path = where.partition("://")
    return local_cache_root().joinpath(protocol, *[p for p in path.split("/") if p])


PROBE_CONNECT_SECONDS = 5
"""How long the set-up check waits for an object store endpoint to answer."""


def probe_writable(url: str) -> str | None:
    """Why the object store prefix `url` cannot be written (missing credentials, unreachable endpoint,
    missing bucket, no permission), or None. Writes one empty probe object under the prefix and removes
    it again; asks once, without the client's retries, so that a bad set-up fails in seconds."""
    import uuid

    import fsspec

    protocol, _, path = url.partition("://")
    options = dict(_storage_options)
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.update(connect_timeout=PROBE_CONNECT_SECONDS, read_timeout=3 * PROBE_CONNECT_SECONDS, retries={"max_attempts": 1})
        options["config_kwargs"] = config
    probe = f"{path.rstrip('/')}/.alol-probe-{uuid.uuid4().hex[:12]}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or (options.get("client_kwargs") or {}).get("endpoint_url") or options.get("endpoint_url")
    where = f"{url} (endpoint {endpoint})" if endpoint else url
    try:
        store = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        store.pipe_file(probe, b"")
        store.rm_file(probe)
    except ImportError as exc:
        return f"{url}: {protocol}:// needs its fsspec backend: pip install 'alol[s3]' ({exc})"
    except FileNotFoundError as exc:
        return f"{where}: {exc}; create the bucket or correct the URL"
    except PermissionError as exc:
        return f"{where}: cannot write there ({exc}); use credentials allowed to write under the prefix, or another prefix"
    except Exception as exc:  # botocore and the other backends raise their own types
        kind = type(exc).__name__
        if kind in ("NoCredentialsError", "PartialCredentialsError"):
            return f"{url}: no credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or run.storage_options"
        if "Connect" in kind or "Timeout" in kind or isinstance(exc, (ConnectionError, TimeoutError)):
            return f"{where}: the endpoint does not answer ({exc}); check AWS_ENDPOINT_URL (or storage_options) and the network"
        return f"{where}: cannot write there ({kind}: {str(exc).splitlines()[0] if str(exc) else ''}); check the credentials, bucket and endpoint"
    return None
