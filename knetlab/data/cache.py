"""Dataset roots that live in object storage: `s3://bucket/prefix` is copied once per node into a local cache
directory and read from there; a local root is returned as it is.

A copy is complete only when it sits at its final path, which it reaches by an atomic rename of a finished temp
directory whose completion marker (a manifest of every file) was written last. Workers of one node that start at
once serialise on an `fcntl` lock file next to the copy: the first copies, the others wait and then find it done.
Leftovers of an interrupted copy (a temp directory, a final directory without its marker) are removed and the copy
is redone. A complete copy is reused as it is, without asking S3 again (datasets are immutable by convention;
delete the copy to refresh it). The cache directory must be on a local filesystem (fcntl locks are per node).

The S3 client, its endpoint (MinIO, Ceph, a test server), region and credentials are `knetlab.object_store`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from knetlab.data.errors import DatasetError
from knetlab.file_lock import exclusive_lock
from knetlab.object_store import S3UriError, is_s3, parse_s3_uri, s3_client
from knetlab.redact import redact

COMPLETE_MARKER = ".knetlab-complete.json"
DEFAULT_CACHE_DIR = "~/.cache/knetlab/datasets"
PARTIAL_INFIX = ".partial-"

# progress(files_done, files_total, bytes_done, bytes_total)
Progress = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class CachedDataset:
    """Where an s3:// dataset was put on this node, and whether this call copied it."""

    path: Path
    copied: bool
    files: int
    bytes: int


def dataset_bucket_and_prefix(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without surrounding slashes), as a DatasetError when it is not one."""
    try:
        return parse_s3_uri(uri)
    except S3UriError as error:
        raise DatasetError(str(error)) from None


def cache_path(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local directory an s3:// dataset is copied to: CACHE_DIR/s3/BUCKET/PREFIX."""
    bucket, prefix = dataset_bucket_and_prefix(uri)
    parts = [part for part in PurePosixPath(prefix).parts if part not in ("", ".")]
    if ".." in parts:
        raise DatasetError(f"{uri}: '..' is not allowed in the prefix")
    return Path(cache_dir or os.environ.get("KNETLAB_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser().joinpath(
        "s3", bucket, *parts)


def resolve_dataset_root(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                         progress: Progress | bool | None = True) -> Path:
    """The local directory to read a dataset from: `root` itself, or for `s3://bucket/prefix` its local copy in
    `cache_dir` (default `$KNETLAB_CACHE_DIR` or ~/.cache/knetlab/datasets), made once per node."""
    if is_s3(str(root)):
        return cache_s3_dataset(str(root), cache_dir, progress=progress).path
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset root does not exist (a local directory or an s3://bucket/prefix URI)")
    return path


def cache_s3_dataset(uri: str, cache_dir: str | os.PathLike | None = None, *,
                     progress: Progress | bool | None = True, max_concurrency: int = 16,
                     client=None) -> CachedDataset:
    """Copy every object under `uri` to `cache_path(uri, cache_dir)` unless a complete copy is there already."""
    target = cache_path(uri, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(target.name + ".lock")):
        marker = target / COMPLETE_MARKER
        if marker.is_file():
            manifest = json.loads(marker.read_text())
            return CachedDataset(target, False, len(manifest["files"]), manifest["bytes"])
        # Holding the lock, nothing else is copying: whatever is here is left from an interrupted copy.
        for leftover in target.parent.glob(target.name + PARTIAL_INFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        temp = Path(tempfile.mkdtemp(prefix=target.name + PARTIAL_INFIX, dir=target.parent))
        try:
            files, total_bytes = _download(uri, temp, progress, max_concurrency, client)
            manifest = {"uri": uri, "files": files, "bytes": total_bytes, "pid": os.getpid(),
                        "host": os.uname().nodename, "completed_at": time.time()}
            with open(temp / COMPLETE_MARKER, "w") as handle:
                json.dump(manifest, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(temp, target)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    return CachedDataset(target, True, len(files), total_bytes)


def _list_objects(client, bucket: str, prefix: str, uri: str) -> list[tuple[str, int]]:
    from botocore.exceptions import BotoCoreError, ClientError

    key_prefix = prefix + "/" if prefix else ""
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            objects += [(item["Key"], int(item["Size"])) for item in page.get("Contents", [])
                        if not item["Key"].endswith("/")]  # folder placeholder objects
    except (BotoCoreError, ClientError) as error:
        raise DatasetError(f"{uri}: cannot list the dataset ({type(error).__name__}: {redact(error)})") from error
    if not objects:
        raise DatasetError(f"{uri}: no objects under this prefix")
    return objects


def _download(uri: str, dest: Path, progress: Progress | bool | None, max_concurrency: int,
              client=None) -> tuple[list[str], int]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = dataset_bucket_and_prefix(uri)
    client = client or s3_client()
    objects = _list_objects(client, bucket, prefix, uri)
    total_bytes = sum(size for _, size in objects)
    report = _print_progress(uri) if progress is True else (progress or None)
    done = [0, 0]
    lock = threading.Lock()
    strip = len(prefix) + 1 if prefix else 0

    def fetch(key_and_size: tuple[str, int]) -> str:
        key, size = key_and_size
        relative = PurePosixPath(key[strip:])
        if relative.is_absolute() or ".." in relative.parts:
            raise DatasetError(f"s3://{bucket}/{key}: object key escapes the dataset prefix")
        path = dest.joinpath(*relative.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            with open(path, "wb") as handle:
                shutil.copyfileobj(response["Body"], handle, 1 << 20)
        except (BotoCoreError, ClientError) as error:
            raise DatasetError(f"s3://{bucket}/{key}: download failed ({type(error).__name__}: {redact(error)})"
                               ) from error
        if path.stat().st_size != size:
            raise DatasetError(f"s3://{bucket}/{key}: downloaded {path.stat().st_size} bytes, expected {size}")
        with lock:
            done[0] += 1
            done[1] += size
            if report:
                report(done[0], len(objects), done[1], total_bytes)
        return relative.as_posix()

    with ThreadPoolExecutor(max_workers=max(1, max_concurrency)) as pool:
        files = list(pool.map(fetch, objects))
    return files, total_bytes


def _print_progress(uri: str, interval_s: float = 5.0) -> Progress:
    """A progress report to stderr at most every `interval_s`, and at the end."""
    last = [0.0]
    start = time.monotonic()

    def report(files_done: int, files_total: int, bytes_done: int, bytes_total: int) -> None:
        now = time.monotonic()
        if files_done < files_total and now - last[0] < interval_s:
            return
        last[0] = now
        rate = bytes_done / max(now - start, 1e-9) / 1e6
        print(f"knetlab: caching {uri}: {files_done}/{files_total} files, "
              f"{bytes_done / 1e6:.1f}/{bytes_total / 1e6:.1f} MB ({rate:.1f} MB/s)", file=sys.stderr, flush=True)

    return report
