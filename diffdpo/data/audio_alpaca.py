"""Audio-Alpaca (Tango 2's preference set) <-> the toolkit's preference sets.

As published (https://huggingface.co/datasets/declare-lab/audio-alpaca; docs/datasets.md): 15,025
rows of ``prompt, chosen, rejected, strategy`` in 20 Parquet shards ``data/train-000NN-of-00020.parquet``::

    prompt    string
    chosen    Audio  = struct<bytes: binary, path: string>   the preferred clip, an encoded audio file
    rejected  Audio  = struct<bytes: binary, path: string>   the other clip
    strategy  string                                         how the pair was made

Read here: ``prompt`` is the record's prompt, the ``bytes`` of ``chosen``/``rejected`` are stored as they
are (no decoding, no resampling; an Audio struct without bytes falls back to its ``path``, relative to
the Parquet file), ``strategy`` is the record's strategy. Any other column is ignored. Each file's schema
is checked before its first row: a missing column, or one of another Arrow type, raises naming the file
and the column; a bad cell raises naming the file, the row and the column.

Copies also circulate as JSON/JSONL rows whose ``chosen``/``rejected`` are paths to audio files relative
to the JSON file; those are read too. A path that escapes the dataset's root is refused.
Writing produces Parquet in the hub layout (Audio structs with the file bytes embedded, and the
``datasets`` feature metadata, so ``datasets.load_dataset("parquet", ...)`` sees Audio columns).

The Parquet helpers here (:func:`parquet_files`, :func:`check_columns`, :func:`parquet_rows`) are
shared with the Pick-a-Pic adapter.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from diffdpo.data.records import read_jsonl, resolve_under
from diffdpo.data.sets import MediaPair, write_media_set

log = logging.getLogger(__name__)

HUB_ID = "declare-lab/audio-alpaca"
COLUMNS = ("prompt", "chosen", "rejected")
"""Columns every row must have; ``strategy`` (published) is read when present."""

# ------------------------------------------------------------------ Parquet in the hub's layout

_SHARD = re.compile(r"^(?P<split>\w+?)-(?P<index>\d{5})-of-(?P<count>\d{5})(?:-[0-9a-f]+)?\.parquet$")
"""A shard as ``push_to_hub`` names it: ``train-00000-of-00020.parquet`` or, in older uploads,
``train-00000-of-00645-b66ac786bf6fb553.parquet``."""


def parquet_files(path: str | Path, split: str | None = None, what: str = "source") -> tuple[list[Path], dict]:
    """The Parquet file(s) at ``path`` and a description of what was picked.

    A file is read as it is. A directory is searched recursively (a hub snapshot keeps its shards
    under ``data/``). When several splits' shards are present (Pick-a-Pic: ``train``, ``validation``,
    ``test``, ``validation_unique``, ``test_unique``), only ``split``'s shards are read, ``train`` by
    default, so a snapshot never mixes evaluation rows into training; other Parquet files beside them
    are then refused, since nothing says which split they belong to. Missing shards (``-of-NNNNN``
    says how many there are) are logged, not refused: a partial download is a legitimate way to try
    a dataset.
    """
    path = Path(path)
    if path.is_file():
        if split is not None:
            raise ValueError(f"{what}: split={split!r} applies to a directory of shards, not to the file {path}")
        return [path], {"files": 1}
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    files = sorted(path.glob("**/*.parquet"))
    if not files:
        raise FileNotFoundError(f"{what}: no Parquet files under {path}")
    shards = {f: _SHARD.match(f.name) for f in files}
    splits = sorted({m["split"] for m in shards.values() if m})
    if not all(shards.values()):
        odd = [str(f.relative_to(path)) for f, m in shards.items() if not m][:3]
        if split is not None or len(splits) > 1:
            raise ValueError(f"{what}: {'split=' + repr(split) if split else 'the splits ' + str(splits)} need(s) "
                             f"every file under {path} named like a hub shard '<split>-00000-of-000NN.parquet'; "
                             f"found others, e.g. {odd} (point at one file, or at a folder of one split)")
        return files, {"files": len(files)}
    chosen = split if split is not None else (splits[0] if len(splits) == 1 else "train")
    if chosen not in splits:
        raise ValueError(f"{what}: no {chosen!r} shards under {path}; splits present: {splits}"
                         + ("" if split is not None else " (pass split=...)"))
    picked = [f for f, m in shards.items() if m["split"] == chosen]
    expected = max(int(shards[f]["count"]) for f in picked)
    if len(picked) != expected:
        log.warning("%s: %d of the %d %r shards are present under %s", what, len(picked), expected, chosen, path)
    return picked, {"split": chosen, "files": len(picked), "shards_expected": expected}


TypeCheck = tuple[Callable[[Any], bool], str]


def _is_string(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)


def _is_binary(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or getattr(pa.types, "is_binary_view", bool)(t)


def _is_media_struct(t) -> bool:
    """``datasets``' Audio / Image storage: ``struct<bytes: binary, path: string>``."""
    import pyarrow as pa

    if not pa.types.is_struct(t) or t.get_field_index("bytes") < 0:
        return False
    return _is_binary(t.field("bytes").type) and (t.get_field_index("path") < 0 or _is_string(t.field("path").type))


def _is_float(t) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(t)


def _is_number(t) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(t) or pa.types.is_integer(t)


STRING: TypeCheck = (_is_string, "string")
BINARY_OR_PATH: TypeCheck = (lambda t: _is_binary(t) or _is_media_struct(t) or _is_string(t),
                             "binary (encoded file bytes), struct<bytes: binary, path: string> or string (a path)")
AUDIO: TypeCheck = (lambda t: _is_media_struct(t) or _is_string(t),
                    "struct<bytes: binary, path: string> (a datasets Audio feature) or string (a path)")
NUMBER: TypeCheck = (_is_number, "a floating-point or integer number")
INTEGER: TypeCheck = (lambda t: _is_number(t) and not _is_float(t), "integer")


def check_columns(file: Path, schema, required: dict[str, TypeCheck], optional: dict[str, TypeCheck],
                  layout: str) -> list[str]:
    """The columns to read from ``file``: every ``required`` one and the ``optional`` ones present,
    each of an accepted Arrow type; ``ValueError`` naming the file and the column otherwise."""
    names = set(schema.names)
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{file}: missing column(s) {missing} ({layout}; columns present: {schema.names})")
    columns = [c for c in required] + [c for c in optional if c in names]
    for column in columns:
        accepts, expected = {**optional, **required}[column]
        actual = schema.field(column).type
        if not accepts(actual):
            raise ValueError(f"{file}: column {column!r} has Arrow type {actual}, expected {expected} ({layout})")
    return columns


def parquet_rows(file: Path, columns: list[str], batch_size: int = 64) -> Iterator[tuple[int, dict]]:
    """``(row index, row)`` of ``file``, reading only ``columns``, a batch at a time (the hub's shards
    are ~0.5 GB; a whole file is never held as Python objects)."""
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=columns):
        for row in batch.to_pylist():
            yield i, row
            i += 1


def media_bytes(cell: Any, root: Path, where: str, kind: str) -> bytes:
    """Encoded media from a cell: bytes, a ``{"bytes", "path"}`` struct (bytes first, else its path), or
    a path; paths are resolved under ``root`` and may not leave it."""
    if isinstance(cell, (bytes, bytearray)):
        if not cell:
            raise ValueError(f"{where}: empty {kind} bytes")
        return bytes(cell)
    if isinstance(cell, dict) and cell.get("bytes"):
        return bytes(cell["bytes"])
    rel = cell.get("path") if isinstance(cell, dict) else cell
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{where}: {kind} cell has neither bytes nor a path")
    path = resolve_under(root, rel, f"{where} path")
    if not path.is_file():
        raise ValueError(f"{where}: {kind} file not found: {path}")
    return path.read_bytes()


# ------------------------------------------------------------------ Audio-Alpaca

LAYOUT = f"Audio-Alpaca layout ({HUB_ID}): prompt string, chosen/rejected Audio, strategy string"
_REQUIRED = {"prompt": STRING, "chosen": AUDIO, "rejected": AUDIO}
_OPTIONAL = {"strategy": STRING}


def _rows(path: Path, split: str | None, info: dict) -> Iterator[tuple[str, str, int, dict, Path]]:
    """(where, file stem, row index, row, media root) of Parquet file(s) or a JSON/JSONL file."""
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        if split is not None:
            raise ValueError(f"Audio-Alpaca source: split={split!r} applies to a directory of shards, not {path}")
        info["files"] = 1
        yield from _json_rows(path)
        return
    files, picked = parquet_files(path, split, "Audio-Alpaca source")
    info.update(picked)
    for file in files:
        if file.suffix != ".parquet":
            raise ValueError(f"{file}: expected .parquet, .json or .jsonl")
        import pyarrow.parquet as pq

        columns = check_columns(file, pq.read_schema(file), _REQUIRED, _OPTIONAL, LAYOUT)
        for i, row in parquet_rows(file, columns):
            yield f"{file}: row {i}", file.stem, i, row, file.parent


def _json_rows(file: Path) -> Iterator[tuple[str, str, int, dict, Path]]:
    if file.suffix == ".jsonl":
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{file}: expected a JSON list of rows")
    for i, row in enumerate(rows):
        where = f"{file}: row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object")
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise ValueError(f"{where}: missing column(s) {missing} ({LAYOUT})")
        yield where, file.stem, i, row, file.parent


def read_audio_alpaca(path: str | Path, split: str | None = None, info: dict | None = None,
                      on_bad_row: Callable[[str], None] | None = None) -> Iterator[MediaPair]:
    """Pairs of an Audio-Alpaca source: a Parquet file, a folder of shards (a hub snapshot), or a
    JSON/JSONL file. ``info`` (if given) receives what was read: ``split``, ``files``. A bad row
    raises, or with ``on_bad_row`` is handed to it (the message names file and row) and skipped."""
    info = info if info is not None else {}
    for where, stem, i, row, root in _rows(Path(path), split, info):
        try:
            prompt = row["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: column 'prompt' is empty")
            strategy = row.get("strategy")
            if strategy is not None and not isinstance(strategy, str):
                raise ValueError(f"{where}: column 'strategy' must be a string, got {type(strategy).__name__}")
            sides = [media_bytes(row[c], root, f"{where} {c}", "audio") for c in ("chosen", "rejected")]
        except ValueError as err:
            if on_bad_row is None:
                raise
            on_bad_row(str(err))
            continue
        yield MediaPair(str(row.get("id", f"{stem}-{i}")), prompt, sides[0], sides[1], strategy, 1.0,
                        {"source_row": f"{stem}:{i}"})


def import_audio_alpaca(path: str | Path, out: str | Path, split: str | None = None) -> dict[str, Any]:
    """Audio-Alpaca source -> a preference-set directory; returns its manifest."""
    source: dict[str, Any] = {"format": "audio_alpaca", "path": str(path)}
    # the reader adds split and file counts to ``source`` before the manifest is written
    return write_media_set(out, read_audio_alpaca(path, split, source), source)


def hub_schema(columns: dict[str, str]):
    """An Arrow schema with ``datasets``' feature metadata (``{"_type": "Audio"}`` etc.), as
    ``push_to_hub`` writes it; ``columns`` maps a name to ``"string"`` or ``"audio"``."""
    import pyarrow as pa

    media = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [(name, pa.string() if kind == "string" else media) for name, kind in columns.items()]
    features = {name: {"dtype": "string", "_type": "Value"} if kind == "string" else {"_type": "Audio"}
                for name, kind in columns.items()}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def export_audio_alpaca(set_dir: str | Path, out_file: str | Path) -> int:
    """A preference set -> one Parquet file in the hub layout; returns the number of rows.

    Pairs whose label is below 0.5 are written with chosen and rejected swapped (Audio-Alpaca has
    no label column); ties are refused, since the layout cannot say "neither".
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(set_dir)
    columns: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "strategy": []}
    for record in read_jsonl(root / "prefs.jsonl"):
        if record.label == 0.5:
            raise ValueError(f"record {record.id!r}: a tie cannot be written in the Audio-Alpaca layout")
        sides = ("chosen", "rejected") if record.label > 0.5 else ("rejected", "chosen")
        columns["prompt"].append(record.prompt)
        for column, side in zip(("chosen", "rejected"), sides):
            rel = getattr(record, side)
            data = resolve_under(root, rel, f"record {record.id!r} {side}").read_bytes()
            columns[column].append({"bytes": data, "path": Path(rel).name})
        columns["strategy"].append(record.strategy)
    schema = hub_schema({"prompt": "string", "chosen": "audio", "rejected": "audio", "strategy": "string"})
    table = pa.Table.from_pydict(columns, schema=schema)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out_file)
    return table.num_rows
