"""``diffdpo soundworld compare``: preference losses side by side on ONE preference set, judged by the oracle.

    diffdpo soundworld compare --config recipes/configs/soundworld_compare_flow.yaml [key=value ...]

The method is a demo config (``method``): its base, builder settings and training settings are shared
by every arm; each arm overrides its ``dpo`` section (loss type and beta, timestep density, how
unpaired losses read the pairs), so the arms differ only where they are meant to. An arm named ``sft``
trains the winners' denoising loss only (the demo's baseline). The job:

1. **prefs**: one preference set from the method's training captions (the demo's builder stage, shard by
   shard; on ``prefs_processes`` CPU processes when > 1);
2. **train**: every arm with a model to evaluate, to the largest of ``checkpoints`` steps with a checkpoint at
   each of them (same seed, pairs, batch and learning rate unless the arm overrides them);
3. **evaluate**: the base and the models named ``arm@step`` in ``models`` (every arm at every checkpoint
   when empty) on the same held-out captions and seeds: the oracle's caption satisfied, order, single-event
   accuracy, the proxy CLAP and FAD, with bootstrap 95% CIs and paired differences against the base and
   between ``primary``'s models and every other;
4. **report**: ``results_<split>.json`` and ``report_<split>.html``.

Settings are chosen on the validation split (every arm at every checkpoint); a pre-registered run then
evaluates the chosen ``arm@step`` models on the test split, once, from the same ``out`` (the models are
read back, not retrained). Every stage is the demo's, so each writes its output once with its settings,
is read back when finished, and refuses an output made with other settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffdpo.config import from_dict, load_config, merge, save_config, to_dict
from diffdpo.errors import ConfigError

SHOWN = ("satisfied", "order_correct", "single_event", "clap")  # the printed table's columns


@dataclass
class CompareConfig:
    method: str = field(default="recipes/configs/soundworld_demo_weak.yaml", metadata={
        "help": "demo config: the base, the builder settings and the training settings every arm shares"})
    out: str = field(default="runs/soundworld_compare", metadata={"help": "output directory (resumable)"})
    arms: dict = field(default_factory=dict, metadata={
        "help": "name -> overrides of the method's dpo section (an arm named sft: winners' loss only)"})
    checkpoints: list[int] = field(default_factory=lambda: [120, 240], metadata={
        "help": "steps each arm is saved at (it trains to the largest)"})
    models: list[str] = field(default_factory=list, metadata={
        "help": "arm@step models to evaluate beside the base; empty = every arm at every checkpoint"})
    primary: str | None = field(default=None, metadata={
        "help": "arm whose evaluated models get paired differences against every other model"})
    evaluate: dict = field(default_factory=lambda: {"split": "validation", "captions": 300}, metadata={
        "help": "overrides of the method's evaluate section"})
    prefs_processes: int = field(default=1, metadata={"help": "CPU processes building the set (torchrun)"})
    workers: int = field(default=1, metadata={"help": "processes training and evaluating the arms after the build"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads per process (0 = torch's default)"})

    def __post_init__(self):
        if not self.arms:
            raise ConfigError("arms: name at least one arm (name -> overrides of the method's dpo section)", ["arms"])
        for name, overrides in self.arms.items():
            if "@" in name or "/" in name:
                raise ConfigError(f"arms.{name}: an arm's name may not hold '@' or '/'", [f"arms.{name}"])
            if overrides is not None and not isinstance(overrides, dict):
                raise ConfigError(f"arms.{name}: expected a mapping of dpo overrides, got {overrides!r}",
                                  [f"arms.{name}"])
        if not self.checkpoints or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0
                                       for s in self.checkpoints):
            raise ConfigError(f"checkpoints: give positive steps, got {self.checkpoints}", ["checkpoints"])
        for label in self.models:
            arm, _, step = str(label).partition("@")
            if arm not in self.arms or not step.isdigit() or int(step) not in self.checkpoints:
                raise ConfigError(f"models: {label!r} is not arm@step for an arm of arms and a step of checkpoints "
                                  f"({sorted(self.arms)}, {self.checkpoints})", ["models"])
        if self.primary is not None and self.primary not in self.arms:
            raise ConfigError(f"primary: {self.primary!r} is not one of the arms {sorted(self.arms)}", ["primary"])
        for name in ("prefs_processes", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}", [name])

    def evaluated(self) -> list[str]:
        """The ``arm@step`` labels evaluated beside the base, in arm then step order."""
        every = [f"{arm}@{step}" for arm in self.arms for step in sorted(self.checkpoints)]
        return [label for label in every if not self.models or label in self.models]


def method_config(cfg: CompareConfig):
    """The method's DemoConfig writing into ``cfg.out``, its evaluation overridden by ``cfg.evaluate``."""
    from diffdpo.worlds.soundworld.demo import DemoConfig, EvalSettings

    if not Path(cfg.method).is_file():
        raise FileNotFoundError(f"method: no such demo config {cfg.method}")
    demo = load_config(DemoConfig, cfg.method)
    ev = from_dict(EvalSettings, merge(to_dict(demo.evaluate), cfg.evaluate), prefix="evaluate.")
    return dataclasses.replace(demo, out=cfg.out, threads=cfg.threads, evaluate=ev)


def arm_config(cfg: CompareConfig, demo, arm: str):
    """The demo config arm ``arm`` trains with: the method's dpo section, the arm's overrides, and a
    checkpoint at every step of ``checkpoints``."""
    steps = sorted(cfg.checkpoints)
    dpo = merge(merge(demo.dpo, cfg.arms[arm] or {}), {"train": {
        "max_steps": steps[-1], "save_every": math.gcd(*steps), "keep_last": None}})
    return dataclasses.replace(demo, dpo=dpo)


def check_arms(cfg: CompareConfig, demo) -> None:
    """Every arm's trainer config is built (and so checked) before anything runs."""
    from diffdpo.worlds.soundworld.demo import training_config

    for arm in cfg.arms:
        try:
            training_config(arm_config(cfg, demo, arm), Path(cfg.out), arm)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"arms.{arm}: {e}", [f"arms.{arm}"]) from e


def checkpoint_pipeline(base_dir: str, checkpoint: Path):
    """The base with a training checkpoint's trainable weights loaded (safetensors)."""
    from safetensors.torch import load_file

    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.diffusion.trainer import load_trainable_state

    pipe = TangoPipeline.from_pretrained(base_dir)
    load_trainable_state(pipe.unet, load_file(checkpoint / "trainable.safetensors"))
    return pipe


# ------------------------------------------------------------------ stages


def job(cfg: CompareConfig, name: str) -> dict:
    """One worker's share: ``base`` (its evaluation) or an arm (training, then its evaluated checkpoints)."""
    import torch

    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld.clap import SoundWorldClap
    from diffdpo.worlds.soundworld.dataset import split_scenes
    from diffdpo.worlds.soundworld.demo import _model_dir, evaluate_pipeline, split_suffix, train_model
    from diffdpo.worlds.soundworld.oracle import Oracle

    demo = method_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, ev, t0 = Path(cfg.out), demo.evaluate, time.time()
    scenes = split_scenes(demo.data_seed, ev.split, ev.captions)
    oracle, clap = Oracle.from_pretrained(), SoundWorldClap(demo.clap_dir)
    folder = out / f"eval{split_suffix(ev.split)}"
    base_dir = _model_dir(demo, out, "base")
    if name == "base":
        result = evaluate_pipeline(lambda: TangoPipeline.from_pretrained(base_dir), folder / "base", scenes, oracle,
                                   clap, ev, "evaluate base", base_dir)
        return {"evals": {"base": result}, "train": None, "seconds": {"evaluate": round(time.time() - t0, 1)}}
    print(f"== train {name}", flush=True)
    train = train_model(arm_config(cfg, demo, name), out, name)
    t1 = time.time()
    evals = {}
    for label in (m for m in cfg.evaluated() if m.partition("@")[0] == name):
        step = int(label.partition("@")[2])
        checkpoint = out / name / "checkpoints" / f"step_{step}"
        evals[label] = evaluate_pipeline(lambda c=checkpoint: checkpoint_pipeline(base_dir, c),
                                         folder / name / f"step_{step}", scenes, oracle, clap, ev,
                                         f"evaluate {label}", str(checkpoint))
    return {"evals": evals, "train": train,
            "seconds": {"train": round(t1 - t0, 1), "evaluate": round(time.time() - t1, 1)}}


def _worker(cfg_dict: dict, name: str) -> dict:
    """One job in a worker process (spawned: a fresh interpreter with its own torch threads)."""
    return job(from_dict(CompareConfig, cfg_dict), name)


def run_jobs(cfg: CompareConfig) -> dict[str, dict]:
    """The jobs of the arms with a model to evaluate, then the base's, on ``workers`` processes."""
    evaluated = {label.partition("@")[0] for label in cfg.evaluated()}
    names = [*(arm for arm in cfg.arms if arm in evaluated), "base"]
    if cfg.workers == 1:
        return {name: job(cfg, name) for name in names}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_worker, to_dict(cfg), name) for name in names}
        return {name: f.result() for name, f in futures.items()}


def compared_pairs(cfg: CompareConfig) -> list[tuple[str, str]]:
    """Paired differences reported: each model against the base, then ``primary``'s models against
    every other model."""
    labels = cfg.evaluated()
    pairs = [(label, "base") for label in labels]
    if cfg.primary:
        mine = [m for m in labels if m.partition("@")[0] == cfg.primary]
        pairs += [(a, b) for a in mine for b in labels if b.partition("@")[0] != cfg.primary]
    return pairs


def run_compare(cfg: CompareConfig) -> dict:
    from diffdpo.report import write_report
    from diffdpo.worlds.soundworld.clap import SoundWorldClap
    from diffdpo.worlds.soundworld.dataset import clips
    from diffdpo.worlds.soundworld.demo import (_model_dir, audit_pairs, evaluation_settings, example_indices,
                                                oracle_verdict, results_table, split_suffix, summary_text,
                                                training_curves)
    from diffdpo.worlds.soundworld.oracle import Oracle
    from diffdpo.worlds.soundworld.reproduce import build_set

    demo = method_config(cfg)  # every config mistake is found before anything runs
    check_arms(cfg, demo)
    out, started = Path(cfg.out), time.time()
    print("== prefs", flush=True)
    manifest = build_set(demo, cfg.prefs_processes, cfg.threads)
    seconds = {"prefs": round(time.time() - started, 1)}
    t0 = time.time()
    jobs = run_jobs(cfg)
    seconds.update(jobs=round(time.time() - t0, 1), per_job={name: j["seconds"] for name, j in jobs.items()})

    evals = {"base": jobs["base"]["evals"]["base"]}
    evals.update({label: jobs[label.partition("@")[0]]["evals"][label] for label in cfg.evaluated()})
    ev = demo.evaluate
    scenes, real_audio = clips(demo.data_seed, ev.split, ev.captions)
    clap = SoundWorldClap(demo.clap_dir)
    reference = clap.embed_audio(list(real_audio)).double().numpy()
    table = results_table(evals, scenes, reference, ev.bootstrap, tuple(compared_pairs(cfg)))
    audit = audit_pairs(out / "prefs", Oracle.from_pretrained())

    suffix = split_suffix(ev.split)
    folders = {"base": "base", **{m: "{}/step_{}".format(*m.split("@")) for m in cfg.evaluated()}}
    examples = [{"caption": scenes[i].caption, "seed": ev.seed + i,
                 "verdict": {m: oracle_verdict(e["rows"][i]) for m, e in evals.items()},
                 "media": {m: f"eval{suffix}/{folders[m]}/audio/{i:04d}.wav" for m in evals}}
                for i in example_indices(scenes, ev.examples)]
    seconds["total"] = round(time.time() - started, 1)
    report = {
        "title": f"SoundWorld: {', '.join(cfg.arms)} on one preference set ({ev.split} captions)",
        "summary": summary_text(table) + " The oracle on the {pairs} pairs: the winner satisfies its caption and "
                   "the loser does not in {winner_only:.0%}, the reverse in {loser_only:.0%}, a tie in {tie:.0%}."
                   .format(**audit["all"]),
        "table": table,
        "curves": training_curves({arm: j["train"] for arm, j in jobs.items() if j["train"]}),
        "examples": examples,
        "pair_audit": audit,
        "settings": {"compare": to_dict(cfg), "method": to_dict(demo),
                     "prefs_manifest": {k: v for k, v in manifest.items() if k != "config"},
                     "train": {arm: j["train"]["settings"] for arm, j in jobs.items() if j["train"]},
                     "pairs_read": {arm: j["train"]["pairs"] for arm, j in jobs.items() if j["train"]},
                     "models": {"base": _model_dir(demo, out, "base"),
                                **{m: str(out / m.split("@")[0] / "checkpoints" / f"step_{m.split('@')[1]}")
                                   for m in cfg.evaluated()}},
                     "evaluation": evaluation_settings(ev, clap, demo.data_seed),
                     "seconds": seconds},
    }
    save_config(cfg, out / f"compare_config{suffix}.yaml")
    results_path = out / f"results{suffix}.json"
    results_path.write_text(json.dumps(report, indent=2))
    (out / f"results{suffix}.md").write_text(markdown_table(table))
    html = write_report(report, out, f"report{suffix}")
    print_table(table)
    print(f"\nseconds: {seconds}\nresults: {results_path} (table: results{suffix}.md)\nreport:  {html}")
    return report


def markdown_table(table: list[dict]) -> str:
    """One row per model, one column per metric: the mean and, beside it, the paired difference against
    the base with its 95% CI (bold when the CI excludes 0); then the other paired differences, one row each."""
    head = "| model | " + " | ".join(f"{row['metric']} (n={row['n']})" for row in table) + " |"
    lines = [head, "|" + "---|" * (len(table) + 1)]
    ci = lambda d: ("**{:+.3f} [{:+.3f}, {:+.3f}]**" if d["ci95"][0] > 0 or d["ci95"][1] < 0
                    else "{:+.3f} [{:+.3f}, {:+.3f}]").format(d["mean"], *d["ci95"])
    for model in table[0]["models"]:
        cells = [f"{row['models'][model]['mean']:.3f}" + (f" ({ci(row['deltas'][f'{model} - base'])})"
                                                         if f"{model} - base" in row["deltas"] else "")
                 for row in table]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    for name in (n for n in table[0]["deltas"] if not n.endswith(" - base")):
        lines.append(f"| {name} | " + " | ".join(ci(row["deltas"][name]) for row in table) + " |")
    return "\n".join(lines) + "\n"


def print_table(table: list[dict]) -> None:
    """Each model's mean and its paired difference against the base, for the :data:`SHOWN` metrics."""
    rows = {row["key"]: row for row in table if row["key"] in SHOWN}
    keys = [k for k in SHOWN if k in rows]
    print(f"\n{'model':>22s}" + "".join(f"{k:>34s}" for k in keys))
    for model in rows[keys[0]]["models"]:
        cells = []
        for k in keys:
            v, d = rows[k]["models"][model], rows[k]["deltas"].get(f"{model} - base")
            cells.append(f"{v['mean']:8.3f}" + (f" {d['mean']:+.3f} [{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}]"
                                                 if d else " " * 25))
        print(f"{model:>22s}" + "".join(cells))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (recipes/configs/soundworld_compare_flow.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluate.split=test")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_compare(load_config(CompareConfig, args.config, args.overrides))
    return 0
