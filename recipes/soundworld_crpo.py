"""CRPO on SoundWorld: rounds of generate -> CLAP-rank -> DPO + the winners' loss, judged by the oracle per round.

    python recipes/soundworld_crpo.py --config recipes/configs/soundworld_crpo.yaml [key=value ...]

TangoFlux's CLAP-ranked preference optimisation (Hung et al. 2024, arXiv:2412.21037) as rounds of the
online loop (:mod:`diffdpo.online.loop`) with the diffusion policy (:mod:`diffdpo.diffusion.online`):
each round takes the next SoundWorld training captions, samples ``K`` clips per caption from the
current model, scores them with the base's own SoundWorld CLAP (the proxy, as the offline demo's
builder does), pairs the best with the worst, and trains Diffusion-DPO plus the winners' denoising
loss. Before the first round and after every round the model generates the same validation captions
from the same seeds (caption ``i`` from seed ``evaluate.seed + i``, the demo's protocol) and the oracle
judges them: caption satisfied, order, single-event accuracy, presence; and the proxy CLAP. Only the
validation split is evaluated here: this is a journal recipe, the test split stays with the
pre-registered offline run.

Writes under ``out``: ``rounds/`` (each round's pairs as a preference set, with the sampled clips),
``checkpoints/`` (resume: a rerun continues after the last finished round; a rerun with other settings
is refused), ``eval_validation/round_K/`` (per-caption rows, cached), ``final/`` (the model),
``results.json``, ``results.md`` and ``report.html``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from diffdpo.config import load_config, run_main, save_config, to_dict  # noqa: E402
from diffdpo.diffusion.online import OnlineDiffusionTrain, check_online_loss, check_sampler  # noqa: E402
from diffdpo.diffusion.trainer import LossConfig  # noqa: E402
from diffdpo.errors import ConfigError, UserError  # noqa: E402
from diffdpo.online.loop import OnlineConfig  # noqa: E402
from diffdpo.prefs.build import ScorerConfig  # noqa: E402
from diffdpo.worlds.soundworld.demo import EvalSettings  # noqa: E402


def _crpo_online() -> OnlineConfig:
    return OnlineConfig(rounds=3, prompts_per_round=79, samples_per_prompt=5, steps_per_round=80, budget=1191,
                        sampler="current", reference="previous_round")


def _crpo_loss() -> LossConfig:
    return LossConfig(type="sigmoid", beta=2000.0, beta_convention="tangoflux", sft_weight=1.0)


@dataclass
class PreferenceSettings:
    scorer: ScorerConfig = field(default_factory=ScorerConfig, metadata={
        "help": "the builder's scorer; clap:soundworld without ckpt = the base's own CLAP (the proxy)"})
    temperature: float = field(default=1.0, metadata={"help": "Bradley-Terry temperature (best vs worst ignores it)"})


@dataclass
class CrpoConfig:
    out: str = "runs/soundworld_crpo_weak"
    base: str = field(default="weak", metadata={"help": "shipped base: clean or weak (its CLAP is the proxy)"})
    base_model: str | None = field(default=None, metadata={"help": "Tango-layout folder (default: the base's generator)"})
    data_seed: int = field(default=0, metadata={"help": "SoundWorld data seed (training and validation captions)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    train_kinds: list[str] = field(default_factory=lambda: ["sequence", "overlap"], metadata={
        "help": "training captions of these kinds (the offline demo's); empty = the split's mix"})
    online: OnlineConfig = field(default_factory=_crpo_online)
    loss: LossConfig = field(default_factory=_crpo_loss)
    train: OnlineDiffusionTrain = field(default_factory=OnlineDiffusionTrain)
    preference: PreferenceSettings = field(default_factory=PreferenceSettings)
    evaluate: EvalSettings = field(default_factory=lambda: EvalSettings(split="validation", captions=300))

    def __post_init__(self):
        from diffdpo.worlds.soundworld import BASES

        if self.base not in BASES:
            raise ConfigError(f"base: expected one of {list(BASES)}, got {self.base!r}", ["base"])
        if self.evaluate.split != "validation":
            raise ConfigError("evaluate.split: this journal recipe evaluates validation captions only (the test "
                              "split belongs to the pre-registered offline run)", ["evaluate.split"])
        for name, check in (("online.sampler", lambda: check_sampler(self.online.sampler)),
                            ("loss", lambda: check_online_loss(self.loss))):
            try:
                check()
            except ValueError as e:
                raise ConfigError(str(e), [name]) from None

    @property
    def base_dir(self) -> Path:
        from diffdpo.worlds.soundworld import BASES

        return BASES[self.base]

    @property
    def model_dir(self) -> str:
        return self.base_model or str(self.base_dir / "generator")


def settings_hash(cfg: CrpoConfig) -> str:
    """What the rounds' models depend on: every setting but where it runs, how many rounds it runs for
    (a finished run may be extended) and how it is evaluated."""
    d = to_dict(cfg)
    for key in ("out", "threads", "evaluate"):
        d.pop(key)
    d["online"].pop("rounds")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def shown_path(path: str | Path) -> str:
    """A path as results report it: repository-relative when inside the repository (no machine's prefix)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def round_name(k: int) -> str:
    return "base" if k == 0 else f"round {k}"


# ------------------------------------------------------------------ numbers


def per_round_table(evals: dict[str, dict], scenes, reference: np.ndarray, n_resamples: int) -> list[dict]:
    """The demo's table (each model's mean and 95% CI, FAD) with paired differences ``round k - base``
    (same captions, same seeds) for every round."""
    from diffdpo.metrics.frechet import GaussianStats, frechet_distance_from_stats
    from diffdpo.metrics.stats import bootstrap_ci
    from diffdpo.worlds.soundworld.demo import METRICS, mean_interval, results_table

    table = results_table(evals, scenes, reference, n_resamples)
    fields = {key: (row_field, kind) for key, row_field, _, kind, _ in METRICS}
    rounds = [m for m in evals if m != "base"]
    ref = GaussianStats.from_embeddings(reference)
    items = np.arange(len(scenes))

    def fad(emb: np.ndarray) -> float:
        return frechet_distance_from_stats(ref, GaussianStats.from_embeddings(emb))

    for row in table:
        row["deltas"] = {}
        for m in rounds:
            if row["key"] == "fad":
                ea, eb = evals[m]["embeddings"], evals["base"]["embeddings"]
                ci = bootstrap_ci(lambda i: fad(ea[i]) - fad(eb[i]), [items], n_resamples=min(n_resamples, 200))
                row["deltas"][f"{m} - base"] = {"mean": row["models"][m]["mean"] - row["models"]["base"]["mean"],
                                                "ci95": [ci.low, ci.high], "n": len(items)}
                continue
            row_field, kind = fields[row["key"]]
            idx = [i for i, s in enumerate(scenes) if kind is None or s.kind == kind]
            a = np.array([float(evals[m]["rows"][i][row_field]) for i in idx])
            b = np.array([float(evals["base"]["rows"][i][row_field]) for i in idx])
            row["deltas"][f"{m} - base"] = mean_interval(a - b, n_resamples)
    return table


def audit_rounds(rounds_dir: Path, oracle) -> list[dict]:
    """The oracle's view of each round's pairs (what the CLAP ranking taught): how often the winner
    satisfies its caption and the loser does not, the reverse, or a tie."""
    import soundfile as sf

    from diffdpo.worlds.soundworld.evaluate import caption_satisfied
    from diffdpo.worlds.soundworld.oracle import score_detection
    from diffdpo.worlds.soundworld.scenes import scene_from_caption

    out = []
    for path in sorted(rounds_dir.glob("round_*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        clips = [sf.read(rounds_dir / r[side], dtype="float32")[0] for r in rows for side in ("chosen", "rejected")]
        detections = oracle.detect(clips)
        won_lost = np.array([[float(caption_satisfied(score_detection(scene_from_caption(r["prompt"]), d)))
                              for d in detections[2 * i:2 * i + 2]] for i, r in enumerate(rows)])
        out.append({"round": rows[0]["round"] + 1, "pairs": len(rows),
                    "winner_only": float(np.mean(won_lost[:, 0] > won_lost[:, 1])),
                    "loser_only": float(np.mean(won_lost[:, 0] < won_lost[:, 1])),
                    "tie": float(np.mean(won_lost[:, 0] == won_lost[:, 1])),
                    "winner_satisfied": float(won_lost[:, 0].mean()), "loser_satisfied": float(won_lost[:, 1].mean())})
    return out


def markdown_table(table: list[dict]) -> str:
    models = list(table[0]["models"])
    deltas = list(table[0]["deltas"])

    def cell(v: dict, signed: bool = False) -> str:
        f = "{:+.3f}" if signed else "{:.3f}"
        mark = "**" if signed and (v["ci95"][0] > 0 or v["ci95"][1] < 0) else ""
        return f"{mark}{f.format(v['mean'])} [{f.format(v['ci95'][0])}, {f.format(v['ci95'][1])}]{mark}"

    lines = ["| metric (n) | " + " | ".join(models) + " | " + " | ".join(deltas) + " |",
             "|---" * (1 + len(models) + len(deltas)) + "|"]
    for row in table:
        cells = [f"{row['models'][m]['mean']:.3f}" for m in models]
        cells += [cell(row["deltas"][d], signed=True) if d in row["deltas"] else "-" for d in deltas]
        lines.append(f"| {row['metric']} ({row['n']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the job


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (recipes/configs/soundworld_crpo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. out=runs/crpo2 online.rounds=4")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(CrpoConfig, args.config, args.overrides)
    return run_crpo(cfg)


def run_crpo(cfg: CrpoConfig) -> dict:
    import torch

    from diffdpo.diffusion.models import load_backbone
    from diffdpo.diffusion.online import DiffusionOnlinePolicy, media_reward
    from diffdpo.online.loop import run_online
    from diffdpo.preference_model import RewardPreference, scorer_reward
    from diffdpo.prefs.backends import make_scorer
    from diffdpo.report import write_report
    from diffdpo.worlds.soundworld.clap import SoundWorldClap
    from diffdpo.worlds.soundworld.dataset import clips, split_scenes
    from diffdpo.worlds.soundworld.demo import (evaluate_pipeline, evaluation_settings, example_indices, oracle_verdict,
                                                summary_text)
    from diffdpo.worlds.soundworld.oracle import Oracle

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not Path(cfg.model_dir).is_dir():
        raise UserError(f"base_model: no model folder at {cfg.model_dir!r}")
    started = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    key = settings_hash(cfg)
    stamp = out / "crpo_settings.json"
    if stamp.exists() and json.loads(stamp.read_text())["hash"] != key:
        raise UserError(f"{out} holds a CRPO run made with other settings (only online.rounds, out, threads and "
                        f"evaluate may change on a rerun); use another out or remove {out}")
    stamp.write_text(json.dumps({"hash": key, "settings": to_dict(cfg)}, indent=1))
    save_config(cfg, out / "config.yaml")

    torch.manual_seed(cfg.online.seed)
    backbone = load_backbone("tango", cfg.model_dir)
    policy = DiffusionOnlinePolicy(backbone, cfg.loss, cfg.train, out / "rounds", reference=cfg.online.reference,
                                   sampler=cfg.online.sampler)
    scorer_cfg = cfg.preference.scorer
    if scorer_cfg.kind == "clap:soundworld" and not scorer_cfg.ckpt:  # the base's own proxy CLAP
        scorer_cfg = ScorerConfig(kind=scorer_cfg.kind, ckpt=str(cfg.base_dir / "clap"), batch_size=scorer_cfg.batch_size)
    scorer = make_scorer(scorer_cfg)
    preference = RewardPreference(media_reward(policy, scorer_reward(scorer, backbone.sample_rate)),
                                  cfg.preference.temperature, name=scorer_cfg.kind)
    n_prompts = cfg.online.rounds * cfg.online.prompts_per_round
    prompts = [s.caption for s in split_scenes(cfg.data_seed, "train", n_prompts, cfg.train_kinds)]

    ev = cfg.evaluate
    scenes, real_audio = clips(cfg.data_seed, ev.split, ev.captions)
    oracle, clap = Oracle.from_pretrained(), SoundWorldClap(cfg.base_dir / "clap")
    state = {"at_round": 0}  # the round the policy's weights are at (0 = the base, until a checkpoint loads)
    seconds_file = out / "seconds.json"  # each stage's wall seconds, from the process that ran it
    timings: dict[str, float] = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}

    def timed(name: str, value: float) -> None:
        timings[name] = round(value, 1)
        seconds_file.write_text(json.dumps(timings, indent=1))

    def evaluate(k: int) -> dict:
        def load_pipe():
            if state["at_round"] != k:
                raise UserError(f"{out}/eval_{ev.split}/round_{k} is missing and the model of round {k} is no longer "
                                f"in memory; remove {out} and rerun")
            return backbone.pipe

        model = cfg.model_dir if k == 0 else f"crpo {key} round {k}"
        folder = out / f"eval_{ev.split}" / f"round_{k}"
        cached, t0 = (folder / "rows.json").exists(), time.time()
        result = evaluate_pipeline(load_pipe, folder, scenes, oracle, clap, ev, f"evaluate {round_name(k)}", model)
        if not cached:
            timed(f"evaluate {round_name(k)}", time.time() - t0)
        return result

    evals = {"base": evaluate(0)}
    round_started = [time.time()]

    def on_round(rnd: int, entry: dict) -> None:
        timed(f"round {rnd + 1}", time.time() - round_started[0])
        state["at_round"] = rnd + 1
        evals[round_name(rnd + 1)] = e = evaluate(rnd + 1)
        sat = np.mean([r["satisfied"] for r in e["rows"]])
        print(f"round {rnd + 1}: {entry['pairs']} pairs, {entry['calls']} CLAP calls, loss {entry.get('loss', 0):.4f}, "
              f"caption satisfied {sat:.3f} (base {np.mean([r['satisfied'] for r in evals['base']['rows']]):.3f})",
              flush=True)
        round_started[0] = time.time()

    result = run_online(cfg.online, policy, preference, prompts, out, on_round)
    state["at_round"] = len(result["history"])
    backbone.save_pretrained(out / "final")
    for k in range(1, len(result["history"]) + 1):  # rounds finished before a resume: read back from their cache
        if round_name(k) not in evals:
            evals[round_name(k)] = evaluate(k)
    evals = {round_name(k): evals[round_name(k)] for k in range(len(result["history"]) + 1)}

    reference = clap.embed_audio(list(real_audio)).double().numpy()
    table = per_round_table(evals, scenes, reference, ev.bootstrap)
    examples = []
    for i in example_indices(scenes, ev.examples):
        verdict = {m: oracle_verdict(e["rows"][i]) for m, e in evals.items()}
        media = {round_name(k): f"eval_{ev.split}/round_{k}/audio/{i:04d}.wav" for k in range(len(evals))}
        examples.append({"caption": scenes[i].caption, "seed": ev.seed + i, "media": media, "verdict": verdict})
    charts = [{"title": f"{row['metric']} ({ev.split}, {row['n']} captions)", "xlabel": "round (0 = base)",
               "series": {"CRPO": [{"x": k, "mean": row["models"][round_name(k)]["mean"],
                                    "ci95": row["models"][round_name(k)]["ci95"]} for k in range(len(evals))]}}
              for row in table if row["key"] in ("satisfied", "order_correct", "single_event", "clap")]
    history = result["history"]
    audit = audit_rounds(out / "rounds", oracle)
    results = {
        "title": f"CRPO on SoundWorld ({cfg.base} base): {len(history)} rounds of generate -> CLAP-rank -> "
                 f"DPO + winner loss, judged by the oracle on {ev.split} captions",
        "summary": summary_text(table) + f" {sum(h['pairs'] for h in history)} pairs, {result['calls']} CLAP calls, "
                   f"{sum(h['steps'] for h in history)} steps. A journal run on validation captions, not a "
                   "pre-registered claim. The oracle on each round's pairs (winner satisfies its caption and the "
                   "loser does not / the reverse / tie): " + "; ".join(
                       f"round {a['round']} {a['winner_only']:.0%} / {a['loser_only']:.0%} / {a['tie']:.0%}"
                       for a in audit) + ".",
        "table": table,
        "pair_audit": audit,
        "curves": {"crpo": policy.log},
        "interval_charts": charts,
        "examples": examples,
        "rounds": history,
        "settings": {"crpo": to_dict(cfg), "settings_hash": key, "prompts": len(prompts),
                     "models": {"base": shown_path(cfg.model_dir), "final": shown_path(out / "final")},
                     "evaluation": evaluation_settings(ev, clap, cfg.data_seed),
                     "seconds": {**timings, "this process": round(time.time() - started, 1)}},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(table))
    html = write_report(results, out, "report")
    print("\n" + markdown_table(table))
    for a in audit:
        print(f"round {a['round']} pairs ({a['pairs']}), oracle: winner satisfies and loser not {a['winner_only']:.2f}, "
              f"the reverse {a['loser_only']:.2f}, tie {a['tie']:.2f}")
    print(f"seconds: {results['settings']['seconds']}")
    print(f"results: {out / 'results.json'}\ntable:   {out / 'results.md'}\nreport:  {html}\n"
          f"rounds:  {out / 'rounds'}\nmodel:   {out / 'final'}")
    return results


if __name__ == "__main__":
    run_main(main)  # a user mistake (config, key, value, missing file): one line on stderr, exit code 2
