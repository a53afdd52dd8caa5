"""TextWorld: offline, rejection-sampled, online and iterative preference optimisation at an equal budget.

    python recipes/textworld_online.py --out runs/textworld_online --split validation [--seeds 3]
    python recipes/textworld_online.py --out runs/textworld_online --split test --seeds 3 --first-seed 1

Per seed: SFT a tiny Llama on sorting six digits (as ``recipes/textworld_llm.py``), then run each
method of ``recipes/configs/llm_online_*.yaml`` from that SFT model with the same preference model
(TextWorld's exact reward under Bradley-Terry, temperature 0.1), the same number of preference-model
calls (``--budget``, one call per completion scored) and the same number of gradient steps
(``--steps``, batch 16, lr 1e-4, beta 0.1). Only the data process differs; each config's shape
(rounds, samples per prompt, sampler, selection, reference, loss) is kept and its sizes are scaled:

* one-round methods (offline DPO, RSO): ``budget / K`` prompts, all steps on them;
* iterative methods (iterative DPO, SPPO): ``R`` rounds of ``budget / (R K)`` prompts, ``steps / R`` each;
* online methods (online IPO, IPO-MD): a round per step, ``budget / (steps K)`` prompts each.

Measured on held-out prompts (``--split``: validation or test prompts, disjoint): the policy's
expected exact reward (mean of 4 samples at temperature 1) at 1/4, 1/2 and all of the steps, a
Monte-Carlo KL to the SFT model, and the log-ratio of the last round's chosen completions against
the SFT model (does the method raise the chosen likelihood?). 95% CIs resample seeds, then prompts.
Writes ``results_<split>.json``, ``results_<split>.md``, ``report_<split>.html`` and ``curves_<split>.svg``
(exact reward against steps with CIs).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffdpo.config import load_config, run_main  # noqa: E402
from diffdpo.errors import UserError  # noqa: E402
from diffdpo.llm.metrics import sampled_kl, sequence_logps  # noqa: E402
from diffdpo.llm.online import LLMOnlineConfig, LLMOnlinePolicy  # noqa: E402
from diffdpo.online.loop import run_online  # noqa: E402
from diffdpo.preference_model import RewardPreference  # noqa: E402
from diffdpo.report import render_interval_chart, write_report  # noqa: E402
from diffdpo.worlds import textworld as tw  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
METHODS = {  # name: (config, how its rounds scale)
    "dpo_offline": ("llm_online_dpo_offline.yaml", "one_round"),
    "rso_dpo": ("llm_online_rso_dpo.yaml", "one_round"),
    "rso_hinge": ("llm_online_rso_hinge.yaml", "one_round"),
    "dpo_iterative": ("llm_online_dpo_iterative.yaml", "iterative"),
    "sppo": ("llm_online_sppo.yaml", "iterative"),
    "ipo_online": ("llm_online_ipo.yaml", "per_step"),
    "ipo_md": ("llm_online_ipo_md.yaml", "per_step"),
}
SPLIT_SEEDS = {"validation": 10_000, "test": 20_000}  # held-out prompt sets, disjoint from training prompts


def scaled_config(name: str, budget: int, steps: int, out: Path, seed: int, rso_candidates: int,
                  rso_beta: float | None = None) -> LLMOnlineConfig:
    """The method's config with its sizes scaled to ``budget`` calls and ``steps // rounds`` gradient
    steps a round (SPPO's 3 rounds take 198 of 200 steps and are measured at 198)."""
    file, kind = METHODS[name]
    overrides = [f"train.output_dir={out}", "train.progress=false"]
    if name.startswith("rso_"):
        overrides.append(f"online.samples_per_prompt={rso_candidates}")
        if rso_beta is not None:
            overrides.append(f"online.rso_beta={rso_beta}")
    cfg = load_config(LLMOnlineConfig, CONFIGS / file, overrides)
    o = cfg.online
    k = o.samples_per_prompt
    rounds = {"one_round": 1, "iterative": o.rounds, "per_step": steps}[kind]
    o.rounds, o.steps_per_round = rounds, max(1, steps // rounds)
    o.prompts_per_round = max(1, budget // (rounds * k))
    o.budget, o.seed, o.save_every_rounds = budget, seed, rounds
    return cfg


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/textworld_online")
    ap.add_argument("--split", choices=list(SPLIT_SEEDS), default="validation")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=6400, help="preference-model calls per method")
    ap.add_argument("--steps", type=int, default=200, help="gradient steps per method")
    ap.add_argument("--sft-steps", type=int, default=250)
    ap.add_argument("--eval-prompts", type=int, default=300)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run: first-seed .. first-seed + seeds - 1")
    ap.add_argument("--rso-beta", type=float, default=None,
                    help="RSO's rejection-sampling beta, on the reward's scale (default: the configs' 0.5)")
    ap.add_argument("--rso-candidates", type=int, default=16,
                    help="RSO's candidates per prompt (chosen on validation; the configs' 64 leave 100 prompts)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    args = ap.parse_args(argv)
    _check_args(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = tw.SortTask(length=6)
    tok = tw.make_tokenizer(task)
    eval_prompts = tw.held_out_prompts(task, args.eval_prompts, seed=SPLIT_SEEDS[args.split])
    excluded = set(tw.held_out_prompts(task, args.eval_prompts, seed=SPLIT_SEEDS["validation"])) | \
        set(tw.held_out_prompts(task, args.eval_prompts, seed=SPLIT_SEEDS["test"]))
    checkpoints = sorted({args.steps // 4, args.steps // 2, args.steps})
    results: dict = {"settings": vars(args), "checkpoints": checkpoints, "seeds": {}}
    t0 = time.time()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        sft_model = tw.make_model(tok, seed=seed, hidden_size=64, layers=2)
        tw.sft(sft_model, tok, task, steps=args.sft_steps, lr=2e-3, seed=seed)
        train_prompts = tw.held_out_prompts(task, args.budget, seed=seed + 1, exclude=excluded)
        if seed == args.first_seed:  # what recipes/configs/llm_online_*.yaml run on
            sft_model.save_pretrained(out / "sft_model")
            tok.save_pretrained(out / "sft_model")
            (out / "prompts.txt").write_text("\n".join(train_prompts) + "\n")
        seed_res = {"sft": tw.exact_scores(sft_model, tok, task, eval_prompts), "methods": {}}
        print(f"seed {seed}: SFT exact {_mean(seed_res['sft']):.3f} ({time.time() - t0:.0f}s)")
        for name in args.methods:
            seed_res["methods"][name] = run_method(name, args, sft_model, tok, task, train_prompts, eval_prompts,
                                                   out / args.split / f"seed{seed}" / name, seed, checkpoints)
            m = seed_res["methods"][name]
            print(f"  {name}: exact {_mean(m['exact'][str(args.steps)]):.3f}, KL {m['kl']:.2f}, "
                  f"chosen log-ratio {m['chosen_logratio']:+.2f}, {m['calls']} calls ({time.time() - t0:.0f}s)")
        results["seeds"][str(seed)] = seed_res
    results["summary"] = summarize(results, args.steps)
    suffix = f"_{args.split}"
    (out / f"results{suffix}.json").write_text(json.dumps(results))
    (out / f"results{suffix}.md").write_text(render(results["summary"]))
    payload = report_payload(results)
    write_report(payload, out, f"report{suffix}")
    chart = payload["interval_charts"][0]
    (out / f"curves{suffix}.svg").write_text(render_interval_chart(chart["title"], chart["series"], chart["xlabel"],
                                                                   width=640, height=300))
    print(render(results["summary"]))
    print(f"wrote {out / f'results{suffix}.json'}, {out / f'results{suffix}.md'}, {out / f'report{suffix}.html'} "
          f"and {out / f'curves{suffix}.svg'}")
    return results


def run_method(name, args, sft_model, tok, task, train_prompts, eval_prompts, out: Path, seed: int,
               checkpoints) -> dict:
    cfg = scaled_config(name, args.budget, args.steps, out, seed, args.rso_candidates, args.rso_beta)
    model = copy.deepcopy(sft_model)
    preference = RewardPreference(lambda ps, cs: [task.exact_reward(p, c) for p, c in zip(ps, cs)],
                                  cfg.preference.temperature, name="textworld exact reward")
    t = cfg.train
    policy = LLMOnlinePolicy(model, tok, cfg.loss, t.lr, t.batch_size, t.max_new_tokens, t.max_grad_norm)
    exact, curve, done = {}, [], {"steps": 0}

    def on_round(rnd, entry):
        done["steps"] += entry["steps"]
        curve.append({"step": done["steps"], **{k: v for k, v in entry.items() if isinstance(v, (int, float))}})

    def on_step(step):
        if step in checkpoints:
            exact[str(step)] = tw.exact_scores(model, tok, task, eval_prompts)

    result = run_online(cfg.online, policy, preference, train_prompts, out, on_round, on_step, progress=False)
    for c in checkpoints:  # a method whose rounds stop short of a checkpoint is measured where it stopped
        exact.setdefault(str(c), tw.exact_scores(model, tok, task, eval_prompts))
    kl = sampled_kl(model, sft_model, tok, eval_prompts[:100], num_samples=4, max_new_tokens=12, seed=seed)
    return {"exact": exact, "kl": kl["kl"]["mean"], "calls": result["calls"], "rounds": result["rounds"],
            "pairs": sum(h["pairs"] for h in result["history"]), "curve": curve,
            "chosen_logratio": chosen_logratio(model, sft_model, tok, out)}


def chosen_logratio(model, sft_model, tok, out: Path) -> float:
    """Mean ``log pi(y_w) - log pi_sft(y_w)`` over the last round's chosen completions."""
    last = sorted((out / "rounds").glob("round_*.jsonl"))[-1]
    rows = [json.loads(line) for line in last.read_text().splitlines() if line.strip()]
    if not rows:
        return float("nan")
    seqs = [tw.encode(tok, r["prompt"], r["chosen"]) for r in rows]
    pad = tok.pad_token_id
    return float((sequence_logps(model, seqs, pad) - sequence_logps(sft_model, seqs, pad)).mean())


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def seed_bootstrap(per_seed: list[list[float]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% interval resampling seeds, then prompts within each drawn seed (two-level)."""
    rng = random.Random(seed)
    mean = _mean([x for xs in per_seed for x in xs])
    stats = []
    for _ in range(n_boot):
        draw = [per_seed[rng.randrange(len(per_seed))] for _ in per_seed]
        stats.append(_mean([xs[rng.randrange(len(xs))] for xs in draw for _ in xs]))
    stats.sort()
    return mean, stats[int(0.025 * n_boot)], stats[int(0.975 * n_boot) - 1]


def summarize(results: dict, steps: int) -> dict:
    seeds = list(results["seeds"].values())
    names = [n for n in METHODS if all(n in s["methods"] for s in seeds)]
    summary = {"exact": {"sft": seed_bootstrap([s["sft"] for s in seeds])}, "per_seed": {}, "curves": {},
               "curve_ci": {}, "kl": {}, "chosen_logratio": {}, "differences": {}, "calls": {}}
    summary["per_seed"]["sft"] = [_mean(s["sft"]) for s in seeds]
    for n in names:
        finals = [s["methods"][n]["exact"][str(steps)] for s in seeds]
        summary["exact"][n] = seed_bootstrap(finals)
        summary["per_seed"][n] = [_mean(f) for f in finals]
        summary["curves"][n] = {c: _mean([_mean(s["methods"][n]["exact"][str(c)]) for s in seeds])
                                for c in results["checkpoints"]}
        summary["curve_ci"][n] = {c: seed_bootstrap([s["methods"][n]["exact"][str(c)] for s in seeds])
                                  for c in results["checkpoints"]}
        summary["kl"][n] = _mean([s["methods"][n]["kl"] for s in seeds])
        summary["chosen_logratio"][n] = _mean([s["methods"][n]["chosen_logratio"] for s in seeds])
        summary["calls"][n] = [s["methods"][n]["calls"] for s in seeds]
    for n in names:
        if n != "dpo_offline" and "dpo_offline" in names:
            diffs = [[a - b for a, b in zip(s["methods"][n]["exact"][str(steps)],
                                            s["methods"]["dpo_offline"]["exact"][str(steps)])] for s in seeds]
            summary["differences"][f"{n} - dpo_offline"] = seed_bootstrap(diffs)
    if {"ipo_md", "ipo_online"} <= set(names):
        diffs = [[a - b for a, b in zip(s["methods"]["ipo_md"]["exact"][str(steps)],
                                        s["methods"]["ipo_online"]["exact"][str(steps)])] for s in seeds]
        summary["differences"]["ipo_md - ipo_online"] = seed_bootstrap(diffs)
    return summary


def render(summary: dict) -> str:
    lines = ["| method | exact reward (95% CI) | along training (1/4, 1/2, all steps) | per seed | KL to SFT "
             "| chosen log-ratio vs SFT | calls |", "|---|---|---|---|---|---|---|"]
    for n, (m, lo, hi) in summary["exact"].items():
        per_seed = ", ".join(f"{v:.3f}" for v in summary["per_seed"][n])
        if n == "sft":
            lines.append(f"| SFT (start) | {m:.3f} ({lo:.3f}-{hi:.3f}) | | {per_seed} | 0 | 0 | |")
            continue
        curve = " / ".join(f"{v:.3f}" for v in summary["curves"][n].values())
        calls = "/".join(str(c) for c in sorted(set(summary["calls"][n])))
        lines.append(f"| {n} | {m:.3f} ({lo:.3f}-{hi:.3f}) | {curve} | {per_seed} | {summary['kl'][n]:.2f} "
                     f"| {summary['chosen_logratio'][n]:+.2f} | {calls} |")
    lines += ["", "| paired difference | mean (95% CI) |", "|---|---|"]
    for k, (m, lo, hi) in summary["differences"].items():
        lines.append(f"| {k} | {m:+.3f} ({lo:+.3f} to {hi:+.3f}) |")
    return "\n".join(lines) + "\n"


def report_payload(results: dict) -> dict:
    """The report page: the table and each method's training curves (seed 0) against gradient steps."""
    summary = results["summary"]
    seed0 = next(iter(results["seeds"].values()))
    table = [{"metric": "exact reward (held-out prompts)", "n": len(seed0["sft"]) * len(results["seeds"]),
              "higher_is_better": True,
              "models": {n: {"mean": m, "ci95": [lo, hi]} for n, (m, lo, hi) in summary["exact"].items()}}]
    return {"title": "TextWorld: online and iterative preference optimisation at an equal budget",
            "summary": render(summary), "settings": results["settings"], "table": table,
            "interval_charts": [exact_reward_chart(summary)],
            "curves": {n: r["curve"] for n, r in seed0["methods"].items()}}


def exact_reward_chart(summary: dict) -> dict:
    """Exact reward against gradient steps, each method from the SFT model's point at step 0, with the
    two-level 95% CIs (the report's interval chart)."""
    sft_mean, sft_lo, sft_hi = summary["exact"]["sft"]
    start = {"x": 0, "mean": sft_mean, "ci95": [sft_lo, sft_hi]}
    series = {n: [start] + [{"x": c, "mean": m, "ci95": [lo, hi]} for c, (m, lo, hi) in cis.items()]
              for n, cis in summary["curve_ci"].items()}
    return {"title": "exact reward, held-out prompts (95% CI)", "xlabel": "gradient steps", "series": series}


def _check_args(args) -> None:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise UserError(f"--methods: unknown {unknown}; valid: {list(METHODS)}" if unknown
                        else f"--methods: give at least one of {list(METHODS)}")
    lows = {"rso_candidates": 2, "first_seed": 0, "seeds": 1, "budget": 32, "steps": 4, "sft_steps": 1,
            "eval_prompts": 2, "threads": 1}
    for name, low in lows.items():
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')}: must be >= {low}, got {getattr(args, name)}")
    if args.rso_beta is not None and not args.rso_beta > 0:
        raise UserError(f"--rso-beta: must be > 0, got {args.rso_beta}")


if __name__ == "__main__":
    run_main(main)  # a user mistake (a bad value): one line on stderr, exit code 2
