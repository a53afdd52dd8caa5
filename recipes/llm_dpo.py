"""DPO / RPO / IPO / SimPO / ORPO / KTO / rDPO fine-tuning of a causal LM through the shared loss core.

    python recipes/llm_dpo.py --config recipes/configs/llm_dpo_zephyr.yaml [key.sub=value ...]
    accelerate launch recipes/llm_dpo.py --config recipes/configs/llm_rpo.yaml

What it does, top to bottom (the loop is :func:`diffdpo.llm.trainer.train`):

1. load the model (hub id or local directory; LoRA via peft with ``model.lora_r > 0``) and tokenizer;
2. read TRL-style JSONL (``prompt/chosen/rejected`` text or chat messages; ``prompt/completion/label``
   for KTO), apply the chat template, tokenise and truncate (``data.truncation`` keep_end / keep_start),
   reporting or rejecting bad records;
3. compute reference log-probs once for train and eval data and cache them on disk, keyed by a
   fingerprint of (reference weights, tokenised data, log-prob settings) — a later run reuses them;
   the reference is the initial policy, or the LoRA-disabled policy with peft;
4. each step: one concatenated chosen+rejected forward (padding-free packing by default),
   fp32 chunked log-softmax, log-ratios -> ``diffdpo.losses.preference_loss`` -> backward with
   loss scaled by examples per optimizer step (exact under gradient accumulation);
5. log the core's metrics (TRL names) plus nll, kl, entropy; evaluate held-out pairs every
   ``train.eval_every`` steps; checkpoint atomically every ``train.save_every`` steps and resume exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffdpo.config import load_config, run_main, save_config  # noqa: E402
from diffdpo.llm.trainer import LLMDPOConfig, train  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (recipes/configs/llm_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.1 train.max_steps=10")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(LLMDPOConfig, args.config, args.overrides)
    # the data files are read after the model loads: a missing one is reported before that
    for key, path in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{key}: preference data not found: {path}")
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
    result = train(cfg)
    last = result["history"][-1] if result["history"] else {}
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()})
    if result.get("eval"):
        print({k: round(v, 4) for k, v in result["eval"].items()})
    print(f"saved {Path(result['output_dir']) / 'final'} (metrics: {Path(result['output_dir']) / 'metrics.json'})")
    return result


if __name__ == "__main__":
    run_main(main)  # a user mistake (config, key, value, missing file): one line on stderr, exit code 2
