"""Unpaired feedback records, one sample with a thumbs-up or a thumbs-down: what Diffusion-KTO trains on.

A feedback set is a directory with ``feedback.jsonl``, one record a line, and the media it points to:

    {"id": "img-17", "prompt": "a red panda reading", "media": "media/img-17.png", "label": true}

``label`` is JSON ``true`` (desirable: liked, kept) or ``false`` (undesirable), as in the LLM recipe's
unpaired rows (``{"prompt", "completion", "label"}``, diffdpo/llm/data.py); ``media`` is a path relative
to the directory that must stay inside it; an optional ``meta`` object is carried along. A preference
set (``prefs.jsonl``) needs no conversion: with an unpaired loss the diffusion recipe reads each pair's
winner as desirable and its loser as undesirable (:func:`diffdpo.diffusion.data.read_samples`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

FILE_NAME = "feedback.jsonl"


@dataclass
class FeedbackRecord:
    id: str
    prompt: str
    media: str
    label: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "FeedbackRecord":
        """A checked record; ``ValueError`` starting with ``where`` and the record's id otherwise."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}expected a JSON object")
        name = f"{where}record {str(data['id'])!r}" if "id" in data else f"{where}record without id"
        missing = [k for k in ("id", "prompt", "media", "label") if k not in data]
        if missing:
            raise ValueError(f"{name}: missing field(s) {missing}")
        if not isinstance(data["label"], bool):
            raise ValueError(f"{name}: label must be true (desirable) or false (undesirable), got {data['label']!r}")
        for key in ("prompt", "media"):
            if not isinstance(data[key], str) or not data[key].strip():
                raise ValueError(f"{name}: empty {key}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{name}: meta must be an object")
        return cls(str(data["id"]), data["prompt"], data["media"], data["label"], meta)


def read_feedback(path: str | Path, on_bad_row: Callable[[str], None] | None = None) -> Iterator[FeedbackRecord]:
    """Records of a ``feedback.jsonl`` file. A bad line raises naming the file, line and record, or
    with ``on_bad_row`` is handed to it (that message) and skipped."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}: "
            try:
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}invalid JSON ({e.msg})") from None
                record = FeedbackRecord.from_json(data, where)
            except ValueError as err:
                if on_bad_row is None:
                    raise
                on_bad_row(str(err))
                continue
            yield record
