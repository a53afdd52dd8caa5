"""Online and iterative preference optimisation of a causal LM: RSO, online IPO, IPO-MD, SPPO, iterative DPO.

    python recipes/llm_online.py --config recipes/configs/llm_online_ipo.yaml [key.sub=value ...]

Each round samples from the sampling policy (current, reference or their geometric mixture), labels
the samples with a preference model (``preference.judge``: a reward model ``rm:PATH`` or a Python
scorer ``module:function`` under Bradley-Terry, or a pairwise preference model ``pm:PATH``; both kinds
are trained by :mod:`diffdpo.llm.reward_model`), selects pairs (best vs worst, or RSO's rejection
sampling), writes them to ``<output_dir>/rounds/round_NNNN.jsonl`` and takes preference steps
through the shared loss core. ``online.budget`` caps preference-model calls; a rerun resumes after
the last finished round. The loop: :mod:`diffdpo.online.loop`; the methods: its module docstring.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffdpo.config import load_config, run_main, save_config  # noqa: E402
from diffdpo.llm.online import LLMOnlineConfig, train_online  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (recipes/configs/llm_online_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. online.budget=1000 train.lr=1e-5")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(LLMOnlineConfig, args.config, args.overrides)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    result = train_online(cfg)
    return {k: v for k, v in result.items() if k != "model"}


if __name__ == "__main__":
    run_main(main)  # a user mistake (missing file, unknown key, bad value): one line, exit code 2
