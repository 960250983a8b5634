"""The error every data module raises for a dataset that cannot be used, and how problems become one (its own module,
so that the datasets, the list files, the cache and the generators can all raise it without importing each other)."""

from collections.abc import Sequence


class DatasetError(ValueError):
    """A dataset that cannot be used: missing or empty split, unpaired file, unreadable file, bad label value, an
    s3:// copy that failed. The message names the file (or directory, or URI) and what is wrong."""


def raise_problems(problems: Sequence[str], shown: int = 5) -> None:
    """One DatasetError listing the first `shown` problems (and how many more), if there are any."""
    if not problems:
        return
    message = "; ".join(problems[:shown])
    if len(problems) > shown:
        message += f"; and {len(problems) - shown} more problem(s)"
    raise DatasetError(message)


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
