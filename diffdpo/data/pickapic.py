"""Pick-a-Pic (text-to-image preferences) <-> the toolkit's preference sets.

As published (https://huggingface.co/datasets/yuvalkirstain/pickapic_v2; docs/datasets.md): Parquet
shards ``data/<split>-NNNNN-of-NNNNN-<hash>.parquet`` for the splits ``train`` (959,040 rows),
``validation``, ``test``, ``validation_unique``, ``test_unique``, with 19 columns, of which this
adapter reads

    caption    string    the prompt
    jpg_0      binary    image 0, JPEG bytes
    jpg_1      binary    image 1, JPEG bytes
    label_0    float64   1: image 0 preferred, 0: image 1 preferred, 0.5: a tie (no preference)

and, when present, carries ``ranking_id``, ``user_id`` (int64), ``image_0_uid``, ``image_1_uid``,
``model_0``, ``model_1`` (string) into each record's ``meta``. Every other column
(``are_different``, ``best_image_uid``, ``created_at``, ``has_label``, ``image_*_url``, ``label_1``,
``num_example_per_prompt``, ``__index_level_0__``, ...) is ignored. The winner is ``jpg_0`` unless
``label_0 == 0``, as in Salesforce DiffusionDPO's ``train.py`` and the diffusers example. Ties
follow ``ties``: ``"drop"`` (default; Salesforce's ``train.py`` keeps only ``label_0 in (0, 1)``),
``"keep"`` (a record with label 0.5, for losses that use soft labels) or ``"error"``. Rows whose
``label_0`` is null or NaN carry no preference and are dropped and counted (``unlabelled_dropped``);
any other value raises.

Image cells may also be ``{"bytes", "path"}`` structs (a ``datasets`` Image column) or paths relative
to the Parquet file (refused if they escape that folder). Each file's schema is checked before its
first row: a missing column, or one of another Arrow type, raises naming the file and the column.
A directory holding several splits' shards (a hub snapshot) is read for one split, ``train`` by default.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from diffdpo.data.audio_alpaca import (BINARY_OR_PATH, INTEGER, NUMBER, STRING, check_columns, media_bytes,
                                       parquet_files, parquet_rows)
from diffdpo.data.records import read_jsonl, resolve_under
from diffdpo.data.sets import MediaPair, write_media_set

HUB_ID = "yuvalkirstain/pickapic_v2"
COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
META_COLUMNS = ("ranking_id", "user_id", "image_0_uid", "image_1_uid", "model_0", "model_1")
TIE_POLICIES = ("drop", "keep", "error")
LAYOUT = f"Pick-a-Pic layout ({HUB_ID}): caption string, jpg_0/jpg_1 binary, label_0 float64"

_REQUIRED = {"caption": STRING, "jpg_0": BINARY_OR_PATH, "jpg_1": BINARY_OR_PATH, "label_0": NUMBER}
_OPTIONAL = {"ranking_id": INTEGER, "user_id": INTEGER, "image_0_uid": STRING, "image_1_uid": STRING,
             "model_0": STRING, "model_1": STRING}


def read_pickapic(path: str | Path, ties: str = "drop", counts: Counter | None = None,
                  split: str | None = None, info: dict | None = None,
                  on_bad_row: Callable[[str], None] | None = None) -> Iterator[MediaPair]:
    """Pairs of Pick-a-Pic Parquet file(s), winner first.

    ``counts`` (if given) receives ``ties_dropped`` and ``unlabelled_dropped``; ``info`` receives what
    was read (``split``, ``files``). A bad row raises, or with ``on_bad_row`` is handed to it (the
    message names file and row) and skipped; a bad file (columns, types) always raises.
    """
    import pyarrow.parquet as pq

    if ties not in TIE_POLICIES:
        raise ValueError(f"ties: must be one of {TIE_POLICIES}, got {ties!r}")
    files, picked = parquet_files(path, split, "Pick-a-Pic source")
    if info is not None:
        info.update(picked)
    counts = counts if counts is not None else Counter()
    for file in files:
        columns = check_columns(file, pq.read_schema(file), _REQUIRED, _OPTIONAL, LAYOUT)
        for i, row in parquet_rows(file, columns):
            try:
                pair = _pair(file, i, row, ties, counts)
            except ValueError as err:
                if on_bad_row is None:
                    raise
                on_bad_row(str(err))
                continue
            if pair is not None:
                yield pair


def _pair(file: Path, i: int, row: dict, ties: str, counts: Counter) -> MediaPair | None:
    where = f"{file}: row {i}"
    caption = row["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: column 'caption' is empty")
    label = row["label_0"]
    if label is None or (isinstance(label, float) and math.isnan(label)):
        counts["unlabelled_dropped"] += 1
        return None
    if label not in (0, 0.5, 1):
        raise ValueError(f"{where}: column 'label_0' must be 0, 0.5 or 1, got {label!r}")
    if label == 0.5 and ties != "keep":
        if ties == "error":
            raise ValueError(f"{where}: tie (label_0 = 0.5) and ties='error'")
        counts["ties_dropped"] += 1
        return None
    images = [media_bytes(row[c], file.parent, f"{where} {c}", "image") for c in ("jpg_0", "jpg_1")]
    chosen, rejected = images if label >= 0.5 else images[::-1]
    meta = {"source_row": f"{file.stem}:{i}", "label_0": float(label),
            **{k: row[k] for k in META_COLUMNS if row.get(k) is not None}}
    return MediaPair(f"{file.stem}-{i}", caption, chosen, rejected, None, 0.5 if label == 0.5 else 1.0, meta)


def import_pickapic(path: str | Path, out: str | Path, ties: str = "drop", split: str | None = None) -> dict[str, Any]:
    """Pick-a-Pic Parquet -> a preference-set directory; the manifest counts dropped ties and
    unlabelled rows."""
    counts: Counter = Counter()
    source: dict[str, Any] = {"format": "pickapic", "path": str(path), "ties": ties}
    # the reader adds split and file counts to ``source`` before the manifest is written
    manifest = write_media_set(out, read_pickapic(path, ties, counts, split, source), source)
    manifest["ties_dropped"] = counts["ties_dropped"]
    manifest["unlabelled_dropped"] = counts["unlabelled_dropped"]
    return manifest


def export_pickapic(set_dir: str | Path, out_file: str | Path) -> int:
    """A preference set of images -> one Parquet file in the Pick-a-Pic layout (chosen as ``jpg_0``;
    ``label_0`` = the record's label, ``label_1 = 1 - label_0``, so ties stay ties), with the
    published Arrow types; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(set_dir)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for record in read_jsonl(root / "prefs.jsonl"):
        rows["caption"].append(record.prompt)
        rows["jpg_0"].append(resolve_under(root, record.chosen, f"record {record.id!r} chosen").read_bytes())
        rows["jpg_1"].append(resolve_under(root, record.rejected, f"record {record.id!r} rejected").read_bytes())
        rows["label_0"].append(float(record.label))
        rows["label_1"].append(1.0 - float(record.label))
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64())])
    table = pa.Table.from_pydict(rows, schema=schema)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out_file)
    return table.num_rows
