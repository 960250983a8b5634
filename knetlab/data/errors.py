"""The error every data module raises for a dataset that cannot be used (its own module, so that the dataset, the
cache and the generator can all raise it without importing each other)."""


class DatasetError(ValueError):
    """A dataset that cannot be used: missing or empty split, unpaired file, unreadable file, bad label value, an
    s3:// copy that failed. The message names the file (or directory, or URI) and what is wrong."""
