"""SoundWorld splits: deterministic clips by ``(seed, split, index)``, written as wav + JSONL.

Clip ``i`` of split ``s`` is ``make_clip([seed, SPLIT_IDS[s], i])``, so splits never share a
clip, any clip can be regenerated alone, and growing a split keeps its earlier clips. On disk::

    OUT/train.jsonl  OUT/validation.jsonl  OUT/test.jsonl
    OUT/audio/<split>/<id>.wav        16 kHz mono float

Each JSONL line: ``id, split, seed, caption, kind, events, timeline [{event, start, end}], path``
(``path`` relative to the JSONL's folder), loadable with ``datasets.load_dataset("json", ...)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from diffdpo.worlds.soundworld.events import SAMPLE_RATE
from diffdpo.worlds.soundworld.scenes import KINDS, Scene, TimelineEntry, make_clip, sample_scene

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def clip_seed(seed: int, split: str, index: int) -> list[int]:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_IDS)}")
    return [int(seed), SPLIT_IDS[split], int(index)]


def iter_clips(seed: int, split: str, n: int, start: int = 0) -> Iterator[tuple[Scene, np.ndarray]]:
    """Clips ``start .. start + n - 1`` of ``split``."""
    for i in range(start, start + n):
        yield make_clip(clip_seed(seed, split, i))


def clips(seed: int, split: str, n: int, start: int = 0) -> tuple[list[Scene], np.ndarray]:
    """Scenes and stacked audio ``[n, samples]`` of ``split``."""
    scenes, audio = zip(*iter_clips(seed, split, n, start)) if n else ((), ())
    return list(scenes), np.stack(audio) if n else np.zeros((0, 0), np.float32)


def split_scenes(seed: int, split: str, n: int, kinds: list[str] | None = None) -> list[Scene]:
    """The first ``n`` scenes of ``split`` whose kind is in ``kinds`` (all kinds if empty), without
    rendering audio: clip ``i``'s scene is the first draw of its seed, as in :func:`make_clip`."""
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown scene kind(s) {unknown}; expected some of {list(KINDS)}")
    scenes, i = [], 0
    while len(scenes) < n:
        scene = sample_scene(np.random.default_rng(clip_seed(seed, split, i)))
        if not kinds or scene.kind in kinds:
            scenes.append(scene)
        i += 1
    return scenes


def write_split(out: str | Path, split: str, n: int, seed: int, progress: bool = True) -> Path:
    """Render ``n`` clips of ``split`` under ``out``; the JSONL is written last, atomically."""
    import soundfile as sf
    from tqdm import tqdm

    out = Path(out)
    audio_dir = out / "audio" / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, audio) in enumerate(tqdm(iter_clips(seed, split, n), total=n, desc=split, disable=not progress)):
        clip_id = f"{split}-{i:06d}"
        rel = Path("audio") / split / f"{clip_id}.wav"
        sf.write(out / rel, audio, SAMPLE_RATE, subtype="FLOAT")
        lines.append(json.dumps({"id": clip_id, "split": split, "seed": clip_seed(seed, split, i),
                                 **scene.as_dict(), "path": str(rel)}))
    jsonl = out / f"{split}.jsonl"
    tmp = jsonl.with_suffix(f".jsonl.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + ("\n" if lines else ""))
    os.replace(tmp, jsonl)
    return jsonl


def read_split(jsonl: str | Path) -> list[dict]:
    """Records of a written split, each checked for the fields it must have."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise FileNotFoundError(f"SoundWorld split not found: {jsonl}")
    records = []
    for n, line in enumerate(jsonl.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{jsonl}:{n}: not JSON ({e})") from None
        missing = [k for k in ("id", "caption", "kind", "events", "timeline", "path") if k not in rec]
        if missing:
            raise ValueError(f"{jsonl}:{n} (id {rec.get('id', '?')}): missing field(s) {missing}")
        records.append(rec)
    return records


def scene_of(record: dict) -> Scene:
    """The :class:`Scene` of a JSONL record."""
    return Scene(record["kind"], tuple(record["events"]), record["caption"],
                 tuple(TimelineEntry(t["event"], t["start"], t["end"]) for t in record["timeline"]))
