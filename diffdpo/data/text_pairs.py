"""TRL-style text preference pairs <-> the JSONL the LLM trainer reads (``diffdpo.llm.data``).

TRL's preference layouts, all read here (JSON list, JSONL or Parquet file(s)):

* plain: ``{"prompt": str, "chosen": str, "rejected": str}``;
* conversational: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen``/``rejected``
  lists of assistant messages;
* conversational with an implicit prompt: no ``prompt``; ``chosen`` and ``rejected`` are whole
  conversations, and their shared leading messages are the prompt (split off here, so the rows
  become explicit);
* the same with the prompt also given as text (``HuggingFaceH4/ultrafeedback_binarized``): the
  conversations' shared messages are the prompt, and the text must be their last user message.

Rows come out as ``{"id", "prompt", "chosen", "rejected"}`` (plus ``label`` when it is not 1.0),
the layout the LLM trainer and :class:`~diffdpo.data.records.PreferenceRecord` share for text.
A bad row raises naming its file and row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


def _is_conversation(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


def _load(path: Path) -> Iterator[tuple[str, dict]]:
    files = sorted(p for p in path.glob("**/*") if p.suffix in (".parquet", ".jsonl", ".json")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"text pairs: no .parquet/.jsonl/.json file at {path}")
    for file in files:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(file).to_pylist()
        elif file.suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{file}: row {lineno - 1}: invalid JSON ({e.msg})") from None
        else:
            rows = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise ValueError(f"{file}: expected a JSON list of rows")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{file}: row {i}: expected an object")
            yield f"{file}: row {i}", {"_id": f"{file.stem}-{i}", **row}


def split_implicit_prompt(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) from two whole conversations: the prompt is their shared leading
    messages up to the last non-assistant one; the rest must be assistant messages."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if shared == 0:
        raise ValueError(f"{where}: implicit prompt: chosen and rejected share no leading user/system messages")
    prompt, c, r = chosen[:shared], chosen[shared:], rejected[shared:]
    for side, msgs in (("chosen", c), ("rejected", r)):
        if not msgs or any(m["role"] != "assistant" for m in msgs):
            raise ValueError(f"{where}: implicit prompt: {side} must end in assistant messages after the shared prompt")
    return prompt, c, r


def read_text_pairs(path: str | Path) -> Iterator[dict[str, Any]]:
    """Explicit-prompt rows of a TRL-style source (see the module doc)."""
    for where, row in _load(Path(path)):
        rid = str(row.get("id", row["_id"]))
        where = f"{where} (record {rid!r})"
        chosen, rejected = row.get("chosen"), row.get("rejected")
        prompt = row.get("prompt")
        if (prompt is None or isinstance(prompt, str)) and _is_conversation(chosen) and _is_conversation(rejected):
            text = prompt
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, where)
            if text is not None and text.strip() != prompt[-1]["content"].strip():
                raise ValueError(f"{where}: prompt text is not the conversations' last shared user message")
        for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if value is None:
                raise ValueError(f"{where}: missing {key}")
            if not (isinstance(value, str) and value.strip()) and not _is_conversation(value):
                raise ValueError(f"{where}: {key} must be non-empty text or a list of {{role, content}} messages")
        if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(rejected, str):
            raise ValueError(f"{where}: prompt, chosen and rejected must all be text or all be conversations")
        if chosen == rejected:
            raise ValueError(f"{where}: chosen equals rejected")
        out = {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected}
        label = 1.0 if row.get("label") is None else float(row["label"])
        if not 0.0 <= label <= 1.0:
            raise ValueError(f"{where}: label must lie in [0, 1], got {label}")
        if label != 1.0:
            out["label"] = label
        yield out


def write_text_pairs(rows: list[dict[str, Any]] | Iterator[dict[str, Any]], path: str | Path) -> int:
    """Rows -> JSONL atomically (``.parquet`` suffix: Parquet); returns the number written."""
    path = Path(path)
    rows = list(rows)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: record id {dup!r} appears more than once")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".parquet":
        if len({isinstance(r["prompt"], str) for r in rows}) > 1:
            raise ValueError(f"{path}: Parquet holds one layout per file, and these rows mix text and "
                             "conversations; write JSONL or split them")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return len(rows)


def convert_text_pairs(source: str | Path, out: str | Path) -> int:
    """TRL-style source -> explicit-prompt JSONL (or Parquet) the LLM trainer reads."""
    return write_text_pairs(read_text_pairs(source), out)
