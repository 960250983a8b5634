"""A split given as a list file of image/label pairs (`data.train_list`, `data.val_list`) instead of ADE20K's folders:
one pair per line, `IMAGE LABEL` separated by whitespace (or by one tab, for paths with spaces), paths relative to
the dataset root unless absolute; blank lines and lines starting with `#` are skipped. The list file itself is
relative to the dataset root too (it travels with the data, also in an s3:// dataset's local copy)."""

from __future__ import annotations

import os
from pathlib import Path

from knetlab.data.errors import DatasetError, raise_problems

Pair = tuple[Path, Path]  # (image file, annotation file)


def list_file_path(list_file: str | os.PathLike, root: str | os.PathLike) -> Path:
    """The list file: `list_file` itself when absolute, else under `root`."""
    path = Path(list_file).expanduser()
    return path if path.is_absolute() else Path(root).expanduser() / path


def read_list_file(list_file: str | os.PathLike, root: str | os.PathLike) -> tuple[list[Pair], list[str]]:
    """The pairs of a list file and every problem in it (a malformed line, a file that does not exist, no pairs);
    a list file that cannot be read at all is a DatasetError."""
    root = Path(root).expanduser()
    path = list_file_path(list_file, root)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{path}: list file does not exist (data.train_list / data.val_list are relative to "
                           f"data.root={root})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read the list file ({type(error).__name__}: {error})") from None
    pairs: list[Pair] = []
    problems: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) != 2 or not all(field.strip() for field in fields):
            problems.append(f"{path}:{lineno}: expected 'IMAGE LABEL' (two paths separated by whitespace or a tab), "
                            f"got {line!r}")
            continue
        image, label = (_resolve(field.strip(), root) for field in fields)
        missing = [f"{what} {file} does not exist" for what, file in (("image", image), ("annotation", label))
                   if not file.is_file()]
        if missing:
            problems.append(f"{path}:{lineno}: {'; '.join(missing)}")
            continue
        pairs.append((image, label))
    if not pairs and not problems:
        problems.append(f"{path}: no image/label pairs (one 'IMAGE LABEL' line per pair)")
    return pairs, problems


def list_file_pairs(list_file: str | os.PathLike, root: str | os.PathLike) -> list[Pair]:
    """The pairs of a list file, in its order; any problem is a DatasetError naming the file and line."""
    pairs, problems = read_list_file(list_file, root)
    raise_problems(problems)
    return pairs


def _resolve(field: str, root: Path) -> Path:
    path = Path(field).expanduser()
    return path if path.is_absolute() else root / path
