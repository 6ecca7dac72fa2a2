"""A benchmark's result, built piece by piece and optionally streamed as JSON lines while it is measured.

A time-boxed device run kills a benchmark at its limit; whatever it printed before then must survive. So every
benchmark fills a :class:`Report` (``set`` a top-level field, ``row`` a measured row, ``note`` a remark) and,
with ``--jsonl``, each of these is printed and flushed at once as one JSON line:

    {"set": "setup", "value": {...}}     a top-level field (setup, ceilings, ...)
    {"row": {...}}                       one row of the result's "rows", in order; a row whose "key" equals an
                                         earlier row's replaces it in place (a figure completed later)
    {"note": "..."}                      one entry of the result's "notes"
    {"done": true}                       last line: the benchmark ran to its end

:func:`collect` turns such lines back into the result dict (``complete`` False when "done" never came). This
file imports nothing but the standard library, so a reader without torch can load it by path (as
benchmarks/device_summary.py does).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import IO

__all__ = ["Report", "collect"]


class Report:
    """``result`` is {"rows": [...], "notes": [...], **fields}; ``stream`` (optional) gets each piece as a line."""

    def __init__(self, stream: IO[str] | None = None):
        self.result: dict = {"rows": [], "notes": []}
        self._stream = stream

    def _emit(self, line: dict) -> None:
        if self._stream is not None:
            self._stream.write(json.dumps(line) + "\n")
            self._stream.flush()

    def set(self, key: str, value) -> None:
        if key in ("rows", "notes"):
            raise ValueError(f"Report.set: {key!r} is built by row() / note()")
        self.result[key] = value
        self._emit({"set": key, "value": value})

    def row(self, row: dict) -> dict:
        _put_row(self.result["rows"], row)
        self._emit({"row": row})
        return row

    def note(self, text: str) -> None:
        self.result["notes"].append(text)
        self._emit({"note": text})

    def done(self) -> dict:
        """Mark the end (``{"done": true}``) and return the result."""
        self._emit({"done": True})
        return self.result


def _put_row(rows: list[dict], row: dict) -> None:
    """Append ``row``, or replace the earlier row with the same "key"."""
    key = row.get("key") if isinstance(row, dict) else None
    for i, earlier in enumerate(rows):
        if key is not None and isinstance(earlier, dict) and earlier.get("key") == key:
            rows[i] = row
            return
    rows.append(row)


def collect(lines: Iterable[str]) -> dict:
    """The result dict from a Report's JSON lines; lines that are not such JSON (a log, a cut last line) are
    skipped. ``complete`` says whether the benchmark reached its end."""
    result: dict = {"rows": [], "notes": [], "complete": False}
    for line in lines:
        try:
            piece = json.loads(line)
        except ValueError:
            continue
        if not isinstance(piece, dict):
            continue
        if "row" in piece:
            _put_row(result["rows"], piece["row"])
        elif "note" in piece:
            result["notes"].append(piece["note"])
        elif "set" in piece and isinstance(piece["set"], str):
            result[piece["set"]] = piece.get("value")
        elif piece.get("done") is True:
            result["complete"] = True
    return result
