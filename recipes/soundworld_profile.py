"""The shipped SoundWorld bases side by side, and the ceiling their shared decoder sets.

    python recipes/soundworld_profile.py [evaluate.split=validation] [evaluate.captions=300] [out=runs/soundworld_profile]

Every base generates the same held-out captions from the same seeds (caption ``i`` from seed
``seed + i``, as in the demo) and the oracle judges each clip: caption satisfied, single-event
accuracy, order on sequences, right events, presence F1; one CLAP (``clap``: the clean base's by
default, so the column is one instrument) gives the CLAP score and the FAD against the real clips.
The ceiling is the oracle on the real clips passed through the bases' VAE and vocoder (both bases
share them): what no UNet can exceed. Writes ``profile.json`` and ``profile.md``; finished
evaluations are read back on a rerun.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffdpo.config import load_config, run_main
from diffdpo.worlds.soundworld.demo import METRICS, EvalSettings, evaluate_pipeline, mean_interval, results_table


@dataclass
class ProfileConfig:
    out: str = field(default="runs/soundworld_profile")
    bases: list[str] = field(default_factory=lambda: ["clean", "weak"], metadata={"help": "shipped bases to profile"})
    clap: str = field(default="clean", metadata={"help": "whose CLAP measures every row (a shipped base's name)"})
    data_seed: int = 0
    evaluate: EvalSettings = field(default_factory=lambda: EvalSettings(split="validation", captions=300))
    threads: int = 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*", help="e.g. evaluate.split=test evaluate.captions=500")
    args = parser.parse_args(argv)
    cfg = load_config(ProfileConfig, args.config, args.overrides)

    import torch

    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.errors import ConfigError
    from diffdpo.worlds.soundworld import BASES
    from diffdpo.worlds.soundworld.clap import SoundWorldClap
    from diffdpo.worlds.soundworld.dataset import clips
    from diffdpo.worlds.soundworld.evaluate import decoder_ceiling
    from diffdpo.worlds.soundworld.oracle import Oracle

    unknown = [b for b in [*cfg.bases, cfg.clap] if b not in BASES]
    if unknown or not cfg.bases:
        raise ConfigError(f"bases / clap: expected names among {list(BASES)}, got {unknown or cfg.bases}",
                          ["bases", "clap"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, ev = Path(cfg.out), cfg.evaluate
    scenes, real = clips(cfg.data_seed, ev.split, ev.captions)
    oracle, clap = Oracle.from_pretrained(), SoundWorldClap(BASES[cfg.clap] / "clap")
    evals = {}
    for base in cfg.bases:
        model = str(BASES[base] / "generator")
        evals[base] = evaluate_pipeline(lambda m=model: TangoPipeline.from_pretrained(m), out / f"{ev.split}_{ev.captions}" / base,
                                        scenes, oracle, clap, ev, f"profile {base}", model)
    table = results_table(evals, scenes, clap.embed_audio(list(real)).double().numpy(), ev.bootstrap)
    ceiling = decoder_ceiling(TangoPipeline.from_pretrained(BASES[cfg.bases[0]] / "generator"), oracle, scenes,
                              real)["vae_vocoder"]["rows"]
    oracle_rows = {key: (row_field, kind) for key, row_field, _, kind, _ in METRICS if key != "clap"}
    for row in table:  # the ceiling's oracle numbers beside the bases' (it has no CLAP or FAD of its own)
        if row["key"] not in oracle_rows:
            continue
        row_field, kind = oracle_rows[row["key"]]
        values = np.array([float(r[row_field]) for s, r in zip(scenes, ceiling) if kind is None or s.kind == kind])
        row["ceiling"] = mean_interval(values, ev.bootstrap)
    report = {"settings": {"split": ev.split, "captions": ev.captions, "steps": ev.steps, "guidance": ev.guidance,
                           "seed": ev.seed, "clap": cfg.clap, "data_seed": cfg.data_seed}, "table": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    fmt = lambda v: f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
    lines = [f"| metric (n) | {' | '.join(cfg.bases)} | ceiling (real clips through VAE + vocoder) |",
             "|---" * (len(cfg.bases) + 2) + "|"]
    for row in table:
        cells = [fmt(row["models"][b]) for b in cfg.bases] + [fmt(row["ceiling"]) if "ceiling" in row else "-"]
        lines.append(f"| {row['metric']} ({row['n']}) | " + " | ".join(cells) + " |")
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'profile.json'} and {out / 'profile.md'}")
    return report


if __name__ == "__main__":
    run_main(main)  # a user mistake (config, key, value): one line on stderr, exit code 2
