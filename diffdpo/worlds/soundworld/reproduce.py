"""``diffdpo soundworld reproduce``: dose-response of a fixed method against the number of preference pairs.

    diffdpo soundworld reproduce --config recipes/configs/soundworld_reproduce_weak.yaml [key=value ...]

The method is a demo config (``method``, e.g. the pre-registered ``soundworld_demo_weak.yaml``): its
base, preference-builder settings and Diffusion-DPO settings are used as they are, nothing is tuned
here. The job:

1. **prefs**: ONE preference set from ``train_captions`` training captions with the demo's builder
   (resumable shard by shard; ``prefs_processes`` > 1 builds it on that many CPU processes under torchrun);
2. **train**: the method on NESTED subsets of that set, the first ``n`` usable pairs of ``prefs.jsonl``
   for every ``n`` in ``pairs`` (the trainer's ``data.max_pairs``, so the 250-pair subset is a prefix of
   the 500-pair one), same steps, seed and settings for every ``n``; ``0`` is the base itself; with
   ``sft_at_largest`` also SFT on the winners of the largest subset (the demo's baseline);
3. **evaluate**: every model on the same held-out captions and seeds (``evaluate``; the validation split
   by default — the test split is refused, it is kept for pre-registered runs): the oracle's caption
   satisfied, order and single-event accuracy, the proxy CLAP, FAD, each with a bootstrap 95% CI and
   paired differences against the base;
4. **report**: ``results_<split>.json`` and ``report_<split>.html`` with the curves of oracle and proxy
   against pairs, CI bars.

Stages run after the build on ``workers`` processes (one model's training and evaluation each). Every
stage is the demo's (:mod:`diffdpo.worlds.soundworld.demo`), so each writes its output once with its
settings, is read back when finished, and refuses an output made with other settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffdpo.config import from_dict, load_config, merge, save_config, to_dict
from diffdpo.errors import ConfigError, UserError

ORACLE_KEYS = ("satisfied", "order_correct", "single_event")  # the dose table's oracle rows, then the proxy


@dataclass
class ReproduceConfig:
    method: str = field(default="recipes/configs/soundworld_demo_weak.yaml", metadata={
        "help": "demo config whose base, builder and Diffusion-DPO settings are reproduced (not tuned here)"})
    out: str = field(default="runs/soundworld_reproduce_weak", metadata={"help": "output directory (resumable)"})
    train_captions: int = field(default=976, metadata={
        "help": "training captions the one preference set is built from (enough pairs for the largest dose)"})
    pairs: list[int] = field(default_factory=lambda: [0, 250, 500, 1000, 2000], metadata={
        "help": "doses: the first n pairs of the set (0 = the base)"})
    sft_at_largest: bool = field(default=True, metadata={"help": "also SFT on the winners of the largest dose"})
    evaluate: dict = field(default_factory=lambda: {"split": "validation", "captions": 300}, metadata={
        "help": "overrides of the method's evaluate section (validation split only)"})
    prefs_processes: int = field(default=1, metadata={"help": "CPU processes building the set (torchrun)"})
    workers: int = field(default=1, metadata={"help": "processes training and evaluating the models after the build"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads per process (0 = torch's default)"})

    def __post_init__(self):
        doses = self.pairs
        if not doses or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in doses) \
                or sorted(set(doses)) != list(doses):
            raise ConfigError(f"pairs: expected increasing non-negative pair counts, got {doses}", ["pairs"])
        for name in ("train_captions", "prefs_processes", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}", [name])

    @property
    def largest(self) -> int:
        return max(self.pairs)


def method_config(cfg: ReproduceConfig):
    """The method's DemoConfig, writing into ``cfg.out``, its evaluation overridden by ``cfg.evaluate``."""
    from diffdpo.worlds.soundworld.demo import DemoConfig, EvalSettings

    if not Path(cfg.method).is_file():
        raise FileNotFoundError(f"method: no such demo config {cfg.method}")
    demo = load_config(DemoConfig, cfg.method)
    ev = from_dict(EvalSettings, merge(to_dict(demo.evaluate), cfg.evaluate), prefix="evaluate.")
    if ev.split == "test":
        raise ConfigError("evaluate.split: reproduce evaluates on validation captions; the test split is kept for "
                          "the pre-registered run (`diffdpo demo`)", ["evaluate.split"])
    return dataclasses.replace(demo, out=cfg.out, train_captions=cfg.train_captions, threads=cfg.threads, evaluate=ev)


def model_names(cfg: ReproduceConfig) -> list[str]:
    """``base``, ``dpo_<n>`` for every positive dose, ``sft_<largest>``."""
    names = ["base"] + [f"dpo_{n}" for n in cfg.pairs if n > 0]
    return names + ([f"sft_{cfg.largest}"] if cfg.sft_at_largest and cfg.largest > 0 else [])


def _model_config(demo, name: str):
    """The demo config one model trains with: the method's dpo settings reading the first n pairs."""
    kind, n = name.split("_")
    dpo = merge(demo.dpo, {"data": {"max_pairs": int(n)}})
    if kind == "sft":
        dpo = merge(dpo, {"loss": {"sft_epochs": 10**9}})  # as the demo's baseline: winners' denoising loss only
    return dataclasses.replace(demo, dpo=dpo)


# ------------------------------------------------------------------ stages


def build_set(demo, prefs_processes: int = 1, threads: int = 0, min_pairs: int = 0) -> dict:
    """The one preference set of ``demo`` (its builder stage, into ``demo.out``); on several processes
    when asked; refused when it holds fewer than ``min_pairs`` pairs. ``diffdpo soundworld compare``
    builds its set with it too."""
    from diffdpo.worlds.soundworld.demo import _cached, build_prefs, prefs_config
    from diffdpo.data.records import write_json_atomic
    from diffdpo.worlds.soundworld.dataset import split_scenes

    out = Path(demo.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = set_settings(demo)
    if _grows(out, settings, demo):  # more captions: the earlier shards are this set's first shards
        (out / "prefs" / "manifest.json").unlink(missing_ok=True)
        write_json_atomic(out / "set_settings.json", {"settings": settings})
    if _cached(out / "set_settings.json", settings) is None:
        write_json_atomic(out / "set_settings.json", {"settings": settings})
    if prefs_processes > 1 and not (out / "prefs" / "manifest.json").exists():
        scenes = split_scenes(demo.data_seed, "train", demo.train_captions, demo.train_kinds)
        (out / "train_captions.txt").write_text("".join(s.caption + "\n" for s in scenes))
        save_config(prefs_config(demo, out), out / "prefs_build.yaml")
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(threads or 1),
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={prefs_processes}",
               "-m", "diffdpo", "prefs", "build", "--config", str(out / "prefs_build.yaml"), "--no-progress"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
    manifest = build_prefs(demo, out)  # one process: builds what is left (all of it when alone), assembles
    if manifest["pairs"] < min_pairs:
        raise UserError(f"the preference set {out / 'prefs'} holds {manifest['pairs']} pairs, fewer than the {min_pairs} "
                        "asked for: use another out directory with more train_captions, or fewer pairs")
    return manifest


def set_settings(demo) -> dict:
    """What the one set is made with; the builder's hash covers the caption file's path, not its
    captions, so the caption count is guarded here."""
    return {"train_captions": demo.train_captions, "train_kinds": demo.train_kinds, "data_seed": demo.data_seed,
            "prefs": demo.prefs, "base": demo.base, "base_model": demo.base_model}


def _grows(out: Path, settings: dict, demo) -> bool:
    """True when ``out`` holds a set built with the same settings from fewer captions that this one
    extends: the captions are a prefix (the split's order), each caption's samples are seeded by the
    caption, so its full shards are this set's first ones; a last, partial shard of the earlier set
    (captions are de-duplicated, so this depends on the captions) must not have been built, as it lacks
    captions of the larger set: then the rerun is refused."""
    from diffdpo.prefs.build import unique_captions
    from diffdpo.worlds.soundworld.dataset import split_scenes

    path = out / "set_settings.json"
    if not path.exists():
        return False
    before = json.loads(path.read_text()).get("settings", {})
    same = {k: v for k, v in before.items() if k != "train_captions"} == \
        json.loads(json.dumps({k: v for k, v in settings.items() if k != "train_captions"}))
    if not same or before.get("train_captions", settings["train_captions"]) >= settings["train_captions"]:
        return False
    scenes = split_scenes(demo.data_seed, "train", before["train_captions"], demo.train_kinds)
    unique, _ = unique_captions([s.caption for s in scenes])
    full, rest = divmod(len(unique), int(demo.prefs.get("shard_size", 16)))
    return not rest or not (out / "prefs" / "shards" / f"{full:05d}.json").exists()


def dose_pair_ids(prefs_dir: Path, n: int) -> list[str]:
    """The ids of the pairs the trainer reads with ``data.max_pairs = n`` (data.ties=drop skips label-0.5
    records; the demo's builder writes none)."""
    from diffdpo.data.records import read_jsonl

    ids = []
    for rec in read_jsonl(prefs_dir / "prefs.jsonl"):
        if len(ids) == n:
            break
        if float(rec.label) != 0.5:
            ids.append(rec.id)
    return ids


def model_stage(cfg: ReproduceConfig, name: str) -> dict:
    """Train (unless base) and evaluate one model; both stages are the demo's, cached in ``out``."""
    import torch

    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld.clap import SoundWorldClap
    from diffdpo.worlds.soundworld.dataset import split_scenes
    from diffdpo.worlds.soundworld.demo import _model_dir, evaluate_pipeline, split_suffix, train_model
    from diffdpo.worlds.soundworld.oracle import Oracle

    demo = method_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, t0 = Path(cfg.out), time.time()
    train = None
    if name != "base":
        print(f"== train {name}", flush=True)
        train = train_model(_model_config(demo, name), out, name)
        if train["pairs"] != int(name.split("_")[1]):
            raise RuntimeError(f"{name}: the trainer read {train['pairs']} pairs")
    t1 = time.time()
    ev = demo.evaluate
    scenes = split_scenes(demo.data_seed, ev.split, ev.captions)
    model_dir = _model_dir(demo, out, name)
    print(f"== evaluate {name}", flush=True)
    result = evaluate_pipeline(lambda: TangoPipeline.from_pretrained(model_dir),
                               out / f"eval{split_suffix(ev.split)}" / name, scenes, Oracle.from_pretrained(),
                               SoundWorldClap(demo.clap_dir), ev, f"evaluate {name}", model_dir)
    return {"name": name, "train": train, "rows": result["rows"], "embeddings": result["embeddings"],
            "seconds": {"train": round(t1 - t0, 1), "evaluate": round(time.time() - t1, 1)}}


def _worker(cfg_dict: dict, name: str) -> dict:
    """One model's stages in a worker process (spawned: a fresh interpreter, its own torch threads)."""
    return model_stage(from_dict(ReproduceConfig, cfg_dict), name)


def run_models(cfg: ReproduceConfig) -> dict[str, dict]:
    names = model_names(cfg)
    if cfg.workers == 1:
        return {name: model_stage(cfg, name) for name in names}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # largest doses first: every DPO run takes the same steps, the base only an evaluation
    order = sorted(names, key=lambda n: (n == "base", -int(n.split("_")[1]) if n != "base" else 0))
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_worker, to_dict(cfg), name) for name in order}
        done = {name: f.result() for name, f in futures.items()}
    return {name: done[name] for name in names}


# ------------------------------------------------------------------ numbers


def dose_table(cfg: ReproduceConfig, results: dict[str, dict], scenes, reference: np.ndarray, n_resamples: int):
    """The demo's results table per model against the base (paired), merged into one table whose
    models are base, dpo @ n pairs, ... and whose deltas are each against the base."""
    from diffdpo.worlds.soundworld.demo import results_table

    label = lambda name: "base" if name == "base" else "{} @ {} pairs".format(*name.split("_"))
    merged: dict[str, dict] = {}
    for name, res in results.items():
        if name == "base":
            continue
        per = results_table({"base": results["base"], "dpo": res}, scenes, reference, n_resamples)
        for row in per:
            m = merged.setdefault(row["key"], {**{k: row[k] for k in ("metric", "key", "n", "higher_is_better")},
                                               "models": {"base": row["models"]["base"]}, "deltas": {}})
            m["models"][label(name)] = row["models"]["dpo"]
            m["deltas"][f"{label(name)} - base"] = row["deltas"]["dpo - base"]
    if not merged:  # only the base asked for
        per = results_table({"base": results["base"]}, scenes, reference, n_resamples)
        merged = {row["key"]: {**row, "deltas": {}} for row in per}
    return list(merged.values())


def dose_points(cfg: ReproduceConfig, table: list[dict]) -> dict[str, dict]:
    """Per metric key: the dpo curve against pairs (0 = the base) and the sft point, means and CIs, and
    the paired differences against the base."""
    out = {}
    for row in table:
        curve, delta_curve, sft = [], [], {}
        for n in cfg.pairs:
            name = "base" if n == 0 else f"dpo @ {n} pairs"
            curve.append({"x": n, **row["models"][name]})
            d = row["deltas"].get(f"{name} - base", {"mean": 0.0, "ci95": [0.0, 0.0], "n": row["n"]})
            delta_curve.append({"x": n, **d})
        if cfg.sft_at_largest and cfg.largest > 0:
            sft = {"x": cfg.largest, **row["models"][f"sft @ {cfg.largest} pairs"]}
            sft_delta = {"x": cfg.largest, **row["deltas"][f"sft @ {cfg.largest} pairs - base"]}
        out[row["key"]] = {"metric": row["metric"], "n": row["n"], "dpo": curve, "dpo_minus_base": delta_curve,
                           **({"sft": sft, "sft_minus_base": sft_delta} if sft else {})}
    return out


def _charts(points: dict) -> list[dict]:
    charts = []
    for key, title in (("satisfied", "oracle: caption satisfied"), ("clap", "proxy: CLAP score")):
        if key not in points:
            continue
        p = points[key]
        for which, suffix in (("", ""), ("_minus_base", " - base (paired)")):
            series = {"DPO": p[f"dpo{which}"]}
            if f"sft{which}" in p:
                series["SFT on winners"] = [p[f"sft{which}"]]
            charts.append({"title": title + suffix, "xlabel": "preference pairs", "series": series})
    return charts


def run_reproduce(cfg: ReproduceConfig) -> dict:
    import torch

    from diffdpo.report import write_report
    from diffdpo.worlds.soundworld.clap import SoundWorldClap
    from diffdpo.worlds.soundworld.dataset import clips
    from diffdpo.worlds.soundworld.demo import (_model_dir, evaluation_settings, example_indices, oracle_verdict,
                                                split_suffix, training_curves)

    demo = method_config(cfg)  # every config mistake is found before anything runs
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, started = Path(cfg.out), time.time()
    print("== prefs", flush=True)
    manifest = build_set(demo, cfg.prefs_processes, cfg.threads, cfg.largest)
    seconds = {"prefs": round(time.time() - started, 1)}
    t0 = time.time()
    results = run_models(cfg)
    seconds["models"] = round(time.time() - t0, 1)
    seconds["per_model"] = {name: r["seconds"] for name, r in results.items()}

    ev = demo.evaluate
    scenes, real_audio = clips(demo.data_seed, ev.split, ev.captions)
    clap = SoundWorldClap(demo.clap_dir)
    reference = clap.embed_audio(list(real_audio)).double().numpy()
    table = dose_table(cfg, results, scenes, reference, ev.bootstrap)
    points = dose_points(cfg, table)
    nested = {str(n): dose_pair_ids(out / "prefs", n) for n in cfg.pairs if n > 0}

    suffix = split_suffix(ev.split)
    examples = []
    for i in example_indices(scenes, ev.examples):
        verdict = {name: oracle_verdict(r["rows"][i]) for name, r in results.items()}
        examples.append({"caption": scenes[i].caption, "seed": ev.seed + i, "verdict": verdict,
                         "media": {name: f"eval{suffix}/{name}/audio/{i:04d}.wav" for name in results}})
    sat = points.get("satisfied", {}).get("dpo_minus_base", [])
    summary = (f"{demo.dpo['loss'].get('type')} (the method of {cfg.method}, not tuned here) trained on the first n "
               f"pairs of one preference set of {manifest['pairs']} pairs, evaluated on {ev.captions} {ev.split} "
               "captions (caption i from noise seed " f"{ev.seed} + i for every model). Oracle caption satisfied, "
               "difference against the base with paired bootstrap 95% CIs: "
               + "; ".join(f"{p['x']} pairs {p['mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
                           for p in sat if p["x"] > 0) + ".")
    if "sft_minus_base" in points.get("satisfied", {}):
        p = points["satisfied"]["sft_minus_base"]
        summary += f" SFT on the winners of {p['x']} pairs: {p['mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]."
    seconds["total"] = round(time.time() - started, 1)
    report = {
        "title": f"SoundWorld dose-response: {Path(cfg.method).stem} against preference pairs ({ev.split} captions)",
        "summary": summary,
        "table": table,
        "interval_charts": _charts(points),
        "dose_response": points,
        "curves": training_curves({name: r["train"] for name, r in results.items() if r["train"]}),
        "examples": examples,
        "nested_pairs": nested,
        "settings": {"reproduce": to_dict(cfg), "method": to_dict(demo),
                     "prefs_manifest": {k: v for k, v in manifest.items() if k != "config"},
                     "train": {name: r["train"]["settings"] for name, r in results.items() if r["train"]},
                     "pairs_read": {name: r["train"]["pairs"] for name, r in results.items() if r["train"]},
                     "models": {name: _model_dir(demo, out, name) for name in results},
                     "evaluation": evaluation_settings(ev, clap, demo.data_seed),
                     "seconds": seconds},
    }
    save_config(cfg, out / "reproduce_config.yaml")
    results_path = out / f"results{suffix}.json"
    results_path.write_text(json.dumps(report, indent=2))
    html = write_report(report, out, f"report{suffix}")
    print_table(points, cfg)
    print(f"\nseconds: {seconds}\nresults: {results_path}\nreport:  {html}\nmodels:  {out}/<dpo_N|sft_N>/final")
    return report


def print_table(points: dict, cfg: ReproduceConfig) -> None:
    keys = [k for k in (*ORACLE_KEYS, "clap") if k in points]
    print(f"\n{'pairs':>14s}" + "".join(f"{k:>34s}" for k in keys))
    rows = [(str(p["x"]), {k: (points[k]["dpo"][i], points[k]["dpo_minus_base"][i]) for k in keys})
            for i, p in enumerate(points[keys[0]]["dpo"])]
    if cfg.sft_at_largest and cfg.largest > 0:
        rows.append((f"sft {cfg.largest}", {k: (points[k]["sft"], points[k]["sft_minus_base"]) for k in keys}))
    for label, cells in rows:
        print(f"{label:>14s}" + "".join(f"{v['mean']:8.3f} {d['mean']:+.3f} [{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}]"
                                         for v, d in cells.values()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (recipes/configs/soundworld_reproduce_weak.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. out=runs/rep2 'pairs=[0,500]'")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(ReproduceConfig, args.config, args.overrides)
    method_config(cfg)
    run_reproduce(cfg)
    return 0
