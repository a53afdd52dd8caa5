"""The toolkit's own preference-record format, shared by the builder, trainers and eval.

A preference set is a directory with ``prefs.jsonl`` (one :class:`PreferenceRecord` per line)
and the media files its records point to. Media paths are relative to the directory and must stay
inside it; text pairs (LLM) hold the text itself. ``label`` is the probability that ``chosen`` is
preferred: 1.0 for a hard preference, 0.5 for a tie (trainers drop ties by default).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator


@dataclass
class PreferenceRecord:
    id: str
    prompt: str
    chosen: str
    rejected: str
    strategy: str | None = None
    label: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str = "") -> None:
        """Raise ``ValueError`` naming the record and the problem."""
        name = f"{where}record {self.id!r}" if self.id else f"{where}record without id"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"{name}: empty prompt")
        for side in ("chosen", "rejected"):
            value = getattr(self, side)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: empty {side}")
        if not 0.0 <= float(self.label) <= 1.0:
            raise ValueError(f"{name}: label must lie in [0, 1], got {self.label}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "") -> "PreferenceRecord":
        missing = [k for k in ("id", "prompt", "chosen", "rejected") if k not in data]
        if missing:
            raise ValueError(f"{where}missing field(s) {missing}")
        known = {k: data[k] for k in ("id", "prompt", "chosen", "rejected", "strategy", "label", "meta") if k in data}
        extra = {k: v for k, v in data.items() if k not in known}
        record = cls(**known)
        record.id = str(record.id)
        record.meta = {**record.meta, **extra}
        record.validate(where)
        return record


def resolve_under(root: str | Path, relative: str, what: str = "path") -> Path:
    """``root / relative``, refusing absolute paths and ``..`` escapes out of ``root``."""
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(root):
        raise ValueError(f"{what} {relative!r} escapes the dataset root {root}")
    return target


def write_json_atomic(path: str | Path, data: Any, indent: int | None = None) -> None:
    """Write JSON to a temp file beside ``path``, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False))
    os.replace(tmp, path)


def parse_line(line: str, where: str = "") -> PreferenceRecord:
    """One JSONL line -> a validated record; ``ValueError`` prefixed with ``where`` otherwise."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}expected a JSON object")
    return PreferenceRecord.from_json(data, where)


def read_jsonl(path: str | Path) -> Iterator[PreferenceRecord]:
    """Records of a JSONL file; a bad line raises with the file and line number."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield parse_line(line, f"{path}:{lineno}: ")


def write_jsonl(records: Iterable[PreferenceRecord], path: str | Path) -> int:
    """Write records atomically (temp file + rename); returns how many were written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            record.validate()
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
