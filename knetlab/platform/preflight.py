"""Errors no restart can fix, caught early. Before training: every node that can host a worker checks, with its own
environment (credentials, IAM role, endpoint, mounts), that it can read `data.root` and write `storage.uri`. During
training: a storage error no restart can fix (access denied, missing bucket) ends the run at once instead of after
`trainer.max_failures` restarts that fail the same way.

Which nodes: every alive node whose resources can hold one worker, not only the nodes of the trainer's placement
group. Ray Train creates its placement group when the fit starts and a new one on every restart, which may land on
other nodes; a node that cannot use the storage fails the run whenever Ray picks it, so each candidate is checked
(one tiny task a node, all at once). Nodes an autoscaler adds later are not seen here: the in-run check covers them.

Ray Train V2 (checked against Ray 2.60) retries every worker-group error `max_failures` times and has no hook in its
failure policy; an exception raised by a `UserCallback.after_exception` ends the run without retries (the controller
wraps it in a `ControllerError`, which its default policy does not retry). The worker's exception reaches that
callback pickled, without its `raise ... from` chain, so the worker marks a permanent error first
(`mark_permanent_storage_errors`, around the training loop in `trainer.train_loop_entry`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ray.train import UserCallback

from knetlab.object_store import endpoint_url, is_s3, s3_client
from knetlab.platform.ray_internals import wrapped_errors
from knetlab.platform.storage import StorageError, check_storage, split_s3_uri
from knetlab.redact import redact

NODE_CHECK_TIMEOUT_S = 45.0
CREDENTIALS_CAUSE = "this node's AWS credentials or IAM role (the driver's passed), or its AWS_ENDPOINT_URL"
# S3 error codes (boto3's ClientError) no retry or restart can fix: missing or refused credentials, a missing bucket.
PERMANENT_S3_ERROR_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
                                      "SignatureDoesNotMatch", "NoSuchBucket", "InvalidBucketName"})
# The same errors as pyarrow (the AWS C++ SDK, what Ray Train uploads checkpoints with) words them in an OSError:
# "AWS Error ACCESS_DENIED during PutObject operation: ...". Not NETWORK_CONNECTION, SLOW_DOWN, ...: those pass.
_PERMANENT_ARROW_ERROR = re.compile(
    r"AWS Error (ACCESS_DENIED|NO_SUCH_BUCKET|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|INVALID_CLIENT_TOKEN_ID|"
    r"MISSING_AUTHENTICATION_TOKEN|UNRECOGNIZED_CLIENT)\b")
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")


class NodeCheckError(RuntimeError):
    """A node that would host a worker cannot read the data or write the storage; one line naming node and URI."""


class PermanentStorageError(RuntimeError):
    """A storage error no restart can fix, in one line; raised in a worker by `mark_permanent_storage_errors` (or by
    the training loop itself), it ends the run without Ray Train's retries."""


# -- before training: one check task on every node that can host a worker --------------------------------------------
@dataclass
class NodeReport:
    node_id: str
    node_ip: str
    problems: list[str]  # one line each, credentials redacted


def nodes_that_can_host(worker_resources: dict[str, float]) -> list[dict]:
    """The alive nodes of the connected cluster (`ray.nodes()` entries) whose total resources hold one worker."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")
            and all(node.get("Resources", {}).get(name, 0.0) >= amount for name, amount in worker_resources.items())]


def check_this_node(data_root: str, storage_uri: str, task: str = "semantic",
                    list_files: tuple[str | None, str | None] | None = None) -> NodeReport:
    """Run on a node (as a Ray task): can this node, with its own environment, write the storage and read the data?
    Each problem is one line with its likely cause; the driver passed the same checks, so the cause is the node."""
    import ray

    problems = []
    try:
        check_storage(storage_uri)
    except Exception as error:
        # StorageError names the URI already ("storage.uri=...: access denied ..."); anything else gets the URI here.
        message = one_line(error) if isinstance(error, StorageError) else \
            f"storage.uri={redact(storage_uri)}: {one_line(error, with_type=True)}"
        cause = CREDENTIALS_CAUSE if is_s3(storage_uri) else "this node's file system"
        problems.append(f"cannot use {message}; likely cause: {cause}")
    try:
        check_data_readable(data_root, task, list_files)
    except Exception as error:
        # NodeCheckError and DatasetError (a ValueError) are phrased; anything else gets its type.
        message = one_line(error, with_type=not isinstance(error, (NodeCheckError, ValueError)))
        cause = CREDENTIALS_CAUSE if is_s3(data_root) else \
            "the dataset is not at this path on this node (use the same path on every node, or s3://)"
        problems.append(f"cannot read data.root={redact(data_root)}: {message}; likely cause: {cause}")
    return NodeReport(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), problems)


def check_data_readable(root: str, task: str = "semantic",
                        list_files: tuple[str | None, str | None] | None = None) -> None:
    """An s3:// root lists (at least one object under it), a local root has the dataset layout of `task`'s family
    (a semantic dataset's list files, data.train_list and data.val_list, when it has them)."""
    if is_s3(root):
        _check_s3_listable(root)
        return
    from knetlab.platform.tasks import family_named

    if list_files and any(list_files):  # only semantic datasets have list files (the config refuses them elsewhere)
        family_named(task).check_layout(root, list_files)
    else:
        family_named(task).check_layout(root)


def _check_s3_listable(uri: str) -> None:
    import botocore.exceptions

    bucket, prefix = split_s3_uri(uri)
    where = f" at {redact(endpoint_url())}" if endpoint_url() else ""
    client = s3_client(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 2})
    try:
        found = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
    except botocore.exceptions.NoCredentialsError:
        raise NodeCheckError("no AWS credentials found (environment, profile or IAM role)") from None
    except botocore.exceptions.ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "?"))
        raise NodeCheckError(f"S3 error {code} listing bucket {bucket!r}{where}") from None
    except botocore.exceptions.BotoCoreError as error:
        raise NodeCheckError(f"{type(error).__name__} on bucket {bucket!r}{where}") from None
    if not found.get("KeyCount"):
        raise NodeCheckError(f"nothing under it{where}")


def check_worker_nodes(data_root: str, storage_uri: str, worker_resources: dict[str, float],
                       timeout_s: float = NODE_CHECK_TIMEOUT_S, task: str = "semantic",
                       list_files: tuple[str | None, str | None] | None = None) -> list[NodeReport]:
    """Run `check_this_node` on every node that can host a worker, at once; raises NodeCheckError (one line: the
    first failing node, its problem, the likely cause, how many more failed). Returns the nodes' reports; a node that
    does not answer within `timeout_s` is reported with a note and does not fail the run (it may only be slow)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = nodes_that_can_host(worker_resources)
    remote_check = ray.remote(num_cpus=0, max_retries=0)(check_this_node)
    pending = {
        remote_check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
        .remote(data_root, storage_uri, task, list_files): node for node in nodes
    }
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s) if pending else ([], [])
    reports = []
    for ref in done:
        node = pending[ref]
        try:
            reports.append(ray.get(ref))
        except Exception as error:  # the task could not run there (runtime env, import, the node died)
            reports.append(NodeReport(node["NodeID"], node.get("NodeManagerAddress", "?"),
                                      [f"could not run the check: {one_line(innermost_error(error), with_type=True)}"]))
    for ref in late:
        ray.cancel(ref, force=True)
        node = pending[ref]
        print(f"[knetlab] node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:12]}) did not answer the "
              f"storage/data check within {timeout_s:.0f} s; going on", flush=True)
    failed = [report for report in reports if report.problems]
    if failed:
        first = failed[0]
        others = ", ".join(report.node_ip for report in failed[1:])
        more = f" (also failed on {others})" if others else ""
        raise NodeCheckError(f"node {first.node_ip} ({first.node_id[:12]}) {first.problems[0]}{more}")
    return reports


# -- during training: errors no restart can fix ----------------------------------------------------------------------
def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, the errors Ray wrapped in it and the errors it was raised from, each once."""
    seen, stack = set(), [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        yield current
        stack.extend(wrapped_errors(current))  # and WorkerGroupError.worker_failures, a dict by rank:
        stack.extend((getattr(current, "worker_failures", None) or {}).values())
        stack.append(current.__cause__)  # not __context__: an error handled on the way is no cause


def find_permanent_storage_error(error: BaseException) -> BaseException | None:
    """The storage error no restart can fix inside `error` (however Ray wrapped it), or None."""
    for current in _chain(error):
        if isinstance(current, PermanentStorageError):
            return current
        if type(current).__name__ in _NO_CREDENTIALS and type(current).__module__.startswith("botocore"):
            return current
        response = getattr(current, "response", None)  # botocore's ClientError
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in PERMANENT_S3_ERROR_CODES:
            return current
        if isinstance(current, OSError) and _PERMANENT_ARROW_ERROR.search(str(current)):
            return current
    return None


def is_permanent_storage_error(error: BaseException) -> bool:
    """True for access denied, refused or missing credentials and a missing bucket (boto3 or pyarrow), wrapped or
    not: a restart would fail the same way."""
    return find_permanent_storage_error(error) is not None


@contextlib.contextmanager
def mark_permanent_storage_errors() -> Iterator[None]:
    """In a worker: a storage error no restart can fix leaves as a PermanentStorageError naming this node. Ray
    pickles a worker's exception on its way to the Train controller, and pickling drops the chain (`raise ... from`)
    that may be the only place the storage error is (e.g. a DatasetError raised from boto3's AccessDenied)."""
    try:
        yield
    except PermanentStorageError:
        raise
    except Exception as error:
        found = find_permanent_storage_error(error)
        if found is None:
            raise
        import ray

        node = "this node"
        if ray.is_initialized():  # (the runtime context would start a Ray instance otherwise)
            node = f"node {ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]})"
        raise PermanentStorageError(f"{node}: {describe_permanent(found)}") from error


class StopOnPermanentStorageError(UserCallback):
    """Ends the run, without the retries of `trainer.max_failures`, when a worker failed with a storage error no
    restart can fix. Runs in Ray Train's controller."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            found = find_permanent_storage_error(error)
            if found is not None:
                raise PermanentStorageError(f"worker rank {rank}: {describe_permanent(found)} (not retried: a "
                                            "restart would fail the same way)")


def describe_permanent(error: BaseException) -> str:
    """One line for an error `find_permanent_storage_error` found: ours as phrased, others after their type."""
    return one_line(error, with_type=not isinstance(error, PermanentStorageError))


def innermost_error(error: BaseException) -> BaseException:
    """The error the training function itself raised, inside Ray's wrappers (the first failed rank's)."""
    while True:
        failures = getattr(error, "worker_failures", None) or {}
        inner = next(iter(wrapped_errors(error)), next(iter(failures.values()), None))
        if not isinstance(inner, BaseException):
            return error
        error = inner


def describe_failure(error: BaseException) -> str:
    """One line for a failed fit's `result.error` (Ray's text of it holds every worker's traceback): the storage
    error no restart can fix when that ended the run, else the first line of the training function's own error."""
    found = find_permanent_storage_error(error)
    if found is not None:
        return describe_permanent(found)
    return f"{one_line(innermost_error(error), with_type=True)} (tracebacks in Ray's logs: logs/train/ of its session)"


def one_line(error: BaseException, *, with_type: bool = False, limit: int = 400) -> str:
    """The first line of `error`'s message (not the traceback text Ray appends), redacted. A foreign error
    (`with_type`) gets its type in front and is cut at `limit` characters; ours are phrased and kept whole."""
    text = redact(next((line.strip() for line in str(error).splitlines() if line.strip()), ""))
    if not with_type:
        return text
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."
