"""A clone of knetlab is self-contained: no code, test, doc, script, experiment or cluster file names a path outside
the repository (the facts the code relies on are copied into docs/ and tests/)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SEARCHED = ["knetlab", "tests", "docs", "scripts", "experiments", "cluster", ".ci", "README.md", "Makefile",
            "pyproject.toml"]
# Written apart so that this file does not match itself.
OUTSIDE = ["/" + "work/", "../" + "shared", "shared" + "/reference"]


def searched_files() -> list[Path]:
    files = []
    for name in SEARCHED:
        path = REPO_ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        files += [p for p in candidates if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return files


def test_no_path_outside_the_repository() -> None:
    files = searched_files()
    assert len(files) > 50 and REPO_ROOT / "README.md" in files  # the walk sees the repository
    hits = []
    for path in files:
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(pattern in line for pattern in OUTSIDE):
                hits.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert hits == [], "\n".join(hits)


def test_the_facts_cited_in_comments_are_in_the_repository() -> None:
    for name in ("docs/platform-notes.md", "docs/knet_reference.md", "docs/reference-check.md",
                 "tests/test_convert_mmseg_keys/param_counts.json"):
        assert (REPO_ROOT / name).is_file(), name
