"""Over-optimisation on SoundWorld: proxy (CLAP) vs oracle as beta, training steps and an SFT term vary.

    python recipes/soundworld_sweep.py --config recipes/configs/soundworld_sweep.yaml [key=value ...]

Reuses a finished demo directory (its preference set and its base-model evaluation), trains one
Diffusion-DPO run per variant with checkpoints, and evaluates each listed checkpoint on the same
held-out captions and seeds as the demo (or, with ``evaluate.captions=600`` and the like, on more
captions, the base evaluated anew beside the runs): the proxy's score (SoundWorld CLAP cosine, what the
preference set optimised) beside the oracle's (caption satisfied). Writes ``sweep.json`` and a
markdown table ``sweep.md``; finished runs and evaluations are read back on a rerun, and a run asked
for steps beyond its last checkpoint continues from there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from diffdpo.config import from_dict, load_config, merge, run_main, to_dict
from diffdpo.errors import ConfigError
from diffdpo.worlds.soundworld.compare import checkpoint_pipeline
from diffdpo.worlds.soundworld.demo import DemoConfig, EvalSettings, evaluate_pipeline, mean_interval, split_suffix


@dataclass
class SweepConfig:
    demo: str = field(default="runs/soundworld_demo", metadata={"help": "a finished `diffdpo demo` directory"})
    out: str = field(default="runs/soundworld_sweep")
    steps: list[int] = field(default_factory=lambda: [120, 240], metadata={"help": "checkpoints to evaluate"})
    runs: dict = field(default_factory=dict, metadata={"help": "name -> DiffusionDPOConfig overrides of the demo's"})
    evaluate: dict = field(default_factory=dict, metadata={"help": "overrides of the demo's evaluation settings"})
    threads: int = 0


def _summary(rows: list[dict], base_rows: list[dict], key: str) -> dict:
    import numpy as np

    v = np.array([float(r[key]) for r in rows])
    delta = mean_interval(v - np.array([float(r[key]) for r in base_rows]), 1000)
    return {**mean_interval(v, 1000), "delta_vs_base": delta["mean"], "delta_ci95": delta["ci95"]}


def _run_configs(cfg: SweepConfig, demo: DemoConfig, demo_dir: Path, base_dir: str) -> dict:
    """Each run's DiffusionDPOConfig, built (and so checked) before anything is trained or evaluated."""
    from diffdpo.diffusion.trainer import DiffusionDPOConfig

    if not cfg.steps or any(not isinstance(s, int) or s <= 0 for s in cfg.steps):
        raise ConfigError(f"steps: give positive checkpoint steps, got {cfg.steps}", ["steps"])
    configs = {}
    for name, overrides in cfg.runs.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"runs.{name}: expected a mapping of DiffusionDPOConfig overrides, got {overrides!r}",
                              [f"runs.{name}"])
        try:
            configs[name] = from_dict(DiffusionDPOConfig, merge(merge(demo.dpo, overrides or {}), {
                "model": {"family": "tango", "name_or_path": base_dir},
                "data": {"source": "jsonl", "path": str(demo_dir / "prefs")},
                "train": {"output_dir": str(Path(cfg.out) / name), "seed": demo.seed, "report_to": "none",
                          "max_steps": max(cfg.steps), "save_every": math.gcd(*cfg.steps), "keep_last": None}}))
        except ConfigError as e:
            raise ConfigError(f"runs.{name}: {e}", [f"runs.{name}.{k}" for k in e.keys]) from e
    return configs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # every user mistake (config, keys, the demo directory, the runs' overrides) is found here, before
    # any model loads
    cfg = load_config(SweepConfig, args.config, args.overrides)
    demo_dir, out = Path(cfg.demo), Path(cfg.out)
    if not (demo_dir / "demo_config.yaml").is_file():
        raise FileNotFoundError(f"demo: {demo_dir} is not a finished `diffdpo demo` directory (no demo_config.yaml)")
    demo = load_config(DemoConfig, demo_dir / "demo_config.yaml")
    ev = from_dict(EvalSettings, merge(to_dict(demo.evaluate), cfg.evaluate), prefix="evaluate.")

    import torch

    from diffdpo.diffusion.trainer import train
    from diffdpo.worlds.soundworld.clap import SoundWorldClap
    from diffdpo.worlds.soundworld.dataset import clips
    from diffdpo.worlds.soundworld.demo import _model_dir
    from diffdpo.worlds.soundworld.oracle import Oracle
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    base_dir = _model_dir(demo, demo_dir, "base")
    run_configs = _run_configs(cfg, demo, demo_dir, base_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    key = lambda e: (e.split, e.captions, e.steps, e.guidance, e.seed)
    # the demo's own settings reuse its base evaluation; others (e.g. more captions, for tighter
    # intervals) evaluate the base here, in folders named by those settings
    tag = "" if key(ev) == key(demo.evaluate) else "_{}_{}c_{}s_g{}_seed{}".format(*key(ev))
    scenes, _ = clips(demo.data_seed, ev.split, ev.captions)
    oracle, clap = Oracle.from_pretrained(), SoundWorldClap(demo.clap_dir)
    base = evaluate_pipeline(lambda: TangoPipeline.from_pretrained(base_dir),
                             (out / f"base_eval{tag}") if tag else demo_dir / f"eval{split_suffix(ev.split)}" / "base",
                             scenes, oracle, clap, ev, "base", base_dir)
    table = []
    for name, overrides in cfg.runs.items():
        run_dir = out / name
        tcfg = run_configs[name]
        if not all((run_dir / "checkpoints" / f"step_{step}").exists() for step in cfg.steps):
            train(tcfg, resume=True)  # a finished run asked for later steps continues from its last checkpoint
        for step in cfg.steps:
            checkpoint = run_dir / "checkpoints" / f"step_{step}"
            result = evaluate_pipeline(lambda c=checkpoint: checkpoint_pipeline(base_dir, c),
                                       run_dir / f"eval{tag}" / f"step_{step}", scenes, oracle, clap, ev, f"{name} @ {step}",
                                       str(checkpoint))
            table.append({"run": name, "step": step, "overrides": overrides,
                          "proxy_clap": _summary(result["rows"], base["rows"], "clap"),
                          "oracle_satisfied": _summary(result["rows"], base["rows"], "satisfied"),
                          "oracle_presence_f1": _summary(result["rows"], base["rows"], "presence_f1"),
                          "oracle_order": _summary([r for r in result["rows"] if r["kind"] == "sequence"],
                                                   [r for r in base["rows"] if r["kind"] == "sequence"],
                                                   "order_correct")})
    report = {"demo": str(demo_dir), "evaluate": to_dict(ev), "base": {
        "proxy_clap": _summary(base["rows"], base["rows"], "clap"),
        "oracle_satisfied": _summary(base["rows"], base["rows"], "satisfied"),
        "oracle_presence_f1": _summary(base["rows"], base["rows"], "presence_f1")}, "table": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    lines = ["| run | step | proxy CLAP (delta vs base) | oracle satisfied (delta vs base) | presence F1 (delta) "
             "| order, sequences (delta) |", "|---|---|---|---|---|---|"]
    fmt = lambda s: f"{s['mean']:.3f} ({s['delta_vs_base']:+.3f} [{s['delta_ci95'][0]:+.3f}, {s['delta_ci95'][1]:+.3f}])"
    for row in table:
        lines.append(f"| {row['run']} | {row['step']} | {fmt(row['proxy_clap'])} | {fmt(row['oracle_satisfied'])} "
                     f"| {fmt(row['oracle_presence_f1'])} | {fmt(row['oracle_order'])} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.md'}")
    return report


if __name__ == "__main__":
    run_main(main)  # a user mistake (config, key, value, missing file): one line on stderr, exit code 2
