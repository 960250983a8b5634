"""Datasets in S3: copied once per node into a local cache and read from there, through a real S3-compatible
server on loopback (moto server mode): concurrent readers copy once, an interrupted copy is redone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from knetlab.data import (
    ADE20KDataset,
    DatasetError,
    build_train_transform,
    cache_path,
    cache_s3_dataset,
    check_split,
    generate_synthetic_ade20k,
    resolve_dataset_root,
)
from knetlab.data.cache import COMPLETE_MARKER

PREFIX = "datasets/ade-synthetic"

# Run in a fresh process: wait for the go file, then cache the dataset; optionally die (SIGKILL) mid-copy.
READER = r"""
import json, os, signal, sys, time
from pathlib import Path
from knetlab.data.cache import cache_s3_dataset

uri, cache_dir, go_file, die_after = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])

def progress(files_done, files_total, bytes_done, bytes_total):
    if die_after and files_done >= die_after:
        os.kill(os.getpid(), signal.SIGKILL)  # an interrupted copy: no cleanup runs

print("ready", flush=True)
while not go_file.exists():
    time.sleep(0.002)
started = time.time()
result = cache_s3_dataset(uri, cache_dir, progress=progress)
print(json.dumps({"pid": os.getpid(), "copied": result.copied, "path": str(result.path), "files": result.files,
                  "started": started, "finished": time.time()}), flush=True)
"""


def upload_tree(s3_server, local: Path, prefix: str) -> int:
    client = s3_server.client()
    count = 0
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), s3_server.bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
            count += 1
    return count


@pytest.fixture
def s3_dataset(s3_server, tmp_path: Path) -> tuple[str, Path, int]:
    """A small synthetic dataset uploaded to s3://knetlab-test/PREFIX; returns (uri, local source, object count)."""
    source = tmp_path / "source"
    generate_synthetic_ade20k(source, num_train=16, num_val=6, num_classes=5, min_side=32, max_side=64, seed=5)
    count = upload_tree(s3_server, source, PREFIX)
    return f"s3://{s3_server.bucket}/{PREFIX}", source, count


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER}


def start_readers(uri: str, cache_dir: Path, tmp_path: Path, die_after: list[int]) -> list[dict]:
    script = tmp_path / "reader.py"
    script.write_text(READER)
    go_file = tmp_path / f"go-{time.monotonic_ns()}"
    processes = [subprocess.Popen([sys.executable, str(script), uri, str(cache_dir), str(go_file), str(n)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
                 for n in die_after]
    for process in processes:  # both are up (imports done) before either starts copying
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
    go_file.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        results.append({"returncode": process.returncode, "stdout": out, "stderr": err})
    return results


def test_read_dataset_from_s3(s3_dataset, tmp_path: Path, capsys: pytest.CaptureFixture):
    uri, source, count = s3_dataset
    cache_dir = tmp_path / "cache"
    root = resolve_dataset_root(uri, cache_dir)
    assert root == cache_path(uri, cache_dir) == cache_dir / "s3" / "knetlab-test" / "datasets" / "ade-synthetic"
    assert tree(root) == tree(source) and len(tree(root)) == count
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    assert marker["uri"] == uri and len(marker["files"]) == count and marker["pid"] == os.getpid()
    assert "files" in capsys.readouterr().err  # progress report (files and bytes) on stderr
    assert len(check_split(root, "training")) == 16
    assert check_split(uri, "validation", cache_dir=cache_dir) == check_split(root, "validation")
    # the Dataset takes the URI itself and reads the node's copy
    dataset = ADE20KDataset(uri, "training", build_train_transform(32, scale=(128, 32)), seed=0, cache_dir=cache_dir)
    assert dataset.root == root / "ADEChallengeData2016"
    item = dataset[3]
    assert item["image"].shape[0] == 3 and tuple(item["label"].shape) == (32, 32)
    assert item["path"].startswith(str(root))
    again = cache_s3_dataset(uri, cache_dir)
    assert not again.copied and again.path == root and again.files == count


def test_two_readers_on_one_node_copy_once(s3_dataset, tmp_path: Path):
    uri, source, count = s3_dataset
    cache_dir = tmp_path / "cache"
    results = start_readers(uri, cache_dir, tmp_path, die_after=[0, 0])
    assert all(r["returncode"] == 0 for r in results), [r["stderr"] for r in results]
    reports = [json.loads(r["stdout"].strip().splitlines()[-1]) for r in results]
    assert sorted(r["copied"] for r in reports) == [False, True]
    copier = next(r for r in reports if r["copied"])
    waiter = next(r for r in reports if not r["copied"])
    assert reports[0]["path"] == reports[1]["path"] == str(cache_path(uri, cache_dir))
    assert waiter["files"] == copier["files"] == count
    root = Path(copier["path"])
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    assert marker["pid"] == copier["pid"]
    assert waiter["started"] < marker["completed_at"] <= waiter["finished"]  # it waited for the copy, then reused it
    assert tree(root) == tree(source)
    assert [p.name for p in root.parent.iterdir() if ".partial-" in p.name] == []


def test_interrupted_copy_is_redone(s3_dataset, tmp_path: Path):
    uri, source, count = s3_dataset
    cache_dir = tmp_path / "cache"
    target = cache_path(uri, cache_dir)
    [killed] = start_readers(uri, cache_dir, tmp_path, die_after=[5])
    assert killed["returncode"] == -9
    leftovers = [p for p in target.parent.iterdir() if ".partial-" in p.name]
    assert len(leftovers) == 1 and not target.exists()  # a half copy, never at the final path
    assert 0 < sum(1 for p in leftovers[0].rglob("*") if p.is_file()) < count
    with pytest.raises(DatasetError, match="dataset root does not exist"):
        resolve_dataset_root(str(target))
    result = cache_s3_dataset(uri, cache_dir, progress=False)
    assert result.copied and tree(target) == tree(source)
    assert not leftovers[0].exists()


def test_final_directory_without_marker_is_redone(s3_dataset, tmp_path: Path):
    uri, source, _ = s3_dataset
    cache_dir = tmp_path / "cache"
    target = cache_path(uri, cache_dir)
    (target / "ADEChallengeData2016" / "images").mkdir(parents=True)
    (target / "ADEChallengeData2016" / "images" / "stale.jpg").write_bytes(b"half")
    result = cache_s3_dataset(uri, cache_dir, progress=False)
    assert result.copied and tree(target) == tree(source)
    # a failure during the copy leaves nothing at the final path and no temp directory
    (target / COMPLETE_MARKER).unlink()

    def fail(files_done, *_):
        if files_done == 3:
            raise RuntimeError("network gone")

    with pytest.raises(RuntimeError, match="network gone"):
        cache_s3_dataset(uri, cache_dir, progress=fail, max_concurrency=1)
    assert not target.exists() and [p for p in target.parent.iterdir() if ".partial-" in p.name] == []


def test_s3_errors_name_the_uri(s3_server, tmp_path: Path):
    empty = f"s3://{s3_server.bucket}/nothing-here"
    with pytest.raises(DatasetError, match=f"{empty}: no objects under this prefix"):
        resolve_dataset_root(empty, tmp_path)
    with pytest.raises(DatasetError, match="s3://no-such-bucket/x: cannot list the dataset"):
        resolve_dataset_root("s3://no-such-bucket/x", tmp_path)
    with pytest.raises(DatasetError, match="no bucket"):
        resolve_dataset_root("s3:///x", tmp_path)
    with pytest.raises(DatasetError, match=r"'\.\.' is not allowed"):
        cache_path("s3://bucket/a/../b", tmp_path)
    assert not any(p.name.endswith(".partial") or ".partial-" in p.name for p in tmp_path.rglob("*"))
    np.testing.assert_equal(len(list((tmp_path / "s3").rglob(COMPLETE_MARKER))), 0)
