"""The SoundWorld demo: Tango 2 in miniature, judged by an exact oracle.

    diffdpo demo [--config recipes/configs/soundworld_demo.yaml] [key=value ...]

1. **prefs**: a Tango 2-style preference set from SoundWorld training captions, built by
   ``diffdpo prefs build`` (multi-sample, perturbed and temporal strategies), every sample scored
   by the SoundWorld CLAP against the *original* caption;
2. **dpo**: Diffusion-DPO fine-tuning of the shipped base model on that set
   (:func:`diffdpo.diffusion.trainer.train`, frozen-copy reference);
3. **sft**: the baseline — the winners' denoising loss only, same pairs, same steps;
4. **evaluate**: base, dpo and sft on held-out test captions, caption ``i`` from noise seed
   ``seed + i`` for every model: the oracle's verdict, CLAP score, and FAD of SoundWorld-CLAP
   audio embeddings against the real test clips, each with a bootstrap 95% interval, and paired
   differences (same captions, same seeds) with theirs;
5. **report**: ``results.json`` (every number with its N and settings, and the oracle's audit of
   the pairs: how often a winner really is the better sample) and ``report.html``.

``evaluate.split=validation`` evaluates on validation captions instead, into ``eval_validation/``,
``results_validation.json`` and ``report_validation.html``, reusing the same pairs and models: settings
are chosen there, and the test split is run once with the chosen ones (docs/soundworld_weak_base.md).

Every stage writes its output once (atomically) and is skipped when it is there, so a run that
stopped resumes at the stage it was in (the preference builder also shard by shard). A stage's
output records the settings it was made with; rerunning into the same ``out`` with other
settings is refused rather than silently mixing old results with new ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffdpo.config import from_dict, load_config, merge, save_config, to_dict
from diffdpo.data.records import write_json_atomic
from diffdpo.errors import ConfigError

log = logging.getLogger(__name__)

MODELS = ("base", "dpo", "sft")
DELTAS = (("dpo", "base"), ("dpo", "sft"), ("sft", "base"))


# The demo's settings (recipes/configs/soundworld_demo.yaml says the same, with the reasons).
DEFAULT_PREFS = {
    "num_samples": 4, "shard_size": 16,
    "generator": {"num_inference_steps": 10, "guidance_scale": 3.0, "batch_size": 64},
    "scorer": {"kind": "clap:soundworld"},
    "multi_sample": {"min_gap": 0.05},
    "perturbed": {"kinds": ["drop_event", "replace_event"], "num_perturbations": 1, "min_gap": 0.05},
    "temporal": {"num_perturbations": 1, "samples_per_perturbation": 2, "min_gap": 0.0},
}
DEFAULT_DPO = {
    "loss": {"type": "sigmoid", "beta": 2000, "beta_convention": "tango2"},
    "reference": "copy",
    "train": {"per_device_batch": 8, "max_steps": 120, "lr": 5e-5, "weight_decay": 0.0, "lr_scheduler": "constant"},
}


@dataclass
class EvalSettings:
    captions: int = field(default=200, metadata={"help": "held-out captions (one sample each per model)"})
    split: str = field(default="test", metadata={
        "help": "held-out split: validation (choosing settings) or test (the pre-registered run, once)"})
    steps: int = field(default=10, metadata={"help": "DDIM steps"})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance scale"})
    seed: int = field(default=1234, metadata={"help": "caption i uses noise seed + i, for every model"})
    batch_size: int = 64
    examples: int = field(default=6, metadata={"help": "captions whose audio goes into the report"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the intervals"})

    def __post_init__(self):
        if self.split not in ("validation", "test"):  # the training split is what the pairs come from
            raise ConfigError(f"evaluate.split: expected validation or test, got {self.split!r}", ["evaluate.split"])


@dataclass
class DemoConfig:
    out: str = field(default="runs/soundworld_demo", metadata={"help": "output directory (resumable)"})
    seed: int = 0
    data_seed: int = field(default=0, metadata={"help": "SoundWorld data seed (train captions, test captions)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    base: str = field(default="clean", metadata={
        "help": "shipped base: clean (captions as written) or weak (weakly labelled captions); its own CLAP is "
                "the proxy scorer and the CLAP column"})
    base_model: str | None = field(default=None, metadata={"help": "Tango-layout folder (default: the base's generator)"})
    train_captions: int = field(default=192, metadata={"help": "SoundWorld training captions to build pairs from"})
    train_kinds: list[str] = field(default_factory=lambda: ["sequence", "overlap"], metadata={
        "help": "only training captions of these kinds (single, sequence, overlap); empty = the split's mix"})
    prefs: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_PREFS)),
                        metadata={"help": "diffdpo.prefs.build.BuildConfig fields"})
    dpo: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_DPO)),
                      metadata={"help": "diffdpo.diffusion.trainer.DiffusionDPOConfig fields"})
    sft_baseline: bool = field(default=True, metadata={"help": "also train the SFT-on-winners baseline"})
    evaluate: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self):
        from diffdpo.worlds.soundworld import BASES

        if self.base not in BASES:
            raise ConfigError(f"base: expected one of {list(BASES)}, got {self.base!r}", ["base"])

    @property
    def clap_dir(self) -> Path:
        """The proxy CLAP learnt from the base's captions (the builder's scorer, the CLAP column)."""
        from diffdpo.worlds.soundworld import BASES

        return BASES[self.base] / "clap"


# ------------------------------------------------------------------ stages


def _cached(path: Path, settings: dict):
    """The stage output at ``path`` if it was made with ``settings``; None if there is none."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("settings") != json.loads(json.dumps(settings)):
        # a user mistake (one line, exit 2), still a ValueError for callers that catch that
        raise ConfigError(f"{path} was made with other settings than this run's; use another out directory "
                          f"or remove {path.parent}")
    return data


def prefs_config(cfg: DemoConfig, out: Path):
    """The builder's config: the demo's ``prefs`` section, generating with the base and (for the weak
    base) scoring with the CLAP learnt from the same captions."""
    from diffdpo.prefs.build import BuildConfig

    # the clean base stays the builder's default (path None), so its config hash is machine-independent
    path = cfg.base_model if cfg.base == "clean" else _model_dir(cfg, out, "base")
    scorer = {"scorer": {"ckpt": str(cfg.clap_dir)}} if _proxy_is_soundworld_clap(cfg) else {}
    return from_dict(BuildConfig, merge(cfg.prefs, {
        "captions": str(out / "train_captions.txt"), "out": str(out / "prefs"), "seed": cfg.seed,
        "generator": {"kind": "soundworld", "path": path}, **scorer}))


def build_prefs(cfg: DemoConfig, out: Path) -> dict:
    from diffdpo.prefs.build import build_preferences
    from diffdpo.worlds.soundworld.dataset import split_scenes

    scenes = split_scenes(cfg.data_seed, "train", cfg.train_captions, cfg.train_kinds)
    (out / "train_captions.txt").write_text("".join(s.caption + "\n" for s in scenes))
    # a finished set is only re-assembled (no generation); one built with another config is refused
    return build_preferences(prefs_config(cfg, out))


def _proxy_is_soundworld_clap(cfg: DemoConfig) -> bool:
    """The weak base's pairs are scored by the CLAP learnt from its own captions, unless the config names a
    scorer or checkpoint (the clean base's CLAP is the backend's default)."""
    scorer = cfg.prefs.get("scorer") or {}
    return cfg.base != "clean" and scorer.get("kind", "clap:soundworld") == "clap:soundworld" and not scorer.get("ckpt")


def training_config(cfg: DemoConfig, out: Path, name: str):
    """The trainer's config of model ``name``: ``cfg.dpo`` on the base and the preference set in ``out``,
    into ``out/name``; "sft" trains the winners' denoising loss only (same pairs and steps). Raises on a
    bad ``cfg.dpo`` before anything runs."""
    from diffdpo.diffusion.trainer import DiffusionDPOConfig

    overrides = {"model": {"family": "tango", "name_or_path": _model_dir(cfg, out, "base")},
                 "data": {"source": "jsonl", "path": str(out / "prefs")},
                 "train": {"output_dir": str(out / name), "seed": cfg.seed, "report_to": "none"}}
    if name == "sft":
        overrides["loss"] = {"sft_epochs": 10**9}
    return from_dict(DiffusionDPOConfig, merge(cfg.dpo, overrides))


def train_model(cfg: DemoConfig, out: Path, name: str) -> dict:
    """Train :func:`training_config`'s model, or read it back when a run with the same settings finished."""
    from diffdpo.diffusion.trainer import train

    tcfg = training_config(cfg, out, name)
    done = out / name / "history.json"
    if (summary := _cached(done, to_dict(tcfg))) is not None:
        return summary
    result = train(tcfg)
    summary = {"settings": to_dict(tcfg), "history": result["history"], "pairs": result["pairs"],
               "steps": result["steps"], "final": str(result["final"])}
    write_json_atomic(done, summary)
    return summary


def _model_dir(cfg: DemoConfig, out: Path, name: str) -> str:
    from diffdpo.worlds.soundworld import BASES

    if name == "base":
        return cfg.base_model or str(BASES[cfg.base] / "generator")
    return str(out / name / "final")


def split_suffix(split: str) -> str:
    """"" for the test split (the demo's files as they always were), "_validation" otherwise."""
    return "" if split == "test" else f"_{split}"


def evaluate_model(cfg: DemoConfig, out: Path, name: str, scenes, oracle, clap) -> dict:
    """Generate the held-out captions with one model and judge every clip; cached in ``eval<suffix>/<name>``."""
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    model_dir = _model_dir(cfg, out, name)
    folder = out / f"eval{split_suffix(cfg.evaluate.split)}" / name
    return evaluate_pipeline(lambda: TangoPipeline.from_pretrained(model_dir), folder, scenes,
                             oracle, clap, cfg.evaluate, f"evaluate {name}", model_dir)


def evaluate_pipeline(load_pipe, folder: Path, scenes, oracle, clap, ev: EvalSettings, desc: str,
                      model: str) -> dict:
    """Per-caption rows (oracle verdict, ``satisfied``, CLAP cosine) and CLAP audio embeddings of
    one sample per caption (caption ``i`` from noise seed ``ev.seed + i``); read back when cached."""
    import soundfile as sf
    from tqdm.auto import tqdm

    from diffdpo.worlds.soundworld.evaluate import judge

    rows_path, emb_path = folder / "rows.json", folder / "clap_audio.npy"
    settings = {"model": model, "captions": [s.caption for s in scenes], "clap": clap.checkpoint_id,
                **{k: v for k, v in asdict(ev).items() if k in ("steps", "guidance", "seed")}}
    if (done := _cached(rows_path, settings)) is not None and emb_path.exists():
        return {"rows": done["rows"], "embeddings": np.load(emb_path)}
    pipe = load_pipe()
    captions = [s.caption for s in scenes]
    audio = []
    for s in tqdm(range(0, len(captions), ev.batch_size), desc=desc, unit="batch"):
        audio += pipe(captions[s:s + ev.batch_size], num_inference_steps=ev.steps, guidance_scale=ev.guidance,
                      seed=ev.seed + s)
    rows = judge(scenes, oracle.detect(audio))["rows"]
    cosines = clap.similarity(captions, audio)
    for row, c in zip(rows, cosines):
        row["clap"] = float(c)
    embeddings = clap.embed_audio(audio).double().numpy()
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    for i in example_indices(scenes, ev.examples):
        sf.write(folder / "audio" / f"{i:04d}.wav", audio[i], pipe.audio_config.sample_rate, subtype="FLOAT")
    np.save(emb_path, embeddings)
    write_json_atomic(rows_path, {"settings": settings, "rows": rows})  # last: its presence marks the stage done
    return {"rows": rows, "embeddings": embeddings}


def example_indices(scenes, n: int) -> list[int]:
    """The report's examples: multi-event captions first (where models differ), then the rest."""
    multi = [i for i, s in enumerate(scenes) if len(s.events) > 1]
    return (multi + [i for i in range(len(scenes)) if i not in multi])[:n]


def oracle_verdict(row: dict) -> str:
    """An evaluation row as the report's caption under a clip: what the detector heard, and whether
    that satisfies the caption."""
    return (", ".join(row["detected"]) or "nothing") + ("" if row["satisfied"] else "  (not satisfied)")


def audit_pairs(prefs_dir: Path, oracle) -> dict:
    """The oracle's view of the preference set: per strategy, how often the winner satisfies its
    caption where the loser does not, the reverse, or neither/both (a tie) — what DPO can learn."""
    import soundfile as sf

    from diffdpo.data.records import read_jsonl
    from diffdpo.worlds.soundworld.evaluate import caption_satisfied
    from diffdpo.worlds.soundworld.oracle import score_detection
    from diffdpo.worlds.soundworld.scenes import scene_from_caption

    by_strategy: dict[str, list[tuple[float, float]]] = {}
    for rec in read_jsonl(prefs_dir / "prefs.jsonl"):
        scene = scene_from_caption(rec.prompt)
        clips = [sf.read(prefs_dir / path, dtype="float32")[0] for path in (rec.chosen, rec.rejected)]
        won, lost = (float(caption_satisfied(score_detection(scene, d))) for d in oracle.detect(clips))
        by_strategy.setdefault(rec.strategy or "?", []).append((won, lost))
    out = {}
    for name, pairs in [*by_strategy.items(), ("all", [p for v in by_strategy.values() for p in v])]:
        a = np.array(pairs)
        out[name] = {"pairs": len(a), "winner_only": float(np.mean(a[:, 0] > a[:, 1])),
                     "loser_only": float(np.mean(a[:, 0] < a[:, 1])), "tie": float(np.mean(a[:, 0] == a[:, 1])),
                     "winner_satisfied": float(a[:, 0].mean()), "loser_satisfied": float(a[:, 1].mean())}
    return out


# ------------------------------------------------------------------ numbers

METRICS = (  # (table key, row field, label, scene kind filter, higher is better)
    ("satisfied", "satisfied", "oracle: caption satisfied (right events, right order)", None, True),
    ("order_correct", "order_correct", "oracle: right order (2-3 event sequences)", "sequence", True),
    ("single_event", "events_exact", "oracle: single-event accuracy (one-event captions)", "single", True),
    ("events_exact", "events_exact", "oracle: right events, any order", None, True),
    ("presence_f1", "presence_f1", "oracle: event presence F1", None, True),
    ("clap", "clap", "CLAP score (SoundWorld CLAP cosine, the proxy)", None, True),
)


def mean_interval(values: np.ndarray, n_resamples: int) -> dict:
    from diffdpo.metrics.stats import mean_ci

    ci = mean_ci(values, n_resamples=n_resamples)
    return {"mean": float(values.mean()), "ci95": [ci.low, ci.high], "n": int(len(values))}


def results_table(evals: dict[str, dict], scenes, reference: np.ndarray, n_resamples: int,
                  deltas: tuple[tuple[str, str], ...] = DELTAS) -> list[dict]:
    """One row per metric: each model's mean with a bootstrap CI, and the paired differences ``a - b``
    for each ``(a, b)`` of ``deltas`` whose models were evaluated."""
    from diffdpo.metrics.frechet import GaussianStats, frechet_distance_from_stats
    from diffdpo.metrics.stats import bootstrap_ci

    table = []
    for key, row_field, label, kind, higher in METRICS:
        idx = np.array([i for i, s in enumerate(scenes) if kind is None or s.kind == kind])
        if len(idx) < 2:
            continue
        vals = {m: np.array([float(e["rows"][i][row_field]) for i in idx]) for m, e in evals.items()}
        table.append({"metric": label, "key": key, "n": int(len(idx)), "higher_is_better": higher,
                      "models": {m: mean_interval(v, n_resamples) for m, v in vals.items()},
                      "deltas": {f"{a} - {b}": mean_interval(vals[a] - vals[b], n_resamples)
                                 for a, b in deltas if a in vals and b in vals}})
    ref = GaussianStats.from_embeddings(reference)

    def fad(emb: np.ndarray) -> float:
        return frechet_distance_from_stats(ref, GaussianStats.from_embeddings(emb))

    items = np.arange(len(scenes))
    models, fad_deltas = {}, {}
    for m, e in evals.items():
        ci = bootstrap_ci(lambda i: fad(e["embeddings"][i]), [items], n_resamples=min(n_resamples, 200))
        models[m] = {"mean": fad(e["embeddings"]), "ci95": [ci.low, ci.high], "n": len(items)}
    for a, b in deltas:
        if a in evals and b in evals:
            ea, eb = evals[a]["embeddings"], evals[b]["embeddings"]
            ci = bootstrap_ci(lambda i: fad(ea[i]) - fad(eb[i]), [items], n_resamples=min(n_resamples, 200))
            fad_deltas[f"{a} - {b}"] = {"mean": models[a]["mean"] - models[b]["mean"],
                                        "ci95": [ci.low, ci.high], "n": len(items)}
    table.append({"metric": f"FAD vs the {len(reference)} real clips of these captions (SoundWorld-CLAP audio embeddings)",
                  "key": "fad", "n": len(items), "higher_is_better": False, "models": models, "deltas": fad_deltas})
    return table


def training_curves(runs: dict[str, dict]) -> dict[str, list[dict]]:
    """The report's curves: each trained model's history (``train_model``'s summary), steps counted from 1."""
    return {name: [{"step": k + 1, **h} for k, h in enumerate(run["history"])] for name, run in runs.items()}


def evaluation_settings(ev: EvalSettings, clap, data_seed: int) -> dict:
    """What a held-out evaluation was made with, as every SoundWorld report records it."""
    return {**asdict(ev), "oracle": "SoundWorld oracle (weights/oracle)", "clap": clap.checkpoint_id,
            "split_seed": data_seed}


def summary_text(table: list[dict]) -> str:
    row = table[0]
    parts = [f"{m}: {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" for m, v in row["models"].items()]
    text = f"{row['metric']} on {row['n']} held-out captions - " + "; ".join(parts) + "."
    for name, d in row["deltas"].items():
        verdict = ("CI excludes zero" if d["ci95"][0] > 0 or d["ci95"][1] < 0 else "CI includes zero")
        text += f" {name}: {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] ({verdict})."
    return text


# ------------------------------------------------------------------ the job


def run_demo(cfg: DemoConfig) -> dict:
    import torch

    from diffdpo.report import write_report
    from diffdpo.worlds.soundworld.clap import SoundWorldClap
    from diffdpo.worlds.soundworld.dataset import clips
    from diffdpo.worlds.soundworld.oracle import Oracle

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.time()

    def stage(name: str, fn, *args):
        t0 = time.time()
        print(f"== {name}", flush=True)
        value = fn(*args)
        timings[name] = round(time.time() - t0, 1)
        return value

    manifest = stage("prefs", build_prefs, cfg, out)
    runs = {"dpo": stage("dpo", train_model, cfg, out, "dpo")}
    if cfg.sft_baseline:
        runs["sft"] = stage("sft", train_model, cfg, out, "sft")

    scenes, real_audio = clips(cfg.data_seed, cfg.evaluate.split, cfg.evaluate.captions)
    oracle, clap = Oracle.from_pretrained(), SoundWorldClap(cfg.clap_dir)
    evals = {m: stage(f"evaluate {m}", evaluate_model, cfg, out, m, scenes, oracle, clap)
             for m in ("base", *runs)}
    audit = stage("audit pairs", audit_pairs, out / "prefs", oracle)
    reference = clap.embed_audio(list(real_audio)).double().numpy()
    table = results_table(evals, scenes, reference, cfg.evaluate.bootstrap)

    examples, suffix = [], split_suffix(cfg.evaluate.split)
    for i in example_indices(scenes, cfg.evaluate.examples):
        verdict = {m: oracle_verdict(e["rows"][i]) for m, e in evals.items()}
        examples.append({"caption": scenes[i].caption, "seed": cfg.evaluate.seed + i,
                         "media": {m: f"eval{suffix}/{m}/audio/{i:04d}.wav" for m in evals}, "verdict": verdict})
    results = {
        "title": "SoundWorld demo: Diffusion-DPO vs base" + (" vs SFT on winners" if "sft" in runs else "")
                 + ", judged by the oracle",
        "summary": summary_text(table) + " The oracle on the {pairs} pairs: the winner satisfies its caption and the "
                   "loser does not in {winner_only:.0%}, the reverse in {loser_only:.0%}, a tie in {tie:.0%}.".format(
                       **audit["all"]),
        "table": table,
        "curves": training_curves(runs),
        "examples": examples,
        "pair_audit": audit,
        "settings": {"demo": to_dict(cfg), "prefs_manifest": {k: v for k, v in manifest.items() if k != "config"},
                     "train": {name: r["settings"] for name, r in runs.items()},
                     "pairs": {name: r["pairs"] for name, r in runs.items()},
                     "models": {m: _model_dir(cfg, out, m) for m in evals},
                     "evaluation": evaluation_settings(cfg.evaluate, clap, cfg.data_seed),
                     "seconds": {**timings, "total": round(time.time() - started, 1)}},
    }
    save_config(cfg, out / "demo_config.yaml")  # what made results.json (the sweep reads it)
    (out / f"results{suffix}.json").write_text(json.dumps(results, indent=2))
    html = write_report(results, out, f"report{suffix}")
    print_summary(table, audit, out / f"results{suffix}.json", html, timings)
    return results


def print_summary(table: list[dict], audit: dict, results: Path, html: Path, timings: dict) -> None:
    models = list(table[0]["models"])
    deltas = list(table[0]["deltas"])
    print(f"\n{'metric':58s}" + "".join(f"{m:>9s}" for m in models) + "".join(f"{d:>26s}" for d in deltas))
    for row in table:
        line = f"{row['metric'][:58]:58s}" + "".join(f"{row['models'][m]['mean']:9.3f}" for m in models)
        for d in deltas:
            v = row["deltas"].get(d)
            line += f"{v['mean']:+8.3f} [{v['ci95'][0]:+.3f},{v['ci95'][1]:+.3f}]" if v else " " * 26
        print(line)
    print("\nthe oracle on the pairs: winner satisfies its caption and the loser not / the reverse / tie")
    for name, a in audit.items():
        print(f"  {name:13s} {a['pairs']:4d} pairs  {a['winner_only']:.2f} / {a['loser_only']:.2f} / {a['tie']:.2f}")
    print(f"\nstage seconds: {timings}\nresults: {results}\nreport:  {html}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config; without one the defaults run, which "
                        "recipes/configs/soundworld_demo.yaml repeats")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. out=runs/demo2 evaluate.captions=400")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    run_demo(load_config(DemoConfig, args.config, args.overrides))
    return 0
