"""Dataset adapters on files written here in the published layouts.

Audio-Alpaca and Pick-a-Pic fixtures are built from ``tests/fixtures/datasets/*.yaml`` (each the
dataset card's features, with its source URL) through ``datasets.Features``: the hub's column names,
Arrow types (Audio = ``struct<bytes: binary, path: string>``, ``jpg_0`` binary, ``label_0`` float64,
``created_at`` timestamp[ns], ...), its ``datasets`` feature metadata and its shard names
(``data/train-00000-of-000NN[-hash].parquet``), with real WAV/FLAC and JPEG bytes made here.
Also: JSON + wav Audio-Alpaca copies, tie and label policies, named errors for missing or
mistyped columns and bad cells, root escapes refused, imported sets pass ``prefs check`` and load
in the trainers' readers; TRL-style text pairs (plain, conversational, implicit prompt)."""

import datetime as dt
import io
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml
from PIL import Image

from diffdpo.data.audio_alpaca import export_audio_alpaca, import_audio_alpaca, read_audio_alpaca
from diffdpo.data.pickapic import META_COLUMNS, export_pickapic, import_pickapic, read_pickapic
from diffdpo.data.records import read_jsonl
from diffdpo.data.sets import media_extension
from diffdpo.data.text_pairs import convert_text_pairs, read_text_pairs, write_text_pairs
from diffdpo.prefs.check import check_preference_set

SR = 16000
FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def tone(freq: float, n: int = 1600) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / SR)).astype(np.float32)


def wav_bytes(x: np.ndarray, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, SR, format=fmt, subtype="FLOAT" if fmt == "WAV" else None)
    return buf.getvalue()


def jpeg_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 255 - value)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 255 - value)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ the published layouts


def published(name: str) -> dict:
    return yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())


def features(spec: dict):
    """The card's features as ``datasets.Features`` (``audio`` -> Audio, any other dtype -> Value)."""
    import datasets

    return datasets.Features({name: datasets.Audio() if dtype == "audio" else datasets.Value(dtype)
                              for name, dtype in spec["features"].items()})


def write_shards(root: Path, spec: dict, split: str, shards: list[list[dict]], schema=None) -> list[Path]:
    """Rows as hub shards ``data/<split>-0000i-of-0000n[-hash].parquet`` with the card's Arrow
    schema (``datasets`` metadata included)."""
    schema = schema if schema is not None else features(spec).arrow_schema
    paths = []
    for i, rows in enumerate(shards):
        name = spec["shard_name"].format(split=split, index=i, shards=len(shards), hash=f"{i + 7:016x}")
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        paths.append(path)
    return paths


def test_fixture_specs_are_the_cards_and_name_what_the_adapters_read():
    alpaca, pap = published("audio_alpaca"), published("pickapic_v2")
    assert list(alpaca["features"]) == ["prompt", "chosen", "rejected", "strategy"]
    assert alpaca["splits"]["train"] == {"num_examples": 15025, "shards": 20}
    assert len(pap["features"]) == 19 and pap["splits"]["train"]["num_examples"] == 959040
    from diffdpo.data import audio_alpaca, pickapic

    assert set(audio_alpaca.COLUMNS) | {"strategy"} == set(alpaca["reads"])
    assert list(pickapic.COLUMNS) == pap["reads"]
    assert set(pickapic.META_COLUMNS) <= set(pap["features"])
    schema = features(alpaca).arrow_schema
    assert schema.field("chosen").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["chosen"] == {"_type": "Audio"}
    schema = features(pap).arrow_schema
    assert (schema.field("jpg_0").type, schema.field("label_0").type, schema.field("created_at").type) == \
        (pa.binary(), pa.float64(), pa.timestamp("ns"))


# ------------------------------------------------------------------ Audio-Alpaca

ALPACA_ROWS = [  # (prompt, chosen wave, rejected wave, rejected format, strategy)
    ("A dog barks followed by a man speaking", tone(440), tone(220), "WAV", "perturbed"),
    ("Rain falls while a bell rings", tone(330), tone(880), "FLAC", "temporal"),
    ("An engine idles and then revs up", tone(550), tone(275), "WAV", "multi_sample"),
]


def alpaca_row(i: int, prompt: str, chosen, rejected, fmt: str, strategy: str) -> dict:
    return {"prompt": prompt, "chosen": {"bytes": wav_bytes(chosen), "path": f"chosen_{i}.wav"},
            "rejected": {"bytes": wav_bytes(rejected, fmt), "path": f"reject_{i}.{fmt.lower()}"},
            "strategy": strategy}


def write_alpaca_snapshot(root: Path) -> list[Path]:
    """A hub snapshot of Audio-Alpaca in miniature: README + 2 shards of the train split."""
    rows = [alpaca_row(i, *r) for i, r in enumerate(ALPACA_ROWS)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\ndataset_info: ...\n---\n")
    return write_shards(root, published("audio_alpaca"), "train", [rows[:2], rows[2:]])


def write_alpaca_parquet(path: Path) -> None:
    """One file with the published schema (what a user gets from one shard)."""
    rows = [alpaca_row(i, *r) for i, r in enumerate(ALPACA_ROWS[:2])]
    pq.write_table(pa.Table.from_pylist(rows, schema=features(published("audio_alpaca")).arrow_schema), path)


def test_audio_alpaca_fixture_loads_as_audio_features_in_datasets(tmp_path):
    import datasets

    shards = write_alpaca_snapshot(tmp_path / "audio-alpaca")
    assert [s.relative_to(tmp_path / "audio-alpaca").as_posix() for s in shards] == \
        ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    ds = datasets.load_dataset("parquet", data_files=[str(s) for s in shards], split="train")
    assert ds.column_names == ["prompt", "chosen", "rejected", "strategy"] and ds.num_rows == 3
    assert isinstance(ds.features["chosen"], datasets.Audio) and isinstance(ds.features["rejected"], datasets.Audio)
    raw = ds.cast_column("chosen", datasets.Audio(decode=False)).cast_column("rejected", datasets.Audio(decode=False))
    assert raw[1]["rejected"]["bytes"][:4] == b"fLaC" and raw[0]["chosen"]["path"] == "chosen_0.wav"


def test_audio_alpaca_snapshot_imports_every_column_as_documented(tmp_path):
    write_alpaca_snapshot(tmp_path / "audio-alpaca")
    pairs = list(read_audio_alpaca(tmp_path / "audio-alpaca"))
    assert [(p.prompt, p.strategy, p.label) for p in pairs] == [(r[0], r[4], 1.0) for r in ALPACA_ROWS]
    assert [p.id for p in pairs] == ["train-00000-of-00002-0", "train-00000-of-00002-1", "train-00001-of-00002-0"]
    assert pairs[1].rejected == wav_bytes(tone(880), "FLAC") and pairs[0].chosen == wav_bytes(tone(440))
    assert pairs[2].meta == {"source_row": "train-00001-of-00002:0"}

    manifest = import_audio_alpaca(tmp_path / "audio-alpaca", tmp_path / "set")
    assert manifest["pairs"] == 3 and manifest["sample_rate"] == SR and manifest["media"] == "audio"
    assert manifest["source"] == {"format": "audio_alpaca", "path": str(tmp_path / "audio-alpaca"),
                                  "split": "train", "files": 2, "shards_expected": 2}
    assert json.loads((tmp_path / "set/manifest.json").read_text())["source"]["split"] == "train"
    assert manifest["pairs_per_strategy"] == {"perturbed": 1, "temporal": 1, "multi_sample": 1}
    records = list(read_jsonl(tmp_path / "set/prefs.jsonl"))
    assert records[1].rejected.endswith(".flac")  # encoded bytes kept as they came
    for record, (_, chosen, rejected, _, _) in zip(records, ALPACA_ROWS):
        got_c, _ = sf.read(tmp_path / "set" / record.chosen, dtype="float32")
        got_r, _ = sf.read(tmp_path / "set" / record.rejected, dtype="float32")
        np.testing.assert_array_equal(got_c, chosen)
        np.testing.assert_allclose(got_r, rejected, atol=1e-4)  # FLAC is 16-bit here
    report = check_preference_set(tmp_path / "set")
    assert report.ok, report.problems
    assert report.sample_rates == {SR: 6}


def test_audio_alpaca_extra_columns_and_missing_strategy(tmp_path):
    """Columns beyond the published four are never read (whatever their type); ``strategy`` may be absent."""
    rows = [{**alpaca_row(0, *ALPACA_ROWS[0]), "extra": [1, 2], "clap": {"w": 0.4, "l": 0.1}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "more.parquet")
    (pair,) = read_audio_alpaca(tmp_path / "more.parquet")
    assert pair.prompt == ALPACA_ROWS[0][0] and pair.meta == {"source_row": "more:0"}
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in rows[0].items() if k != "strategy"}]),
                   tmp_path / "nostrategy.parquet")
    assert next(read_audio_alpaca(tmp_path / "nostrategy.parquet")).strategy is None


def test_audio_alpaca_struct_without_bytes_reads_its_path(tmp_path):
    sf.write(tmp_path / "c.wav", tone(500), SR)
    sf.write(tmp_path / "r.wav", tone(250), SR)
    rows = [{"prompt": "A bell rings", "chosen": {"bytes": None, "path": "c.wav"},
             "rejected": {"bytes": None, "path": "r.wav"}, "strategy": "x"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=features(published("audio_alpaca")).arrow_schema),
                   tmp_path / "paths.parquet")
    (pair,) = read_audio_alpaca(tmp_path / "paths.parquet")
    assert pair.chosen == (tmp_path / "c.wav").read_bytes() and pair.rejected == (tmp_path / "r.wav").read_bytes()


def _alpaca_schema_with(column: str, arrow_type) -> pa.Schema:
    schema = features(published("audio_alpaca")).arrow_schema
    i = schema.get_field_index(column)
    return schema.remove(i) if arrow_type is None else schema.set(i, pa.field(column, arrow_type))


@pytest.mark.parametrize("column, arrow_type, message", [
    ("rejected", None, r"missing column\(s\) \['rejected'\]"),
    ("prompt", None, r"missing column\(s\) \['prompt'\]"),
    ("chosen", pa.binary(), r"column 'chosen' has Arrow type binary, expected struct<bytes: binary, path: string>"),
    ("prompt", pa.int64(), r"column 'prompt' has Arrow type int64, expected string"),
    ("strategy", pa.float64(), r"column 'strategy' has Arrow type double, expected string"),
    ("rejected", pa.struct([("array", pa.list_(pa.float32())), ("sampling_rate", pa.int64())]),
     r"column 'rejected' has Arrow type struct<array: list<.*>, sampling_rate: int64>, expected struct<bytes"),
])
def test_audio_alpaca_missing_or_mistyped_column_names_file_and_column(tmp_path, column, arrow_type, message):
    schema = _alpaca_schema_with(column, arrow_type)
    cells = {"prompt": "x", "strategy": "s", "chosen": {"bytes": wav_bytes(tone(440)), "path": "a.wav"},
             "rejected": {"bytes": wav_bytes(tone(220)), "path": "b.wav"}}
    cells[column] = {"prompt": 3, "strategy": 1.5}.get(column, cells[column])
    if arrow_type == pa.binary():
        cells[column] = cells[column]["bytes"]
    elif arrow_type is not None and pa.types.is_struct(arrow_type):
        cells[column] = {"array": [0.0, 0.1], "sampling_rate": SR}
    table = pa.Table.from_pylist([{k: v for k, v in cells.items() if k in schema.names}], schema=schema)
    shard = tmp_path / "data/train-00003-of-00020.parquet"
    shard.parent.mkdir()
    pq.write_table(table, shard)
    with pytest.raises(ValueError, match=message) as err:
        list(read_audio_alpaca(tmp_path))
    assert str(shard) in str(err.value)


def test_audio_alpaca_bad_cells_are_named_with_file_row_and_column(tmp_path):
    spec = published("audio_alpaca")
    good = alpaca_row(0, *ALPACA_ROWS[0])
    (shard,) = write_shards(tmp_path / "a", spec, "train", [[good, {**good, "prompt": "  "}]])
    with pytest.raises(ValueError, match=r"train-00000-of-00001.parquet: row 1: column 'prompt' is empty"):
        list(read_audio_alpaca(tmp_path / "a"))
    write_shards(tmp_path / "b", spec, "train", [[{**good, "chosen": {"bytes": None, "path": None}}]])
    with pytest.raises(ValueError, match=r"row 0 chosen: audio cell has neither bytes nor a path"):
        list(read_audio_alpaca(tmp_path / "b"))
    write_shards(tmp_path / "c", spec, "train", [[{**good, "rejected": {"bytes": b"not audio", "path": "x"}}]])
    with pytest.raises(ValueError, match=r"pair 'train-00000-of-00001-0' rejected: unrecognised media bytes"):
        import_audio_alpaca(tmp_path / "c", tmp_path / "set")
    assert not (tmp_path / "set/prefs.jsonl").exists()  # nothing half-written points anywhere


def test_audio_alpaca_partial_snapshot_is_read_and_logged(tmp_path, caplog):
    shards = write_alpaca_snapshot(tmp_path / "aa")
    shards[1].unlink()
    with caplog.at_level(logging.WARNING, logger="diffdpo.data.audio_alpaca"):
        manifest = import_audio_alpaca(tmp_path / "aa", tmp_path / "set")
    assert manifest["pairs"] == 2 and manifest["source"]["files"] == 1 and manifest["source"]["shards_expected"] == 2
    assert "1 of the 2 'train' shards are present" in caplog.text


def test_imported_set_is_what_the_diffusion_trainer_reads(tmp_path):
    from diffdpo.diffusion.data import read_pairs

    write_alpaca_parquet(tmp_path / "train.parquet")
    import_audio_alpaca(tmp_path / "train.parquet", tmp_path / "set")
    pairs = read_pairs("jsonl", tmp_path / "set", "audio", lambda m: sf.read(m)[0]).pairs
    assert [p.prompt for p in pairs] == [r[0] for r in ALPACA_ROWS[:2]]
    assert all(Path(p.chosen).is_file() and Path(p.rejected).is_file() for p in pairs)


def test_audio_alpaca_json_with_wav_files(tmp_path):
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio/a.wav", tone(500), SR)
    sf.write(tmp_path / "audio/b.wav", tone(250), SR)
    (tmp_path / "alpaca.json").write_text(json.dumps(
        [{"prompt": "A bell rings", "chosen": "audio/a.wav", "rejected": "audio/b.wav", "strategy": "multi_sample"}]))
    pairs = list(read_audio_alpaca(tmp_path / "alpaca.json"))
    assert pairs[0].id == "alpaca-0" and pairs[0].chosen == (tmp_path / "audio/a.wav").read_bytes()
    assert import_audio_alpaca(tmp_path / "alpaca.json", tmp_path / "set")["pairs"] == 1
    assert check_preference_set(tmp_path / "set").ok


@pytest.mark.parametrize("path", ["../outside.wav", "/etc/passwd", "audio/../../x.wav"])
def test_audio_alpaca_path_escaping_the_root_is_refused(tmp_path, path):
    (tmp_path / "data").mkdir()
    sf.write(tmp_path / "outside.wav", tone(500), SR)
    (tmp_path / "data/alpaca.jsonl").write_text(json.dumps(
        {"prompt": "A bell rings", "chosen": path, "rejected": path}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 chosen path .* escapes the dataset root"):
        list(read_audio_alpaca(tmp_path / "data/alpaca.jsonl"))


def test_audio_alpaca_json_bad_rows_are_named(tmp_path):
    (tmp_path / "missing.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.wav"}) + "\n")
    with pytest.raises(ValueError, match=r"missing.jsonl: row 0: missing column\(s\) \['rejected'\]"):
        list(read_audio_alpaca(tmp_path / "missing.jsonl"))
    (tmp_path / "garbage.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.wav", "rejected": "a.wav"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 chosen: audio file not found"):
        list(read_audio_alpaca(tmp_path / "garbage.jsonl"))
    (tmp_path / "a.txt").write_bytes(b"hello world, not audio")
    (tmp_path / "notaudio.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.txt", "rejected": "a.txt"}) + "\n")
    with pytest.raises(ValueError, match="unrecognised media bytes"):
        import_audio_alpaca(tmp_path / "notaudio.jsonl", tmp_path / "set")


def test_audio_alpaca_export_round_trip_and_datasets_load(tmp_path):
    import datasets

    write_alpaca_snapshot(tmp_path / "aa")
    import_audio_alpaca(tmp_path / "aa", tmp_path / "set")
    assert export_audio_alpaca(tmp_path / "set", tmp_path / "export/train.parquet") == 3
    original = [r for s in sorted((tmp_path / "aa/data").glob("*.parquet")) for r in pq.read_table(s).to_pylist()]
    exported = pq.read_table(tmp_path / "export/train.parquet")
    assert exported.schema.equals(features(published("audio_alpaca")).arrow_schema, check_metadata=True)
    for a, b in zip(original, exported.to_pylist(), strict=True):
        assert (a["prompt"], a["strategy"]) == (b["prompt"], b["strategy"])
        assert a["chosen"]["bytes"] == b["chosen"]["bytes"] and a["rejected"]["bytes"] == b["rejected"]["bytes"]
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "export/train.parquet"), split="train")
    assert ds.column_names == ["prompt", "chosen", "rejected", "strategy"] and ds.num_rows == 3
    assert isinstance(ds.features["chosen"], datasets.Audio)


# ------------------------------------------------------------------ Pick-a-Pic


def pap_row(i: int, label_0: float | None, caption: str | None = None) -> dict:
    """One row with every published column; image 0 and 1 are distinct JPEGs."""
    label_1 = None if label_0 is None else (float("nan") if math.isnan(label_0) else 1.0 - label_0)
    return {
        "are_different": True, "best_image_uid": f"uid-{i}-{0 if label_0 == 1 else 1}",
        "caption": caption if caption is not None else f"a watercolor fox number {i}",
        "created_at": dt.datetime(2023, 5, 1, 12, i), "has_label": label_0 is not None,
        "image_0_uid": f"uid-{i}-0", "image_0_url": f"https://example.org/{i}-0.jpg",
        "image_1_uid": f"uid-{i}-1", "image_1_url": f"https://example.org/{i}-1.jpg",
        "jpg_0": jpeg_bytes(10 * i), "jpg_1": jpeg_bytes(200 + 5 * i),
        "label_0": label_0, "label_1": label_1, "model_0": "sdxl-alpha", "model_1": "dreamlike-photoreal",
        "ranking_id": 1000 + i, "user_id": 77 + i, "num_example_per_prompt": 2, "__index_level_0__": i,
    }


def write_pap_snapshot(root: Path) -> None:
    """pickapic_v2 in miniature: train (2 shards: labels 1, 0, 0.5, NaN, 1) and validation (1 shard)."""
    spec = published("pickapic_v2")
    train = [pap_row(i, lab) for i, lab in enumerate((1.0, 0.0, 0.5, float("nan"), 1.0))]
    write_shards(root, spec, "train", [train[:3], train[3:]])
    write_shards(root, spec, "validation", [[pap_row(9, 0.0, "a validation caption")]])


def test_pickapic_fixture_has_the_published_schema(tmp_path):
    import datasets

    write_pap_snapshot(tmp_path / "pap")
    shard = tmp_path / "pap/data/train-00000-of-00002-0000000000000007.parquet"
    assert shard.is_file()
    schema = pq.read_schema(shard)
    assert schema.names == list(published("pickapic_v2")["features"])
    ds = datasets.load_dataset("parquet", data_files=str(shard), split="train")
    assert ds.features == features(published("pickapic_v2"))
    assert Image.open(io.BytesIO(ds[0]["jpg_0"])).format == "JPEG"


def test_pickapic_snapshot_reads_the_train_split_as_documented(tmp_path):
    write_pap_snapshot(tmp_path / "pap")
    counts, info = Counter(), {}
    pairs = list(read_pickapic(tmp_path / "pap", counts=counts, info=info))
    assert info == {"split": "train", "files": 2, "shards_expected": 2}
    assert counts == {"ties_dropped": 1, "unlabelled_dropped": 1}
    assert [p.prompt for p in pairs] == ["a watercolor fox number 0", "a watercolor fox number 1",
                                         "a watercolor fox number 4"]
    assert pairs[0].chosen == jpeg_bytes(0) and pairs[0].rejected == jpeg_bytes(200)  # label_0 = 1: jpg_0 wins
    assert pairs[1].chosen == jpeg_bytes(205) and pairs[1].rejected == jpeg_bytes(10)  # label_0 = 0: flipped
    assert all(p.label == 1.0 and p.strategy is None for p in pairs)
    assert pairs[1].id == "train-00000-of-00002-0000000000000007-1"
    assert pairs[1].meta == {"source_row": "train-00000-of-00002-0000000000000007:1", "label_0": 0.0,
                             "ranking_id": 1001, "user_id": 78, "image_0_uid": "uid-1-0", "image_1_uid": "uid-1-1",
                             "model_0": "sdxl-alpha", "model_1": "dreamlike-photoreal"}
    assert set(pairs[0].meta) == {"source_row", "label_0", *META_COLUMNS}  # nothing else is carried
    (val,) = read_pickapic(tmp_path / "pap", split="validation")
    assert val.prompt == "a validation caption" and val.chosen == jpeg_bytes(245)
    with pytest.raises(ValueError, match=r"no 'test' shards .* splits present: \['train', 'validation'\]"):
        list(read_pickapic(tmp_path / "pap", split="test"))


def test_pickapic_ties_follow_the_policy(tmp_path):
    write_pap_snapshot(tmp_path / "pap")
    kept = list(read_pickapic(tmp_path / "pap", ties="keep"))
    assert [p.label for p in kept] == [1.0, 1.0, 0.5, 1.0]
    assert kept[2].chosen == jpeg_bytes(20) and kept[2].meta["label_0"] == 0.5  # a tie keeps jpg_0 first
    with pytest.raises(ValueError, match=r"train-00000-of-00002-0000000000000007.parquet: row 2: tie"):
        list(read_pickapic(tmp_path / "pap", ties="error"))
    with pytest.raises(ValueError, match="ties: must be one of"):
        list(read_pickapic(tmp_path / "pap", ties="coin"))


def test_pickapic_import_check_and_export_round_trip(tmp_path):
    write_pap_snapshot(tmp_path / "pap")
    manifest = import_pickapic(tmp_path / "pap", tmp_path / "set", ties="keep")
    assert manifest["pairs"] == 4 and manifest["ties"] == 1 and manifest["media"] == "image"
    assert manifest["unlabelled_dropped"] == 1 and manifest["source"]["split"] == "train"
    assert import_pickapic(tmp_path / "pap", tmp_path / "set2")["ties_dropped"] == 1
    assert check_preference_set(tmp_path / "set").ok
    assert all(r.chosen.endswith(".jpg") for r in read_jsonl(tmp_path / "set/prefs.jsonl"))
    assert export_pickapic(tmp_path / "set", tmp_path / "out.parquet") == 4
    table = pq.read_table(tmp_path / "out.parquet")
    assert [(f.name, f.type) for f in table.schema] == [("caption", pa.string()), ("jpg_0", pa.binary()),
                                                        ("jpg_1", pa.binary()), ("label_0", pa.float64()),
                                                        ("label_1", pa.float64())]
    assert table.column("label_1").to_pylist() == [0.0, 0.0, 0.5, 0.0]
    back = list(read_pickapic(tmp_path / "out.parquet", ties="keep"))
    orig = list(read_pickapic(tmp_path / "pap", ties="keep"))
    assert [(p.prompt, p.chosen, p.rejected, p.label) for p in back] == \
        [(p.prompt, p.chosen, p.rejected, p.label) for p in orig]


def _pap_table(column: str, arrow_type, value) -> pa.Table:
    schema = features(published("pickapic_v2")).arrow_schema
    row = pap_row(0, 1.0)
    i = schema.get_field_index(column)
    if arrow_type is None:
        schema, row = schema.remove(i), {k: v for k, v in row.items() if k != column}
    else:
        schema, row = schema.set(i, pa.field(column, arrow_type)), {**row, column: value}
    return pa.Table.from_pylist([row], schema=schema)


@pytest.mark.parametrize("column, arrow_type, value, message", [
    ("jpg_1", None, None, r"missing column\(s\) \['jpg_1'\]"),
    ("label_0", None, None, r"missing column\(s\) \['label_0'\]"),
    ("caption", None, None, r"missing column\(s\) \['caption'\]"),
    ("label_0", pa.string(), "1", r"column 'label_0' has Arrow type string, expected a floating-point or integer"),
    ("jpg_0", pa.int64(), 5, r"column 'jpg_0' has Arrow type int64, expected binary"),
    ("caption", pa.list_(pa.string()), ["a", "b"], r"column 'caption' has Arrow type list<.*>, expected string"),
    ("ranking_id", pa.string(), "r1", r"column 'ranking_id' has Arrow type string, expected integer"),
    ("model_0", pa.int64(), 3, r"column 'model_0' has Arrow type int64, expected string"),
])
def test_pickapic_missing_or_mistyped_column_names_file_and_column(tmp_path, column, arrow_type, value, message):
    shard = tmp_path / "data/train-00000-of-00001-00000000000000aa.parquet"
    shard.parent.mkdir()
    pq.write_table(_pap_table(column, arrow_type, value), shard)
    with pytest.raises(ValueError, match=message) as err:
        list(read_pickapic(tmp_path))
    assert str(shard) in str(err.value)


@pytest.mark.parametrize("column, arrow_type, value", [
    ("label_0", pa.int64(), 1), ("label_0", pa.float32(), 1.0), ("caption", pa.large_string(), "a fox"),
    ("jpg_0", pa.large_binary(), None), ("label_1", pa.string(), "ignored"), ("has_label", pa.string(), "?"),
])
def test_pickapic_accepts_compatible_types_and_ignores_other_columns(tmp_path, column, arrow_type, value):
    table = _pap_table(column, arrow_type, jpeg_bytes(0) if value is None else value)
    pq.write_table(table, tmp_path / "one.parquet")
    (pair,) = read_pickapic(tmp_path / "one.parquet")
    assert pair.chosen == jpeg_bytes(0) and pair.rejected == jpeg_bytes(200)


def test_pickapic_bad_values_and_paths(tmp_path):
    pq.write_table(pa.Table.from_pylist([pap_row(0, 0.7)], schema=features(published("pickapic_v2")).arrow_schema),
                   tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"c.parquet: row 0: column 'label_0' must be 0, 0.5 or 1, got 0.7"):
        list(read_pickapic(tmp_path / "c.parquet"))
    pq.write_table(pa.Table.from_pylist([pap_row(0, 1.0, caption="")],
                                        schema=features(published("pickapic_v2")).arrow_schema),
                   tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"e.parquet: row 0: column 'caption' is empty"):
        list(read_pickapic(tmp_path / "e.parquet"))
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": ["../../x.png"], "jpg_1": ["y.png"], "label_0": [1.0]}),
                   tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="escapes the dataset root"):
        list(read_pickapic(tmp_path / "b.parquet"))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.png").write_bytes(png_bytes(1))
    (tmp_path / "imgs/b.png").write_bytes(png_bytes(2))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # a datasets Image column
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": pa.array([{"bytes": None, "path": "a.png"}], image),
                             "jpg_1": ["b.png"], "label_0": [0.0]}), tmp_path / "imgs/p.parquet")
    (pair,) = read_pickapic(tmp_path / "imgs/p.parquet")
    assert (pair.chosen, pair.rejected) == (png_bytes(2), png_bytes(1))


def test_pickapic_split_needs_hub_shard_names(tmp_path):
    write_pap_snapshot(tmp_path / "pap")
    pq.write_table(pa.Table.from_pylist([pap_row(0, 1.0)], schema=features(published("pickapic_v2")).arrow_schema),
                   tmp_path / "pap/data/mine.parquet")
    with pytest.raises(ValueError, match=r"split='train' need\(s\) every file .* e.g. \['data/mine.parquet'\]"):
        list(read_pickapic(tmp_path / "pap", split="train"))
    with pytest.raises(ValueError, match=r"the splits \['train', 'validation'\] need\(s\) every file"):
        list(read_pickapic(tmp_path / "pap"))  # which split would mine.parquet be?
    for f in (tmp_path / "pap/data").glob("validation-*"):
        f.unlink()
    assert len(list(read_pickapic(tmp_path / "pap"))) == 4  # one split and other files: every file is read
    with pytest.raises(ValueError, match="applies to a directory"):
        list(read_pickapic(tmp_path / "pap/data/mine.parquet", split="train"))


def test_pickapic_shard_is_what_the_diffusion_trainer_reads(tmp_path):
    """The trainer's own Parquet reader (``data.source: pickapic``) on one shard of the published schema."""
    from diffdpo.diffusion.data import read_pairs

    write_pap_snapshot(tmp_path / "pap")
    shard = tmp_path / "pap/data/train-00000-of-00002-0000000000000007.parquet"
    got = read_pairs("pickapic", shard, "image", lambda m: Image.open(io.BytesIO(m)))
    assert got.dropped_ties == 1 and [p.prompt for p in got.pairs] == ["a watercolor fox number 0",
                                                                       "a watercolor fox number 1"]
    assert got.pairs[1].chosen == jpeg_bytes(205)


def test_media_extension_by_magic_number():
    assert media_extension(wav_bytes(tone(440)), "x") == "wav"
    assert media_extension(wav_bytes(tone(440), "FLAC"), "x") == "flac"
    assert media_extension(png_bytes(0), "x") == "png"
    assert media_extension(jpeg_bytes(0), "x") == "jpg"
    with pytest.raises(ValueError, match="pair 'p' chosen: unrecognised"):
        media_extension(b"nonsense", "pair 'p' chosen")


# ------------------------------------------------------------------ TRL-style text pairs

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What colour is the sky?"}


def test_text_pairs_plain_conversational_and_implicit_prompt(tmp_path):
    rows = [
        {"prompt": "the cat sat", "chosen": " on a mat", "rejected": " on a log"},
        {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "Green."}]},
        {"chosen": [SYSTEM, USER, {"role": "assistant", "content": "Blue."}],
         "rejected": [SYSTEM, USER, {"role": "assistant", "content": "Red."}], "id": "implicit"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = list(read_text_pairs(tmp_path / "pairs.jsonl"))
    assert out[0] == {"id": "pairs-0", **rows[0]}
    assert out[1]["prompt"] == [SYSTEM, USER]
    assert out[2] == {"id": "implicit", "prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "Blue."}],
                      "rejected": [{"role": "assistant", "content": "Red."}]}
    # Parquet in, Parquet and JSONL out: the same rows
    pq.write_table(pa.Table.from_pylist([rows[0]]), tmp_path / "plain.parquet")
    assert list(read_text_pairs(tmp_path / "plain.parquet"))[0]["chosen"] == " on a mat"
    assert convert_text_pairs(tmp_path / "pairs.jsonl", tmp_path / "out.jsonl") == 3
    assert list(read_text_pairs(tmp_path / "out.jsonl")) == out
    write_text_pairs(out[1:], tmp_path / "chat.parquet")
    assert list(read_text_pairs(tmp_path / "chat.parquet")) == out[1:]
    with pytest.raises(ValueError, match="mix text and conversations"):
        write_text_pairs(out, tmp_path / "mixed.parquet")


def test_text_pairs_in_ultrafeedback_binarized_layout(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: ``prompt`` text, ``chosen``/``rejected`` whole
    conversations (user turn included), plus ids, scores and ``messages``, ignored."""
    answer = {"role": "assistant", "content": "Blue."}
    row = {"prompt": USER["content"], "prompt_id": "ab12", "chosen": [USER, answer],
           "rejected": [USER, {"role": "assistant", "content": "Red."}], "messages": [USER, answer],
           "score_chosen": 8.0, "score_rejected": 3.0}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "train_prefs-00000-of-00001.parquet")
    out = list(read_text_pairs(tmp_path / "train_prefs-00000-of-00001.parquet"))
    assert out == [{"id": "train_prefs-00000-of-00001-0", "prompt": [USER], "chosen": [answer],
                    "rejected": [{"role": "assistant", "content": "Red."}]}]
    pq.write_table(pa.Table.from_pylist([{**row, "prompt": "another question"}]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="prompt text is not the conversations' last shared user message"):
        list(read_text_pairs(tmp_path / "bad.parquet"))


def test_converted_text_pairs_load_in_the_llm_trainer(tmp_path):
    import llm_helpers as H
    from diffdpo.llm.data import TokenizeSettings, load_pairs

    H.write_jsonl([{k: v for k, v in r.items() if k != "id"} for r in H.pair_rows(4)], tmp_path / "trl.jsonl")
    convert_text_pairs(tmp_path / "trl.jsonl", tmp_path / "pairs.jsonl")
    examples, report = load_pairs(tmp_path / "pairs.jsonl", H.tokenizer(), TokenizeSettings(max_length=64))
    assert report.kept == 4 and [e.id for e in examples] == ["trl-0", "trl-1", "trl-2", "trl-3"]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "missing rejected"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen equals rejected"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen must be non-empty"),
    ({"prompt": [USER], "chosen": "a", "rejected": "b"}, "all be text or all be conversations"),
    ({"chosen": [USER, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "other"}]},
     "share no leading"),
    ({"chosen": "p a", "rejected": "p b"}, "missing prompt"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "label": 2}, r"label must lie in \[0, 1\]"),
])
def test_text_pairs_bad_rows_are_named(tmp_path, row, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message) as err:
        list(read_text_pairs(tmp_path / "bad.jsonl"))
    assert "bad.jsonl: row 0" in str(err.value)


def test_prefs_import_and_export_commands(tmp_path):
    from diffdpo.cli import main

    write_alpaca_parquet(tmp_path / "train.parquet")
    assert main(["prefs", "import", "audio_alpaca", str(tmp_path / "train.parquet"), str(tmp_path / "set")]) == 0
    assert main(["prefs", "check", str(tmp_path / "set")]) == 0
    assert main(["prefs", "export", "audio_alpaca", str(tmp_path / "set"), str(tmp_path / "out.parquet")]) == 0
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 2
    write_pap_snapshot(tmp_path / "pap")  # a hub snapshot: the train split is read
    assert main(["prefs", "import", "pickapic", str(tmp_path / "pap"), str(tmp_path / "img"), "--ties", "keep"]) == 0
    manifest = json.loads((tmp_path / "img/manifest.json").read_text())
    assert manifest["ties"] == 1 and manifest["pairs"] == 4 and manifest["source"]["split"] == "train"
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert main(["prefs", "import", "trl", str(tmp_path / "t.jsonl"), str(tmp_path / "t_out.jsonl")]) == 0
    assert json.loads((tmp_path / "t_out.jsonl").read_text())["id"] == "t-0"
