"""Preference pairs for Diffusion-DPO, and unpaired samples for Diffusion-KTO: read, check once up
front, and order deterministically.

Sources (``data.source``):

* ``jsonl``        — the toolkit's own set: ``<path>/prefs.jsonl`` of :class:`PreferenceRecord`, media
  paths relative to ``<path>`` (``diffdpo.data.records``).
* ``pickapic``     — Pick-a-Pic Parquet file(s) or a hub snapshot folder (``yuvalkirstain/pickapic_v2``;
  read by :func:`diffdpo.data.pickapic.read_pickapic`, columns in docs/datasets.md).
* ``audio_alpaca`` — Audio-Alpaca Parquet file(s), a hub snapshot folder (``declare-lab/audio-alpaca``) or
  JSON rows with audio paths (:func:`diffdpo.data.audio_alpaca.read_audio_alpaca`).
* ``toy``          — a separable toy set written by :func:`write_toy_pairs` (smooth winner, noise loser).

Unpaired losses (``kto``) read :class:`Sample` s instead (:func:`read_samples`): from ``feedback`` —
``<path>/feedback.jsonl`` of :class:`~diffdpo.data.feedback.FeedbackRecord` (thumbs-up/down data) —
or from any pair source above, each pair's winner desirable and its loser undesirable.

Ties (label 0.5) are dropped by default (``ties="drop"``, as the Diffusion-DPO paper did) or
rejected (``ties="error"``). Every record is checked before training starts (caption present,
media readable); ``on_bad_record="error"`` raises naming the record, ``"skip"`` drops it, counts it
and logs each one — never a crash hours in, never a silent drop.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffdpo.data.records import PreferenceRecord, read_jsonl, resolve_under, write_jsonl

log = logging.getLogger(__name__)

Media = Path | bytes


@dataclass
class Pair:
    id: str
    prompt: str
    chosen: Media
    rejected: Media

    @property
    def sides(self) -> tuple[Media, Media]:
        return self.chosen, self.rejected


@dataclass
class PairSet:
    pairs: list[Pair]
    dropped_ties: int = 0
    skipped: int = 0


@dataclass
class Sample:
    """One unpaired sample and its label: desirable (a thumbs-up, a pair's winner) or undesirable."""

    id: str
    prompt: str
    media: Media
    desirable: bool

    @property
    def sides(self) -> tuple[Media]:
        return (self.media,)


@dataclass
class SampleSet:
    samples: list[Sample]
    dropped_ties: int = 0
    skipped: int = 0
    won_and_lost: int = 0


def read_pairs(source: str, path: str | Path, media: str, load_media: Callable[[Media], torch.Tensor],
               ties: str = "drop", on_bad_record: str = "error", max_pairs: int | None = None) -> PairSet:
    """Read and check every pair; ``load_media`` is the model's reader (decode failures = bad record)."""
    if ties not in ("drop", "error"):
        raise ValueError(f"data.ties: must be 'drop' or 'error', got {ties!r}")
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"data.on_bad_record: must be 'error' or 'skip', got {on_bad_record!r}")
    readers = {"jsonl": _jsonl, "toy": _jsonl, "pickapic": _pickapic, "audio_alpaca": _audio_alpaca}
    if source not in readers:
        raise ValueError(f"data.source: unknown {source!r}; valid: {sorted(readers)}")
    out = PairSet([])

    def skip(message: str) -> None:
        out.skipped += 1
        log.warning("skipping bad record (%d so far): %s", out.skipped, message)

    on_bad_row = skip if on_bad_record == "skip" else None
    for where, rec in readers[source](Path(path), on_bad_row):
        if rec is None:
            continue
        label = float(rec.get("label", 1.0))
        if label == 0.5:
            if ties == "error":
                raise ValueError(f"{where}: tie (label 0.5) and data.ties=error")
            out.dropped_ties += 1
            continue
        try:
            pair = _check(where, rec, label, load_media)
        except ValueError as err:
            if on_bad_row is None:
                raise
            skip(str(err))
            continue
        out.pairs.append(pair)
        if max_pairs and len(out.pairs) >= max_pairs:
            break
    if not out.pairs:
        raise ValueError(f"{path}: no usable pairs ({out.dropped_ties} ties dropped, {out.skipped} bad records)")
    if out.skipped or out.dropped_ties:
        log.warning("%s: %d pairs, %d ties dropped, %d bad records skipped", path, len(out.pairs), out.dropped_ties,
                    out.skipped)
    return out


def _check(where: str, rec: dict, label: float, load_media) -> Pair:
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: empty caption")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if label < 0.5:
        chosen, rejected = rejected, chosen
    for side, m in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(m, Path) and not m.is_file():
            raise ValueError(f"{where}: {side} media file not found: {m}")
        try:
            load_media(m)
        except Exception as err:  # any decoder failure is this record's problem
            raise ValueError(f"{where}: {side} media unreadable ({type(err).__name__}: {err})") from None
    return Pair(str(rec["id"]), prompt, chosen, rejected)


def _jsonl(path: Path, on_bad_row):
    root = path if path.is_dir() else path.parent
    file = path / "prefs.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"data.path: no preference file at {file}")
    for i, rec in enumerate(read_jsonl(file)):
        where = f"{file}: record {rec.id!r}"
        try:
            media = {s: resolve_under(root, getattr(rec, s), f"record {rec.id!r} {s}") for s in ("chosen", "rejected")}
        except ValueError as err:
            if on_bad_row is None:
                raise ValueError(f"{where}: {err}") from None
            on_bad_row(f"{where}: {err}")
            continue
        yield where, {"id": rec.id, "prompt": rec.prompt, "label": rec.label, **media}


def _pickapic(path: Path, on_bad_row):
    from diffdpo.data.pickapic import read_pickapic

    counts = Counter()
    for pair in read_pickapic(path, ties="keep", counts=counts, on_bad_row=on_bad_row):
        yield f"{path}: pair {pair.id}", {"id": pair.id, "prompt": pair.prompt, "chosen": pair.chosen,
                                          "rejected": pair.rejected, "label": pair.label}
    if counts["unlabelled_dropped"]:
        log.warning("%s: %d rows without label_0 dropped", path, counts["unlabelled_dropped"])


def _audio_alpaca(path: Path, on_bad_row):
    from diffdpo.data.audio_alpaca import read_audio_alpaca

    for pair in read_audio_alpaca(path, on_bad_row=on_bad_row):
        yield f"{path}: pair {pair.id}", {"id": pair.id, "prompt": pair.prompt, "chosen": pair.chosen,
                                          "rejected": pair.rejected}


WON_AND_LOST = ("desirable", "undesirable", "drop")


def read_samples(source: str, path: str | Path, media: str, load_media: Callable[[Media], torch.Tensor],
                 ties: str = "drop", on_bad_record: str = "error", max_samples: int | None = None,
                 won_and_lost: str = "desirable") -> SampleSet:
    """Unpaired samples of a ``feedback`` set, or the winners (desirable) and losers (undesirable) of
    any pair source, checked like pairs.

    From pairs, a sample (same prompt and media) that wins one pair and loses another follows
    ``won_and_lost``: ``desirable`` (Diffusion-KTO's published ``--policy gt_label_wi_l``, which moves
    Pick-a-Pic's "intersections" to the winners), ``undesirable`` (``gt_label_w_il``) or ``drop``
    (``gt_label_w_l``); a sample seen twice with one label is kept once.
    """
    if won_and_lost not in WON_AND_LOST:
        raise ValueError(f"data.won_and_lost: must be one of {WON_AND_LOST}, got {won_and_lost!r}")
    if source == "feedback":
        return _feedback(Path(path), load_media, on_bad_record, max_samples)
    pairset = read_pairs(source, path, media, load_media, ties, on_bad_record)
    out = SampleSet([], pairset.dropped_ties, pairset.skipped)
    first: dict[tuple[str, str], Sample] = {}
    labels: dict[tuple[str, str], set[bool]] = {}
    for pair in pairset.pairs:
        for side, desirable in (("chosen", True), ("rejected", False)):
            m = getattr(pair, side)
            key = (pair.prompt, hashlib.sha256(m).hexdigest() if isinstance(m, bytes) else str(m))
            first.setdefault(key, Sample(f"{pair.id}/{side}", pair.prompt, m, desirable))
            labels.setdefault(key, set()).add(desirable)
    for key, sample in first.items():
        if len(labels[key]) == 2:
            out.won_and_lost += 1
            if won_and_lost == "drop":
                continue
            sample.desirable = won_and_lost == "desirable"
        out.samples.append(sample)
    out.samples = out.samples[:max_samples] if max_samples else out.samples
    if not out.samples:
        raise ValueError(f"{path}: no usable samples ({out.won_and_lost} both won and lost a pair, dropped)")
    if out.won_and_lost:
        log.info("%s: %d samples both won and lost a pair: %s", path, out.won_and_lost, won_and_lost)
    return out


def _feedback(path: Path, load_media, on_bad_record: str, max_samples: int | None) -> SampleSet:
    from diffdpo.data.feedback import FILE_NAME, read_feedback

    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"data.on_bad_record: must be 'error' or 'skip', got {on_bad_record!r}")
    root = path if path.is_dir() else path.parent
    file = path / FILE_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"data.path: no feedback file at {file}")
    out = SampleSet([])

    def skip(message: str) -> None:
        out.skipped += 1
        log.warning("skipping bad record (%d so far): %s", out.skipped, message)

    for rec in read_feedback(file, skip if on_bad_record == "skip" else None):
        where = f"{file}: record {rec.id!r}"
        try:
            media = resolve_under(root, rec.media, f"record {rec.id!r} media")
            if not media.is_file():
                raise ValueError(f"media file not found: {media}")
            try:
                load_media(media)
            except Exception as err:  # any decoder failure is this record's problem
                raise ValueError(f"media unreadable ({type(err).__name__}: {err})") from None
        except ValueError as err:
            if on_bad_record == "error":
                raise ValueError(f"{where}: {err}") from None
            skip(f"{where}: {err}")
            continue
        out.samples.append(Sample(rec.id, rec.prompt, media, rec.label))
        if max_samples and len(out.samples) >= max_samples:
            break
    if not out.samples:
        raise ValueError(f"{file}: no usable samples ({out.skipped} bad records)")
    return out


def desirable_weights(samples: list[Sample], fraction: float) -> torch.Tensor:
    """Per-sample draw weights that make ``fraction`` of the drawn samples desirable (Diffusion-KTO's
    ``--positive_ratio`` weighted sampler; its published run uses 0.8)."""
    desirable = torch.tensor([s.desirable for s in samples])
    n_d = int(desirable.sum())
    if not 0 < fraction < 1 or n_d in (0, len(samples)):
        raise ValueError(f"data.desirable_fraction: {fraction} needs 0 < fraction < 1 and both labels in the data "
                         f"({n_d} desirable of {len(samples)})")
    return torch.where(desirable, fraction / n_d, (1 - fraction) / (len(samples) - n_d)).double()


# -------------------------------------------------------------------- deterministic order


def epoch_order(n: int, seed: int, epoch: int, weights: torch.Tensor | None = None) -> list[int]:
    """The pair order of one epoch, seeded by (seed, epoch) — identical on every process: a permutation,
    or with ``weights`` ``n`` draws with replacement (a ``WeightedRandomSampler``'s epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if weights is not None:
        return torch.multinomial(weights, n, replacement=True, generator=g).tolist()
    return torch.randperm(n, generator=g).tolist()


def micro_batch(n: int, seed: int, global_micro: int, per_device: int, num_processes: int,
                process_index: int, weights: torch.Tensor | None = None) -> tuple[int, list[int]]:
    """``(epoch, indices)`` of this process's share of global micro-batch number ``global_micro``.

    A global micro-batch holds ``per_device * num_processes`` pairs; an epoch has
    ``n // that`` of them (the rest dropped so every micro-batch has the same size, which keeps the
    loss scaling exact). The position is a pure function of the counter, so resuming needs only it.
    """
    size = per_device * num_processes
    per_epoch = n // size
    if per_epoch == 0:
        raise ValueError(f"{n} pairs cannot fill one global batch of {size} (per_device_batch x processes)")
    epoch, k = divmod(global_micro, per_epoch)
    order = epoch_order(n, seed, epoch, weights)
    start = k * size + process_index * per_device
    return epoch, order[start:start + per_device]


# -------------------------------------------------------------------- toy set


def write_toy_pairs(root: str | Path, media: str, n: int, resolution: int = 16, sample_rate: int = 16000,
                    seconds: float = 0.32, seed: int = 0) -> Path:
    """A separable pair set: winners are smooth (gradient image / pure tone), losers are noise.

    Used by the tiny configs and by the test that DPO learns a separable preference.
    """
    from PIL import Image
    import soundfile as sf

    root = Path(root)
    if (root / "prefs.jsonl").is_file():
        return root
    (root / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        names = {}
        for side in ("chosen", "rejected"):
            if media == "image":
                if side == "chosen":
                    ramp = np.linspace(0, 255, resolution)
                    img = np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1) * (0.5 + 0.5 * rng.random())
                else:
                    img = rng.integers(0, 256, (resolution, resolution, 3))
                names[side] = f"media/{i}_{side}.png"
                Image.fromarray(img.astype(np.uint8)).save(root / names[side])
            else:
                t = np.arange(int(seconds * sample_rate)) / sample_rate
                wave = (0.5 * np.sin(2 * np.pi * (220 + 220 * rng.random()) * t) if side == "chosen"
                        else 0.5 * rng.standard_normal(t.size))
                names[side] = f"media/{i}_{side}.wav"
                sf.write(root / names[side], wave.astype(np.float32), sample_rate)
        records.append(PreferenceRecord(id=f"toy-{i}", prompt=f"a clean sample number {i % 4}",
                                        chosen=names["chosen"], rejected=names["rejected"], strategy="toy"))
    write_jsonl(records, root / "prefs.jsonl")
    return root
