"""Step throughput and peak memory of our LLM DPO step vs TRL 0.28's DPOTrainer, as ratios.

    .venv-trl/bin/python bench/bench_llm_dpo.py [--vocab 32000 --hidden 256 --layers 4 --pairs 8 --steps 5]
    .venv-trl/bin/python bench/bench_llm_dpo.py --published qwen2.5-0.5b --pairs 1 --prompt 128 \
        --completion 512 --lengths exact --steps 3     # a published model config, random weights

The default model is a small Llama built from the flags above. ``--published NAME`` (a directory
under ``diffdpo/llm/published/``, each with its SOURCES.md) or ``--config PATH`` (a ``config.json``
or a directory holding one) instead builds the model the config names with the real transformers
class (``AutoModelForCausalLM.from_config``: Qwen2ForCausalLM, LlamaForCausalLM, ...), fp32, random
weights; ``--vocab/--hidden/--layers`` are then ignored and token ids are drawn from the config's
vocabulary. ``--lengths exact`` makes every prompt ``--prompt`` and every completion
``--completion`` tokens long (default ``range``: uniform in [n/2, n]).

Both sides run under ``.venv-trl`` (TRL 0.28 needs transformers<5; our package imports there with
the repo on ``sys.path``), in the same process kind, with the same torch threads, the same model
(built from config, fp32), the same batches and the same loss (sigmoid DPO, beta 0.1). One
"step" is forward + loss + backward + AdamW step on one batch of pairs:

* ours: ``LogpsModel`` (one padded concatenated forward, fp32 log-softmax on completion positions
  only, chunked and recomputed in backward) -> ``pair_losses`` (the shared core);
* TRL: ``DPOTrainer.get_batch_loss_metrics`` on its own collator's batch (full-vocabulary logits
  of every position, ``selective_log_softmax``).

Two reference settings: precomputed (the batch carries reference log-probs; TRL's
``ref_chosen_logps`` batch keys, our cached table) and online (a reference model forward each step).
Throughput is ``1 / fastest step`` (the step least disturbed by other load on a shared machine;
the mean is in the JSON). The CPU time of each step (``time.process_time``, all threads of the
process) is reported beside it: with one torch thread it is the step's own work, far less moved by
other jobs queueing for the same cores than wall time is (cache and memory-bandwidth contention
still move it), so on a busy shared CPU the CPU-time ratio is the steadier one. Each (side,
setting) runs in its own subprocess; peak memory is the growth of the process's peak RSS
(``ru_maxrss``) over its RSS just before the timed steps (on CUDA: ``max_memory_allocated``), and
the absolute peak RSS of the process (models, gradients, AdamW state and all) is printed too.
``--grad-checkpointing`` checkpoints the policy's decoder layers on both sides (the usual setting
at real sizes); ``--references`` runs a subset of the two reference settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "diffdpo" / "llm" / "published"


def published_names() -> list[str]:
    return sorted(d.name for d in PUBLISHED.iterdir() if (d / "config.json").is_file()) if PUBLISHED.is_dir() else []


def _config_path(args) -> Path | None:
    """The config.json to build the model from, or None for the small Llama of the flags."""
    if args.published:
        return PUBLISHED / args.published / "config.json"
    if args.config:
        path = Path(args.config)
        return path / "config.json" if path.is_dir() else path
    return None


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _batches(args, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(args.pairs * (args.steps + 1)):
        def n(m):
            return m if args.lengths == "exact" else int(torch.randint(m // 2, m + 1, (1,), generator=g))

        p = torch.randint(3, args.vocab, (n(args.prompt),), generator=g)
        c = torch.randint(3, args.vocab, (n(args.completion),), generator=g)
        r = torch.randint(3, args.vocab, (n(args.completion),), generator=g)
        rows.append((p.tolist(), c.tolist(), r.tolist()))
    return [rows[i * args.pairs:(i + 1) * args.pairs] for i in range(args.steps + 1)]


def _model(args, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    path = _config_path(args)
    if path is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(path.parent)   # the published file, as is
        # random weights, fp32: without dtype, transformers 4.x would build in the config's torch_dtype (bf16 here)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(args.device)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).to(args.device)


def run_one(args) -> dict:
    """One (side, reference) setting in this process: time ``args.steps`` steps after one warm-up."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    t_setup = time.perf_counter()
    batches = _batches(args)
    policy, reference = _model(args, 1), _model(args, 2)
    model_info = {"class": type(policy).__name__, "parameters": sum(p.numel() for p in policy.parameters()),
                  "vocab_size": policy.config.vocab_size, "dtype": str(next(policy.parameters()).dtype)}
    reference.requires_grad_(False)
    if args.grad_checkpointing:   # the same decoder-layer checkpointing on both sides (the LM head is not a layer)
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    online = args.reference == "online"

    if args.side == "ours":
        from diffdpo.llm.batching import collate, pair_sequences
        from diffdpo.llm.data import PairExample
        from diffdpo.llm.logps import LogpsModel
        from diffdpo.llm.objective import LossConfig, pair_losses

        cfg, scorer, ref_scorer = LossConfig("sigmoid", 0.1), LogpsModel(policy, args.chunk), LogpsModel(reference, args.chunk)
        prepared = []
        for rows in batches:
            batch = collate(pair_sequences([PairExample("", *r) for r in rows]), 0).to(args.device)
            with torch.no_grad():
                ref = None if online else ref_scorer.batch_logps(batch).logps
            prepared.append((batch, ref))

        def step(item):
            batch, ref = item
            if ref is None:
                with torch.no_grad():
                    ref = ref_scorer.batch_logps(batch).logps
            losses, _, _ = pair_losses(scorer.batch_logps(batch), ref, cfg)
            return losses.mean()
    else:
        import tempfile

        from datasets import Dataset
        from transformers import PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models
        from trl import DPOConfig, DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2}, "a")),
                                      pad_token="<pad>", eos_token="<eos>")
        with tempfile.TemporaryDirectory() as out:
            targs = DPOConfig(output_dir=out, beta=0.1, loss_type="sigmoid", max_length=None, max_prompt_length=None,
                              report_to="none", use_cpu=args.device == "cpu", bf16=False)
            trainer = DPOTrainer(model=policy, ref_model=reference, args=targs, processing_class=tok,
                                 train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["a"], "rejected": ["a a"]}))
        collator = DataCollatorForPreference(pad_token_id=0)
        prepared = []
        for rows in batches:
            batch = collator([{"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r} for p, c, r in rows])
            batch = {k: v.to(args.device) for k, v in batch.items()}
            if not online:
                batch["ref_chosen_logps"], batch["ref_rejected_logps"] = trainer.compute_ref_log_probs(batch)
            prepared.append(batch)
        policy = trainer.model

        def step(batch):
            return trainer.get_batch_loss_metrics(policy, batch)[0]

    policy.train()
    cuda = args.device.startswith("cuda")

    def one(item):
        loss = step(item)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    warmup_loss = one(prepared[0])  # warm-up (allocator, kernels, AdamW state); same weights on both sides
    warmup_s = time.perf_counter() - t0
    print(f"{args.side}/{args.reference}: setup {setup_s:.1f} s, warm-up step {warmup_s:.1f} s, "
          f"RSS {_rss_mb():.0f} MB", file=sys.stderr, flush=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    losses, times, cpu_times = [], [], []
    for item in prepared[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(one(item))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        print(f"{args.side}/{args.reference}: step {len(times)} {times[-1]:.1f} s wall, {cpu_times[-1]:.1f} s CPU",
              file=sys.stderr, flush=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    tokens = sum(len(p) * 2 + len(c) + len(r) for item in batches[1:] for p, c, r in item)
    # the fastest step is the least disturbed by other load on a shared machine (timeit's rule); the mean is kept too
    return {"side": args.side, "reference": args.reference, "steps_per_s": 1 / min(times),
            "mean_steps_per_s": len(times) / sum(times), "tokens_per_s": tokens / sum(times),
            "peak_mb_over_base": peak - base, "peak_rss_mb": peak_rss, "base_mb": base, "first_loss": losses[0], "warmup_loss": warmup_loss,
            "cpu_steps_per_s": 1 / min(cpu_times), "step_s": times, "step_cpu_s": cpu_times, "warmup_step_s": warmup_s, "setup_s": setup_s, "model": model_info}


def _machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        import trl

        info["trl"] = trl.__version__
    except (ImportError, ValueError, OSError):
        pass
    try:
        info["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model = ap.add_mutually_exclusive_group()
    model.add_argument("--published", choices=published_names(),
                       help="a published model config carried under diffdpo/llm/published/ (random weights)")
    model.add_argument("--config", help="a transformers config.json (or its directory) to build the model from")
    ap.add_argument("--lengths", choices=["range", "exact"], default="range",
                    help="range: lengths uniform in [n/2, n]; exact: every prompt/completion is n tokens")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="checkpoint the policy's decoder layers (transformers' gradient_checkpointing_enable) on both sides")
    ap.add_argument("--references", nargs="+", choices=["precomputed", "online"], default=["precomputed", "online"],
                    help="which reference settings to run (default both)")
    ap.add_argument("--side", choices=["ours", "trl"])
    ap.add_argument("--reference", choices=["precomputed", "online"])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    path = _config_path(args)
    if path is not None:
        if not path.is_file():
            ap.error(f"no config.json at {path}")
        args.vocab = json.loads(path.read_text())["vocab_size"]   # token ids come from the config's vocabulary
    if args.side:
        print(json.dumps(run_one(args)))
        return
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results = {}
    for reference in args.references:
        for side in ("ours", "trl"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--reference", reference]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                      "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"})
            progress = [line for line in out.stderr.splitlines() if line.startswith(f"{side}/{reference}:")]
            print("\n".join(progress), file=sys.stderr, flush=True)
            if out.returncode != 0:
                sys.exit(f"{side}/{reference} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
            results[(side, reference)] = json.loads(out.stdout.strip().splitlines()[-1])
    m = results[("ours", "precomputed")]["model"]
    if path is None:
        what = f"Llama vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers"
    else:
        what = f"{m['class']} from {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} (random weights)"
    bound = "=" if args.lengths == "exact" else "<="
    print(f"model: {what}, {m['parameters'] / 1e6:.1f}M parameters, {m['dtype']}; {args.pairs} pairs/step, "
          f"prompt {bound} {args.prompt}, completions {bound} {args.completion} tokens; {args.steps} timed steps; "
          f"device {args.device}, torch threads {args.threads}"
          + ("; decoder-layer gradient checkpointing on both sides" if args.grad_checkpointing else ""))
    print("| reference | ours steps/s | TRL steps/s | speed ratio (ours/TRL) | ours peak MB | TRL peak MB | memory ratio (ours/TRL) | loss before any update ours / TRL |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for reference in args.references:
        o, t = results[("ours", reference)], results[("trl", reference)]
        rows[reference] = {"ours": o, "trl": t, "speed_ratio": o["steps_per_s"] / t["steps_per_s"],
                           "cpu_speed_ratio": o["cpu_steps_per_s"] / t["cpu_steps_per_s"],
                           "memory_ratio": o["peak_mb_over_base"] / max(t["peak_mb_over_base"], 1e-9)}
        print(f"| {reference} | {o['steps_per_s']:.3f} | {t['steps_per_s']:.3f} | {rows[reference]['speed_ratio']:.2f} | "
              f"{o['peak_mb_over_base']:.0f} | {t['peak_mb_over_base']:.0f} | {rows[reference]['memory_ratio']:.2f} | "
              f"{o['warmup_loss']:.6f} / {t['warmup_loss']:.6f} |")
    print("| reference | ours CPU s/step | TRL CPU s/step | speed ratio by CPU time (ours/TRL) | ours peak RSS MB | TRL peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for reference in args.references:
        o, t = rows[reference]["ours"], rows[reference]["trl"]
        print(f"| {reference} | {1 / o['cpu_steps_per_s']:.1f} | {1 / t['cpu_steps_per_s']:.1f} | "
              f"{rows[reference]['cpu_speed_ratio']:.2f} | {o['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} |")
    if args.json:
        command = " ".join([Path(sys.executable).relative_to(ROOT).as_posix() if Path(sys.executable).is_relative_to(ROOT)
                            else sys.executable, Path(__file__).resolve().relative_to(ROOT).as_posix(), *sys.argv[1:]])
        Path(args.json).write_text(json.dumps({
            "command": command, "started": started,
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "config": str(path.relative_to(ROOT)) if path is not None and path.is_relative_to(ROOT) else (str(path) if path else None),
            "model": m, "machine": _machine(), "settings": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
