"""The benchmark files shipped in ``src/eval/data`` (see PROVENANCE.md there): checked, then parsed.

Every load hashes the file first and refuses a file whose sha256 differs from :data:`FILES`
(the same table as PROVENANCE.md), naming the file.  Parsing reports the file and the line of
a malformed record, and of a record that lacks a field the task reads.  Results are cached per
process (the files are read-only data).
"""
from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["DATA_DIR", "FILES", "DataFileError", "load_records", "read_records", "sha256_of"]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# path relative to DATA_DIR -> (sha256 of the stored bytes, number of records)
FILES: dict[str, tuple[str, int]] = {
    "gsm8k/test.jsonl": ("3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 1319),
    "gsm8k/train.jsonl": ("17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 7473),
    "math500/test.jsonl": ("35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132", 500),
    "mbpp/mbpp.jsonl": ("ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f", 974),
    "mbpp/sanitized-mbpp.json": ("ca95deaa9a01ef0a6f439f88bcf0dd3db3563d22f22aad6cae04ebb9a8d8c8e9", 427),
    "humaneval/HumanEval.jsonl.gz": ("b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef", 164),
}


class DataFileError(ValueError):
    """A shipped data file is missing, altered (sha256) or malformed (file and line named)."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_records(path: Path, required: Iterable[str] = (), sha256: Optional[str] = None,
                 count: Optional[int] = None) -> list[dict]:
    """Records of a ``.jsonl``, ``.jsonl.gz`` (one JSON object a non-empty line) or ``.json``
    (one top-level array of objects) file, checked against ``sha256`` and ``count`` when given.

    Raises :class:`DataFileError` naming the file (and the line of a bad record).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: benchmark data file not found: {_restore_hint(path)}")
    if sha256 is not None:
        got = sha256_of(path)
        if got != sha256:
            raise DataFileError(f"{path}: sha256 {got} does not match the recorded {sha256}; the file was "
                                f"altered or replaced: {_restore_hint(path)}")
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataFileError(f"{path}: not a readable gzip file ({e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFileError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    required = tuple(required)
    records: list[tuple[int, object]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(data, list):
            raise DataFileError(f"{path}:1: expected a top-level JSON array of records")
        records = [(1, r) for r in data]  # one array: every record reports line 1 of a one-line file
    else:
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{n}: malformed JSON line ({e.msg}, column {e.colno})") from None
    out = []
    for i, (n, rec) in enumerate(records):
        where = f"{path}:{n}" + (f" (record {i})" if path.suffix == ".json" else "")
        if not isinstance(rec, dict):
            raise DataFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise DataFileError(f"{where}: record lacks field(s) {', '.join(missing)}")
        out.append(rec)
    if count is not None and len(out) != count:
        raise DataFileError(f"{path}: {len(out)} records, expected {count}")
    return out


def _restore_hint(path: Path) -> str:
    """How to get a shipped file back, from inside this repository (or package)."""
    try:
        rel = f"src/eval/data/{path.resolve().relative_to(DATA_DIR).as_posix()}"
    except ValueError:  # not a shipped file (a test's copy)
        return "restore the original (sources and sha256 in src/eval/data/PROVENANCE.md)"
    return (f"restore it with `git checkout -- {rel}` in the repository, or reinstall the package "
            f"(sources and sha256 in src/eval/data/PROVENANCE.md)")


@lru_cache(maxsize=None)
def _load(rel: str, required: tuple[str, ...]) -> tuple[dict, ...]:
    sha, count = FILES[rel]
    return tuple(read_records(DATA_DIR / rel, required, sha, count))


def load_records(rel: str, required: Iterable[str] = ()) -> list[dict]:
    """The checked records of the shipped file ``rel`` (a key of :data:`FILES`).

    The returned dicts are shared (cached); treat them as read-only.
    """
    if rel not in FILES:
        raise DataFileError(f"{rel}: not a shipped data file; valid choices: {', '.join(sorted(FILES))}")
    return list(_load(rel, tuple(required)))
