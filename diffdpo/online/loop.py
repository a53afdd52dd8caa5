"""The online loop: sample from a sampling policy, label with a preference model, update, repeat.

One round: take the next ``prompts_per_round`` prompts (cycling through the prompt set), sample
``samples_per_prompt`` outputs each from the sampling policy, judge them, select pairs, write them
as a preference set (``rounds/round_NNNN.jsonl``, the builder's record fields plus win probabilities),
then take ``steps_per_round`` preference steps on them. The methods are settings of this loop:

=====================  ======================================================================
offline DPO            1 round, ``sampler: reference``, best vs worst, ``loss.type: sigmoid``
RSO + DPO / hinge      1 round, ``sampler: reference``, ``selection: rso``, sigmoid / hinge
iterative DPO          R rounds, ``sampler: current``, best vs worst, reference = initial policy
online IPO             a round per step, 2 samples, ``sampler: current``, ``loss.type: ipo``
IPO-MD                 as online IPO, ``sampler: mixture`` (geometric policy/reference mixture)
SPPO                   R rounds, K samples, ``loss.type: sppo``, ``reference: previous_round``
=====================  ======================================================================

**Budget** is counted in preference-model calls (:mod:`diffdpo.preference_model`): the last round
shrinks to what is left and the loop stops when nothing is. **Resume**: a checkpoint after every
``save_every_rounds`` rounds holds the policy, its optimizer, the calls spent and the history; a
killed run continues from the last one. Sampling is seeded by ``(seed, round)``, so a resumed run
draws what the uninterrupted one drew.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

from diffdpo.online.selection import Pair, best_vs_worst, rso_pairs
from diffdpo.preference_model import PreferenceModel
from diffdpo.training.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint


@dataclass
class OnlineConfig:
    rounds: int = field(default=1, metadata={"help": "rounds of sample -> label -> update"})
    prompts_per_round: int = 64
    samples_per_prompt: int = field(default=2, metadata={"help": "outputs sampled per prompt (RSO: candidates)"})
    steps_per_round: int = 1
    budget: int | None = field(default=None, metadata={"help": "preference-model calls in all; None = no cap"})
    sampler: Literal["current", "reference", "mixture"] = "current"
    mixture_weight: float = field(default=0.5, metadata={
        "help": "sampler mixture: weight of the reference in pi^(1-w) pi_ref^w (IPO-MD's beta)"})
    selection: Literal["best_vs_worst", "rso"] = "best_vs_worst"
    rso_beta: float = field(default=0.5, metadata={"help": "RSO's rejection-sampling temperature"})
    rso_accept: int = field(default=8, metadata={"help": "RSO: candidates accepted per prompt (paired up)"})
    reference: Literal["initial", "previous_round"] = field(default="initial", metadata={
        "help": "previous_round: each round's reference is the policy it starts from (SPPO)"})
    seed: int = 0
    save_every_rounds: int = 1

    def __post_init__(self):
        for name in ("rounds", "prompts_per_round", "steps_per_round", "save_every_rounds", "rso_accept"):
            if getattr(self, name) < 1:
                raise ValueError(f"online.{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"online.samples_per_prompt must be >= 2 (a pair), got {self.samples_per_prompt}")
        if not 0.0 <= self.mixture_weight <= 1.0:
            raise ValueError(f"online.mixture_weight must be in [0, 1], got {self.mixture_weight}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"online.budget must be >= 1 or null, got {self.budget}")


class OnlinePolicy(Protocol):
    """What the loop needs of a model: sample, show an output as text, take preference steps, save."""

    def sample(self, prompts: Sequence[str], k: int, sampler: str, mixture_weight: float, seed: int) -> list[list]: ...

    def text(self, output) -> str: ...

    def reset_reference(self) -> None: ...

    def train_round(self, records: list[dict], steps: int, seed: int,
                    on_step: Callable[[int], None] | None = None) -> dict[str, float]: ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


def round_seed(seed: int, rnd: int) -> int:
    return seed * 1_000_003 + rnd


def select(cfg: OnlineConfig, judgement, rng: random.Random) -> list[Pair]:
    if cfg.selection == "rso":
        return rso_pairs(judgement, cfg.rso_beta, cfg.rso_accept, rng)
    return best_vs_worst(judgement)


def run_online(cfg: OnlineConfig, policy: OnlinePolicy, preference: PreferenceModel, prompts: Sequence[str],
               out_dir: str | Path, on_round: Callable[[int, dict], None] | None = None,
               on_step: Callable[[int], None] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the rounds; returns ``{"history": [...], "calls": int, "rounds": int}``.

    ``on_round(round, entry)`` follows each round; ``on_step(step)`` each gradient step, counted over
    all rounds (measurements along training at the same step for every method).
    """
    if not prompts:
        raise ValueError("online loop: no prompts")
    out_dir = Path(out_dir)
    (out_dir / "rounds").mkdir(parents=True, exist_ok=True)
    start, history = 0, []
    last = latest_checkpoint(out_dir / "checkpoints")
    if last is not None:
        policy.load(last)
        state = load_trainer_state(last)
        start, history, preference.calls = state["step"], state["history"], state["calls"]
        print(f"resumed from {last} after round {start} ({preference.calls} preference-model calls spent)")
    k = cfg.samples_per_prompt
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.rounds, initial=start, desc="online rounds")
    for rnd in range(start, cfg.rounds):
        n = cfg.prompts_per_round
        if cfg.budget is not None:
            n = min(n, (cfg.budget - preference.calls) // preference.cost(k))
        if n <= 0:
            break
        offset = rnd * cfg.prompts_per_round
        batch = [prompts[(offset + i) % len(prompts)] for i in range(n)]
        if cfg.reference == "previous_round":
            policy.reset_reference()
        seed = round_seed(cfg.seed, rnd)
        rng = random.Random(seed)
        outputs = policy.sample(batch, k, cfg.sampler, cfg.mixture_weight, seed)
        records = []
        for i, (prompt, outs) in enumerate(zip(batch, outputs)):
            judgement = preference.judge(prompt, [policy.text(o) for o in outs])
            for j, pair in enumerate(select(cfg, judgement, rng)):
                records.append({"id": f"r{rnd}-p{offset + i}-{j}", "prompt": prompt,
                                "chosen": policy.text(outs[pair.chosen]), "rejected": policy.text(outs[pair.rejected]),
                                "chosen_win_prob": pair.chosen_win_prob, "rejected_win_prob": pair.rejected_win_prob,
                                "round": rnd, "chosen_output": outs[pair.chosen], "rejected_output": outs[pair.rejected]})
        _write_round(out_dir / "rounds" / f"round_{rnd:04d}.jsonl", records)
        steps_before = sum(h["steps"] for h in history)
        step_hook = None if on_step is None else (lambda s, base=steps_before: on_step(base + s))
        metrics = policy.train_round(records, cfg.steps_per_round, seed, step_hook) if records else {}
        entry = {"round": rnd, "prompts": n, "pairs": len(records), "calls": preference.calls,
                 "steps": cfg.steps_per_round if records else 0, **metrics}
        history.append(entry)
        if on_round is not None:
            on_round(rnd, entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(pairs=len(records), calls=preference.calls)
        if (rnd + 1) % cfg.save_every_rounds == 0:
            _save(out_dir, rnd + 1, policy, history, preference)
    if len(history) % cfg.save_every_rounds and len(history) > start:
        _save(out_dir, len(history), policy, history, preference)
    if bar is not None:
        bar.close()
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    return {"history": history, "calls": preference.calls, "rounds": len(history)}


def _save(out_dir: Path, rounds_done: int, policy: OnlinePolicy, history: list, preference: PreferenceModel) -> None:
    save_checkpoint(out_dir / "checkpoints", rounds_done, policy.save,
                    {"history": history, "calls": preference.calls}, keep_last=1)


def _write_round(path: Path, records: list[dict]) -> None:
    """The round's pairs as a preference set (token-level outputs stay in memory); written whole to
    a temporary name and renamed, so a killed run never leaves half a round."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if not k.endswith("_output")}) + "\n")
    tmp.replace(path)
