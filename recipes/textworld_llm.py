"""TextWorld experiments: DPO vs RPO against an imperfect proxy, DPO vs rDPO under flipped labels.

    python recipes/textworld_llm.py --out runs/textworld [--seeds 2] [--steps 200] [--quick]

1. SFT a tiny Llama on sorting 6 digits to partial competence (CPU, about a minute).
2. Sample 4 completions per training prompt from it (temperature 1).
3. (a) label pairs by the *proxy* reward (right digits, any order); train DPO and RPO (DPO +
   eta * per-token NLL of chosen) with the same beta, lr and steps; measure the *exact* reward of
   the policy (mean over 4 samples at temperature 1, fixed seed) on held-out prompts along training.
   (b) label pairs by the *exact* reward, flip a known 30 % of them; train DPO and rDPO
   (``robust``, eps = 0.3) and, for reference, DPO on the clean labels.
4. Write ``results.json`` and ``results.md``: exact reward (mean over held-out prompts and seeds)
   with 95 % bootstrap CIs, and paired differences between methods with their CIs.

Threads: torch runs on one thread (``--threads``); on a shared 2-core machine OpenMP
oversubscription made every op ~50x slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffdpo.config import load_config, run_main  # noqa: E402
from diffdpo.errors import UserError  # noqa: E402
from diffdpo.llm.trainer import LLMDPOConfig, train  # noqa: E402
from diffdpo.worlds import textworld as tw  # noqa: E402

METHODS = {
    "dpo_proxy": dict(label="proxy", flip=0.0, loss=["loss.type=sigmoid"]),
    "rpo_proxy": dict(label="proxy", flip=0.0, loss=["loss.type=sigmoid", "loss.sft_weight=0.2", "loss.sft_reduction=mean"]),
    "dpo_clean": dict(label="exact", flip=0.0, loss=["loss.type=sigmoid"]),
    "dpo_flip30": dict(label="exact", flip=0.3, loss=["loss.type=sigmoid"]),
    "rdpo_flip30": dict(label="exact", flip=0.3, loss=["loss.type=robust", "loss.options.label_smoothing=0.3"]),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/textworld")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sft-steps", type=int, default=120)
    ap.add_argument("--train-prompts", type=int, default=512)
    ap.add_argument("--eval-prompts", type=int, default=300)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    args = ap.parse_args(argv)
    _check_args(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = tw.SortTask(length=6)
    tok = tw.make_tokenizer(task)
    eval_prompts = tw.held_out_prompts(task, args.eval_prompts, seed=10_000)
    checkpoints = sorted({args.steps // 4, args.steps // 2, args.steps})
    results: dict = {"settings": vars(args), "checkpoints": [0, *checkpoints], "seeds": {}}
    t0 = time.time()
    for seed in range(args.seeds):
        base = tw.make_model(tok, seed=seed, hidden_size=64, layers=2)
        sft_losses = tw.sft(base, tok, task, steps=args.sft_steps, lr=2e-3, seed=seed)
        train_prompts = tw.held_out_prompts(task, args.train_prompts, seed=seed + 1, exclude=set(eval_prompts))
        samples = tw.generate(base, tok, train_prompts, num_samples=4, seed=seed)
        if seed == 0:  # the SFT model and tokenizer recipes/configs/llm_tiny.yaml trains from
            base.save_pretrained(out / "sft_model")
            tok.save_pretrained(out / "sft_model")
        seed_res = {"sft_final_loss": sft_losses[-1], "sft": tw.exact_scores(base, tok, task, eval_prompts),
                    "sft_proxy": tw.proxy_scores(base, tok, task, eval_prompts), "methods": {}}
        print(f"seed {seed}: SFT exact {sum(seed_res['sft']) / len(seed_res['sft']):.3f} ({time.time() - t0:.0f}s)")
        for name in args.methods:
            m = METHODS[name]
            rows = tw.make_pairs(task, train_prompts, samples, m["label"], m["flip"], seed=seed)
            data = out / f"seed{seed}" / f"{name}.jsonl"
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            curve = {}

            def on_step(step, model):
                if step in checkpoints:
                    curve[step] = tw.exact_scores(model, tok, task, eval_prompts)

            cfg = load_config(LLMDPOConfig, None, [
                f"data.train_path={data}", f"train.output_dir={out / f'seed{seed}' / name}", f"train.seed={seed}",
                f"train.max_steps={args.steps}", "train.batch_size=16", f"train.lr={args.lr}", "train.lr_scheduler=constant",
                "train.report_to=none", "train.progress=false", "train.resume=false", "train.warmup_steps=0",
                f"loss.beta={args.beta}", "data.max_length=64", "data.on_bad_record=skip", *m["loss"]])
            res = train(cfg, copy.deepcopy(base), tok, on_step=on_step)
            last = res["history"][-1]
            seed_res["methods"][name] = {
                "pairs": len(rows), "data": res["data"]["train"], "flipped": sum(r["flipped"] for r in rows),
                "exact_curve": {str(k): v for k, v in curve.items()},
                "proxy_final": tw.proxy_scores(res["model"], tok, task, eval_prompts),
                "train_last": {k: last[k] for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                                                    "nll", "kl")},
            }
            final = curve[args.steps]
            print(f"  {name}: exact {sum(final) / len(final):.3f}, logps/chosen {last['logps/chosen']:.2f} "
                  f"({time.time() - t0:.0f}s)")
        results["seeds"][str(seed)] = seed_res
    results["summary"] = summarize(results, args.steps)
    (out / "results.json").write_text(json.dumps(results))
    (out / "results.md").write_text(render(results["summary"]))
    print(render(results["summary"]))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


def _check_args(args) -> None:
    """Bad values are user mistakes (one line, exit code 2 under run_main), found before any work."""
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise UserError(f"--methods: unknown {unknown}; valid: {list(METHODS)}" if unknown
                        else f"--methods: give at least one of {list(METHODS)}")
    minimum = {"seeds": 1, "steps": 4, "sft_steps": 1, "train_prompts": 1, "eval_prompts": 2, "threads": 1}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            why = " (checkpoints at steps/4, steps/2 and steps)" if name == "steps" else ""
            raise UserError(f"--{name.replace('_', '-')}: must be >= {low}{why}, got {getattr(args, name)}")
    for name in ("beta", "lr"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name}: must be > 0, got {getattr(args, name)}")


def _pooled(results, name, step):
    vals = []
    for seed_res in results["seeds"].values():
        if name == "sft":
            vals += seed_res["sft"]
        else:
            vals += seed_res["methods"][name]["exact_curve"][str(step)]
    return vals


def summarize(results, steps) -> dict:
    names = [n for n in METHODS if all(n in s["methods"] for s in results["seeds"].values())]
    summary = {"exact": {}, "curves": {}, "differences": {}, "logps_chosen": {}}
    summary["exact"]["sft"] = tw.bootstrap_ci(_pooled(results, "sft", 0))
    for n in names:
        summary["exact"][n] = tw.bootstrap_ci(_pooled(results, n, steps))
        summary["curves"][n] = {k: sum(v) / len(v) for k in results["checkpoints"][1:]
                                for v in [_pooled(results, n, k)]}
        summary["logps_chosen"][n] = sum(s["methods"][n]["train_last"]["logps/chosen"]
                                         for s in results["seeds"].values()) / len(results["seeds"])
    for a, b in (("rpo_proxy", "dpo_proxy"), ("rdpo_flip30", "dpo_flip30"), ("dpo_clean", "dpo_flip30")):
        if a in names and b in names:
            summary["differences"][f"{a} - {b}"] = tw.paired_difference_ci(_pooled(results, a, steps),
                                                                           _pooled(results, b, steps))
    return summary


def render(summary) -> str:
    lines = ["| model | exact reward (95% CI) | exact reward along training | final train logps/chosen |",
             "|---|---|---|---|"]
    m, lo, hi = summary["exact"]["sft"]
    lines.append(f"| SFT (start) | {m:.3f} ({lo:.3f}-{hi:.3f}) | | |")
    for n, (m, lo, hi) in summary["exact"].items():
        if n == "sft":
            continue
        curve = " / ".join(f"{v:.3f}" for v in summary["curves"][n].values())
        lines.append(f"| {n} | {m:.3f} ({lo:.3f}-{hi:.3f}) | {curve} | {summary['logps_chosen'][n]:.2f} |")
    lines += ["", "| paired difference | mean (95% CI) |", "|---|---|"]
    for k, (m, lo, hi) in summary["differences"].items():
        lines.append(f"| {k} | {m:+.3f} ({lo:+.3f} to {hi:+.3f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)  # a user mistake (a bad value): one line on stderr, exit code 2
