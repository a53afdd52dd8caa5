"""Selection strategies: which generated samples become a (winner, loser) pair.

All scores are against the *original* caption, whatever prompt produced the sample.

* ``multi_sample`` — N samples of the original prompt; winner = best, loser = worst, kept when
  ``best - worst >= min_gap`` (TangoFlux CRPO: 5 samples, max/min CLAP).
* ``perturbed`` — winner = best sample of the original prompt; loser = a sample of a perturbed
  prompt, kept when it scores at least ``min_gap`` below the winner.
* ``temporal`` — as ``perturbed`` with reorder-only perturbations (swap_order).

Every strategy can also demand ``min_winner_score``: a gap says the winner beats the loser, not
that it is any good, and a pair of two failures teaches "less wrong" (on SoundWorld no winner
under CLAP 0.4 satisfied its caption, against 52% of those at 0.6 or more; docs/soundworld.md).

For the perturbed strategies ``loser="lowest"`` takes the lowest-scoring eligible sample (the
most certain pair) and ``loser="hardest"`` the highest-scoring one that still clears the gap
(the closest negative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

STRATEGIES = ("multi_sample", "perturbed", "temporal")


@dataclass(frozen=True)
class Candidate:
    """One generated sample: the prompt that made it, its seed, and its score vs the original."""

    key: str
    prompt: str
    seed: int
    score: float
    perturbation: str | None = None  # kind, None for the original prompt


@dataclass(frozen=True)
class Selection:
    strategy: str
    chosen: Candidate
    rejected: Candidate

    @property
    def gap(self) -> float:
        return self.chosen.score - self.rejected.score


@dataclass(frozen=True)
class NoPair:
    strategy: str
    reason: str


def _weak_winner(best: Candidate, strategy: str, min_winner_score: float | None) -> NoPair | None:
    if min_winner_score is not None and best.score < min_winner_score:
        return NoPair(strategy, f"best sample scores {best.score:.4f} < min_winner_score {min_winner_score}")
    return None


def select_multi_sample(originals: Sequence[Candidate], min_gap: float,
                        min_winner_score: float | None = None) -> Selection | NoPair:
    if len(originals) < 2:
        return NoPair("multi_sample", f"needs >= 2 valid samples of the original prompt, got {len(originals)}")
    ranked = sorted(originals, key=lambda c: (-c.score, c.key))
    best, worst = ranked[0], ranked[-1]
    if weak := _weak_winner(best, "multi_sample", min_winner_score):
        return weak
    if best.score - worst.score < min_gap:
        return NoPair("multi_sample", f"gap {best.score - worst.score:.4f} < min_gap {min_gap}")
    return Selection("multi_sample", best, worst)


def select_perturbed(originals: Sequence[Candidate], perturbed: Sequence[Candidate], min_gap: float,
                     strategy: str = "perturbed", loser: str = "lowest",
                     min_winner_score: float | None = None) -> Selection | NoPair:
    if loser not in ("lowest", "hardest"):
        raise ValueError(f"{strategy}.loser: must be 'lowest' or 'hardest', got {loser!r}")
    if not originals:
        return NoPair(strategy, "no valid sample of the original prompt")
    if not perturbed:
        return NoPair(strategy, "no valid sample of a perturbed prompt")
    best = min(originals, key=lambda c: (-c.score, c.key))
    if weak := _weak_winner(best, strategy, min_winner_score):
        return weak
    eligible = [c for c in perturbed if best.score - c.score >= min_gap]
    if not eligible:
        top = max(c.score for c in perturbed)
        return NoPair(strategy, f"no perturbed sample scores >= {min_gap} below the winner "
                                f"({best.score:.4f}; best perturbed {top:.4f})")
    pick = min if loser == "lowest" else max
    return Selection(strategy, best, pick(eligible, key=lambda c: (c.score, c.key)))
