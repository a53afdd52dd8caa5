"""The preference builder: captions -> perturbed prompts -> samples -> scores -> pairs -> a set.

Work is cut into shards of captions. A shard's media files are written first, then its
``shards/NNNNN.json`` (records, failures, scores) atomically; a restarted build skips every shard
whose file exists, and since each sample's seed is derived from (seed, round, caption, prompt
variant, sample index) alone, the finished set is identical to an uninterrupted run's. The set
(``prefs.jsonl`` + ``manifest.json``) is assembled from the shard files at the end.
Under ``accelerate launch`` each process builds every N-th shard and the main process assembles.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffdpo.data.records import PreferenceRecord, write_json_atomic, write_jsonl
from diffdpo.prefs.perturb import DEFAULT_LLM_TEMPLATE, NothingToPerturb, Perturbation, make_perturber
from diffdpo.prefs.select import Candidate, NoPair, Selection, select_multi_sample, select_perturbed

if TYPE_CHECKING:
    from diffdpo.prefs.backends import Generator, Scorer

FORMAT_VERSION = 1


@dataclass
class GeneratorConfig:
    kind: str = field(default="soundworld", metadata={"help": "soundworld, tango, audioldm, audioldm2, sd15, sdxl or module:attr"})
    path: str | None = field(default=None, metadata={"help": "hub id or local directory (soundworld: shipped weights)"})
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    batch_size: int = 16
    audio_seconds: float = field(default=10.0, metadata={
        "help": "clip length for audioldm / audioldm2 (a tango-family model makes clips of its own length, "
                "10.24 s for Tango's checkpoints)"})


@dataclass
class ScorerConfig:
    kind: str = field(default="clap:soundworld", metadata={"help": "clap:<backend>, clip or module:attr"})
    ckpt: str | None = None
    batch_size: int = 32


@dataclass
class PerturbConfig:
    backend: str = field(default="rule", metadata={"help": "rule (offline) or llm (a local causal LM)"})
    vocabulary: list[str] | None = field(default=None, metadata={"help": "phrases for replace_event (default: built in)"})
    llm_model: str | None = None
    llm_prompt_template: str = DEFAULT_LLM_TEMPLATE


@dataclass
class StrategyConfig:
    enabled: bool = True
    min_gap: float = 0.05
    min_winner_score: float | None = field(default=None, metadata={
        "help": "keep a pair only if its winner scores at least this (None: no floor)"})
    loser: str = field(default="lowest", metadata={"help": "perturbed strategies: lowest or hardest eligible sample"})
    kinds: list[str] = field(default_factory=list, metadata={"help": "perturbation kinds (perturbed strategies)"})
    num_perturbations: int = 2
    samples_per_perturbation: int = 1


@dataclass
class BuildConfig:
    captions: str = field(default="", metadata={"help": "caption file: .txt, .jsonl, .csv/.tsv, or a datasets dir"})
    out: str = field(default="", metadata={"help": "output preference-set directory"})
    caption_column: str = "caption"
    seed: int = 0
    round: int = field(default=0, metadata={"help": "on-policy round (build -> train -> rebuild), in the manifest"})
    limit: int | None = None
    num_samples: int = field(default=4, metadata={"help": "samples of each original caption"})
    shard_size: int = 16
    min_rms: float = field(default=1e-4, metadata={"help": "audio quieter than this RMS counts as silent (failed)"})
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    multi_sample: StrategyConfig = field(default_factory=lambda: StrategyConfig(min_gap=0.05))
    perturbed: StrategyConfig = field(default_factory=lambda: StrategyConfig(
        min_gap=0.05, kinds=["drop_event", "replace_event", "change_relation"]))
    temporal: StrategyConfig = field(default_factory=lambda: StrategyConfig(min_gap=0.01, kinds=["swap_order"]))

    def __post_init__(self):
        if not self.captions:
            raise ValueError("captions: give a caption file")
        if not self.out:
            raise ValueError("out: give an output directory")
        if self.num_samples < 1 or self.shard_size < 1:
            raise ValueError("num_samples and shard_size must be >= 1")
        if self.temporal.kinds != ["swap_order"]:
            raise ValueError("temporal.kinds: the temporal strategy is reorder-only (['swap_order'])")
        if not any(s.enabled for s in (self.multi_sample, self.perturbed, self.temporal)):
            raise ValueError("enable at least one strategy (multi_sample, perturbed, temporal)")


# ------------------------------------------------------------------ captions


def normalise_caption(text: str) -> str:
    return " ".join(text.split()).strip()


def caption_id(text: str) -> str:
    key = normalise_caption(text).lower().rstrip(".")
    return "c" + hashlib.sha1(key.encode()).hexdigest()[:12]


def load_captions(path: str | Path, column: str = "caption") -> list[str]:
    """Captions from a text file (one per line), JSONL/CSV/TSV (``column``) or a datasets directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"captions: {path} does not exist")
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if column not in ds.column_names:
            raise ValueError(f"{path}: no column {column!r} (columns: {ds.column_names})")
        return [str(c) for c in ds[column]]
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if column not in row:
                    raise ValueError(f"{path}:{lineno}: no field {column!r}")
                out.append(str(row[column]))
        return out
    if path.suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        if rows and column not in rows[0]:
            raise ValueError(f"{path}: no column {column!r} (columns: {list(rows[0])})")
        return [r[column] for r in rows]
    return [line for line in path.read_text(encoding="utf-8").splitlines()]


def unique_captions(captions: list[str]) -> tuple[list[tuple[str, str]], int]:
    """(id, caption) pairs without empties and duplicates, in first-seen order; and how many were dropped."""
    seen, out = set(), []
    for text in captions:
        text = normalise_caption(text)
        cid = caption_id(text) if text else None
        if cid and cid not in seen:
            seen.add(cid)
            out.append((cid, text))
    return out, len(captions) - len(out)


def derive_seed(*parts: Any) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# ------------------------------------------------------------------ one shard


@dataclass
class _Job:
    caption_id: str
    caption: str
    variant: str  # "orig", "perturbed-0", "temporal-1", ...
    prompt: str
    sample: int
    seed: int
    strategy: str | None = None
    perturbation: Perturbation | None = None

    @property
    def key(self) -> str:
        return f"{self.caption_id}/{self.variant}-{self.sample}"


def _plan(config: BuildConfig, captions: list[tuple[str, str]], perturber) -> tuple[list[_Job], list[dict]]:
    jobs, notes = [], []
    for cid, caption in captions:
        for j in range(config.num_samples):
            jobs.append(_Job(cid, caption, "orig", caption, j, derive_seed(config.seed, config.round, cid, "orig", j)))
        for name in ("perturbed", "temporal"):
            strategy = getattr(config, name)
            if not strategy.enabled:
                continue
            try:
                perturbations = perturber.perturb(caption, strategy.kinds, strategy.num_perturbations)
            except NothingToPerturb as e:
                notes.append({"caption_id": cid, "strategy": name, "reason": str(e)})
                continue
            for k, p in enumerate(perturbations):
                for j in range(strategy.samples_per_perturbation):
                    variant = f"{name}-{k}"
                    jobs.append(_Job(cid, caption, variant, p.caption, j,
                                     derive_seed(config.seed, config.round, cid, variant, j), name, p))
    return jobs, notes


def _invalid_reason(media, kind: str, min_rms: float) -> str | None:
    if kind != "audio":
        return None
    x = np.asarray(media, dtype=np.float64)
    if x.size == 0:
        return "empty audio"
    if not np.isfinite(x).all():
        return "NaN or inf in audio"
    if np.sqrt(np.mean(x ** 2)) < min_rms:
        return "silent audio"
    return None


def _generate(generator, jobs: list[_Job]) -> tuple[list, list[str | None]]:
    """Media per job, or the error for jobs whose generation failed (isolated caption by caption)."""
    try:
        return list(generator.generate([j.prompt for j in jobs], [j.seed for j in jobs])), [None] * len(jobs)
    except Exception:  # noqa: BLE001 - retried per caption below to find the failing one
        pass
    media, errors = [None] * len(jobs), [None] * len(jobs)
    by_caption: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_caption.setdefault(job.caption_id, []).append(i)
    for idx in by_caption.values():
        try:
            out = generator.generate([jobs[i].prompt for i in idx], [jobs[i].seed for i in idx])
            for i, m in zip(idx, out):
                media[i] = m
        except Exception as e:  # noqa: BLE001 - recorded in the manifest, the build goes on
            for i in idx:
                errors[i] = f"generation failed: {type(e).__name__}: {e}"
    return media, errors


def _write_media(root: Path, rel: str, media, kind: str, sample_rate: int | None) -> None:
    path = root / rel
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if kind == "audio":
        from scipy.io import wavfile

        # 32-bit float WAV: the file holds exactly the samples that were scored (no clipping, no
        # rescaling). scipy rather than libsndfile, whose PEAK chunk stamps the write time into
        # the file and would make a resumed build's bytes differ from an uninterrupted one's.
        with open(tmp, "wb") as f:
            wavfile.write(f, sample_rate, np.asarray(media, dtype=np.float32).reshape(-1))
    else:
        media.save(tmp, format="PNG")
    os.replace(tmp, path)


def build_shard(config: BuildConfig, captions: list[tuple[str, str]], generator, scorer, perturber,
                root: Path) -> dict:
    jobs, notes = _plan(config, captions, perturber)
    media, errors = _generate(generator, jobs)
    failures, valid = [], []
    for i, job in enumerate(jobs):
        reason = errors[i] or _invalid_reason(media[i], generator.media, config.min_rms)
        if reason:
            failures.append({"caption_id": job.caption_id, "sample": job.key, "prompt": job.prompt, "reason": reason})
        else:
            valid.append(i)
    scores = np.full(len(jobs), np.nan)
    if valid:
        scores[valid] = scorer.score([jobs[i].caption for i in valid], [media[i] for i in valid],
                                     getattr(generator, "sample_rate", None))
    ext = "wav" if generator.media == "audio" else "png"
    records, no_pair, valid_set = [], Counter(), set(valid)
    for cid, caption in captions:
        idx = [i for i, j in enumerate(jobs) if j.caption_id == cid and i in valid_set]
        by_key = {jobs[i].key: i for i in idx}
        cands = {i: Candidate(jobs[i].key, jobs[i].prompt, jobs[i].seed, float(scores[i]),
                              jobs[i].perturbation.kind if jobs[i].perturbation else None) for i in idx}
        originals = [cands[i] for i in idx if jobs[i].variant == "orig"]
        if not originals:
            failures.append({"caption_id": cid, "sample": None, "prompt": caption,
                             "reason": "no valid sample of the original caption"})
        selections: list[Selection | NoPair] = []
        if config.multi_sample.enabled:
            selections.append(select_multi_sample(originals, config.multi_sample.min_gap,
                                                  config.multi_sample.min_winner_score))
        for name in ("perturbed", "temporal"):
            strategy = getattr(config, name)
            if strategy.enabled:
                perturbed = [cands[i] for i in idx if jobs[i].strategy == name]
                selections.append(select_perturbed(originals, perturbed, strategy.min_gap, name, strategy.loser,
                                                   strategy.min_winner_score))
        for sel in selections:
            if isinstance(sel, NoPair):
                no_pair[sel.strategy] += 1
                continue
            files = {}
            for side, cand in (("chosen", sel.chosen), ("rejected", sel.rejected)):
                files[side] = f"media/{cand.key}.{ext}"
                _write_media(root, files[side], media[by_key[cand.key]], generator.media,
                             getattr(generator, "sample_rate", None))
            loser_job = jobs[by_key[sel.rejected.key]]
            meta = {"caption_id": cid, "round": config.round, "chosen_score": sel.chosen.score,
                    "rejected_score": sel.rejected.score, "gap": sel.gap, "chosen_prompt": sel.chosen.prompt,
                    "rejected_prompt": sel.rejected.prompt, "chosen_seed": sel.chosen.seed,
                    "rejected_seed": sel.rejected.seed}
            if loser_job.perturbation is not None:
                meta["perturbation"] = asdict(loser_job.perturbation)
            records.append(PreferenceRecord(f"{cid}-{sel.strategy}", caption, files["chosen"], files["rejected"],
                                            sel.strategy, 1.0, meta).to_json())
    return {"records": records, "failures": failures, "no_pair": dict(no_pair), "notes": notes,
            "scores": [float(s) for s in scores[valid]], "samples": len(jobs), "media": generator.media,
            "sample_rate": getattr(generator, "sample_rate", None)}


# ------------------------------------------------------------------ the whole build


def config_hash(config: BuildConfig) -> str:
    data = asdict(config)
    data.pop("out")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def build_preferences(config: BuildConfig, generator: "Generator | None" = None, scorer: "Scorer | None" = None,
                      progress: bool = True) -> dict:
    """Build (or finish building) the preference set ``config.out``; returns the manifest.

    ``generator`` / ``scorer`` (the protocols of :mod:`diffdpo.prefs.backends`) override the
    config's; the config still names them in the manifest's config section.
    """
    from tqdm.auto import tqdm

    from diffdpo.prefs.backends import Generator, Scorer, describe, make_generator, make_scorer

    root = Path(config.out)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    state_path, chash = root / "build_state.json", config_hash(config)
    rank, world, wait = _process_layout()
    if state_path.exists():
        previous = json.loads(state_path.read_text())
        if previous.get("config_hash") != chash:
            raise ValueError(f"{root} was built with a different config ({previous.get('config_hash')} != {chash}); "
                             "use another out directory or remove it")
    elif rank == 0:
        write_json_atomic(state_path, {"config_hash": chash, "format_version": FORMAT_VERSION}, indent=1)

    captions, duplicates = unique_captions(load_captions(config.captions, config.caption_column))
    if config.limit is not None:
        captions = captions[:config.limit]
    if not captions:
        raise ValueError(f"captions: {config.captions} holds no caption")
    shards = [captions[s:s + config.shard_size] for s in range(0, len(captions), config.shard_size)]
    todo = [k for k in range(len(shards)) if k % world == rank and not (root / f"shards/{k:05d}.json").exists()]
    started = time.time()
    if todo:
        generator = generator or make_generator(config.generator)
        scorer = scorer or make_scorer(config.scorer)
        for obj, protocol, name in ((generator, Generator, "generator"), (scorer, Scorer, "scorer")):
            if not isinstance(obj, protocol):
                raise TypeError(f"{name}: {type(obj).__name__} does not follow the {protocol.__name__} protocol "
                                "of diffdpo.prefs.backends (needs id, " +
                                ("media, sample_rate, generate(prompts, seeds))" if name == "generator"
                                 else "score(texts, media, sample_rate))"))
        perturber = make_perturber(config.perturb.backend, config.perturb.vocabulary or _default_vocab(),
                                   config.seed, config.perturb.llm_model, config.perturb.llm_prompt_template)
        pairs = 0
        bar = tqdm(todo, desc="prefs build", unit="shard", disable=not progress)
        for k in bar:
            result = build_shard(config, shards[k], generator, scorer, perturber, root)
            result["generator"], result["scorer"] = describe(generator), describe(scorer)
            write_json_atomic(root / f"shards/{k:05d}.json", result, indent=1)
            pairs += len(result["records"])
            bar.set_postfix(pairs=pairs, pairs_per_s=f"{pairs / max(time.time() - started, 1e-9):.2f}")
    wait()
    if rank != 0:
        return {}
    return _assemble(config, root, len(shards), len(captions), duplicates, chash, time.time() - started)


def _default_vocab():
    from diffdpo.prefs.perturb import DEFAULT_VOCABULARY

    return DEFAULT_VOCABULARY


def _process_layout():
    """(rank, world size, barrier) under accelerate; (0, 1, no-op) otherwise. The rank is the global
    process index, so machines split the shards as processes do."""
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
    except ImportError:
        return 0, 1, lambda: None
    # CPU processes (accelerate launch --cpu) say so only through this variable, which PartialState,
    # unlike Accelerator, does not read: without it each would build every shard as process 0 of 1
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    return state.process_index, state.num_processes, state.wait_for_everyone


def _assemble(config, root: Path, n_shards: int, n_captions: int, duplicates: int, chash: str, seconds: float) -> dict:
    records, failures, notes, scores, no_pair, samples = [], [], [], [], Counter(), 0
    generator = scorer = media = sample_rate = None
    for k in range(n_shards):
        shard = json.loads((root / f"shards/{k:05d}.json").read_text())
        records += [PreferenceRecord.from_json(r) for r in shard["records"]]
        failures += shard["failures"]
        notes += shard["notes"]
        scores += shard["scores"]
        no_pair.update(shard["no_pair"])
        samples += shard["samples"]
        generator, scorer = shard["generator"], shard["scorer"]
        media, sample_rate = shard["media"], shard["sample_rate"]
    write_jsonl(records, root / "prefs.jsonl")
    counts = Counter(r.strategy for r in records)

    def stats(values):
        v = np.asarray(values, dtype=np.float64)
        return {"n": int(v.size), **({"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
                                      "max": float(v.max())} if v.size else {})}

    manifest = {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "config_hash": chash,
        "round": config.round,
        "seed": config.seed,
        "generator": generator,
        "scorer": scorer,
        "media": media,
        "sample_rate": sample_rate,
        "captions": {"unique": n_captions, "duplicates_dropped": duplicates},
        "samples_generated": samples,
        "pairs": len(records),
        "pairs_per_strategy": dict(counts),
        "no_pair_per_strategy": dict(no_pair),
        "scores": {"all": stats(scores), "chosen": stats([r.meta["chosen_score"] for r in records]),
                   "rejected": stats([r.meta["rejected_score"] for r in records]),
                   "gap": stats([r.meta["gap"] for r in records])},
        "failures": failures,
        "nothing_to_perturb": notes,
        "build_seconds_this_run": round(seconds, 3),
    }
    write_json_atomic(root / "manifest.json", manifest, indent=1)
    return manifest
