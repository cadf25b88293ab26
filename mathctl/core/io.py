"""Small file helpers: atomic writes, JSONL that names the bad line, append-only records."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mathctl.core.errors import DataError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record) from a JSONL file; blank lines are skipped.

    Raises:
        DataError: the file is missing, or a line is not a JSON object (names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist", hint="check the path (data.source in the recipe)")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {number}: malformed JSON ({exc.msg} at column {exc.colno})",
                    hint=f"fix or delete line {number}; every line must be one JSON object",
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}",
                                hint="every line must be one JSON object such as {\"messages\": [...]}")
            yield number, record


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [record for _, record in iter_jsonl(path)]


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record and flush it, so an interrupted run keeps everything written so far."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False, default=float) + "\n")
        handle.flush()


def read_appended(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a JSONL file a run appends to as it goes (eval's results.jsonl). A last line cut by a
    kill is dropped (and, with `repair`, removed from the file, so appending continues on a clean line);
    a bad line elsewhere is an error. A missing file has no records.

    Raises:
        DataError: a line other than the last is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number:]):
                raise DataError(f"{path} line {number}: malformed JSON in the middle of the results",
                                hint="delete that line (its record is made again on --resume)") from None
            if repair:
                atomic_write_text(path, "".join(f"{kept}\n" for kept in lines[: number - 1] if kept.strip()))
            return records
    if repair and text and not text.endswith("\n"):  # a whole record whose newline was cut: appends go on a new line
        with path.open("a", encoding="utf-8") as handle:
            handle.write("\n")
    return records
