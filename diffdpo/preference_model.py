"""Preference models: what labels the pairs of online and rejection-sampled preference optimisation.

One interface for the LLM and the diffusion side: a preference model compares the outputs of one
prompt and returns, for every ordered pair, the probability that the first beats the second
(:meth:`PreferenceModel.judge`). Two kinds implement it:

* :class:`RewardPreference`: a pointwise reward ``r(prompt, output)`` (TextWorld's exact reward, a
  trained reward model, the builder's CLAP/CLIP scorer through :func:`scorer_reward`) under
  Bradley-Terry, ``P(a > b) = sigmoid((r(a) - r(b)) / temperature)``; scoring ``K`` outputs costs
  ``K`` calls.
* :class:`PairwisePreference`: a model that reads both outputs (PairRM-style, the paper setting of
  SPPO and Calandriello et al.); ``K`` outputs cost ``K (K - 1) / 2`` calls (``P(b > a) = 1 - P(a > b)``).

``calls`` counts what was spent, so methods can be compared at an equal budget of preference-model
calls (RSO, online IPO, SPPO differ mostly in how they spend it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class Judgement:
    """One prompt's outputs as a preference model sees them."""

    rewards: np.ndarray  # [K] pointwise scores (a pairwise model: each output's mean win probability)
    probs: np.ndarray  # [K, K] P(output i beats output j); the diagonal is 0.5


class PreferenceModel:
    """Judges the outputs of one prompt; counts the calls it makes."""

    name = "preference"

    def __init__(self):
        self.calls = 0

    def cost(self, k: int) -> int:
        """Calls that judging ``k`` outputs of one prompt costs."""
        raise NotImplementedError

    def judge(self, prompt: str, outputs: Sequence) -> Judgement:
        raise NotImplementedError


class RewardPreference(PreferenceModel):
    """Bradley-Terry over a pointwise reward ``reward(prompts, outputs) -> [N]``."""

    def __init__(self, reward: Callable[[Sequence[str], Sequence], Sequence[float]], temperature: float = 1.0,
                 name: str = "reward"):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"preference model {name!r}: temperature must be > 0, got {temperature}")
        self.reward, self.temperature, self.name = reward, temperature, name

    def cost(self, k: int) -> int:
        return k

    def judge(self, prompt: str, outputs: Sequence) -> Judgement:
        self.calls += len(outputs)
        r = np.asarray(self.reward([prompt] * len(outputs), list(outputs)), dtype=np.float64)
        return Judgement(r, 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :]) / self.temperature)))


class PairwisePreference(PreferenceModel):
    """A pairwise model ``prob(prompts, a, b) -> [N]`` of ``P(a > b)``, asked once per unordered pair.
    Its pointwise score of an output (what rejection sampling reads) is the output's mean win
    probability against the others, a Borda score."""

    def __init__(self, prob: Callable[[Sequence[str], Sequence, Sequence], Sequence[float]], name: str = "pairwise"):
        super().__init__()
        self.prob, self.name = prob, name

    def cost(self, k: int) -> int:
        return k * (k - 1) // 2

    def judge(self, prompt: str, outputs: Sequence) -> Judgement:
        k = len(outputs)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        p = np.full((k, k), 0.5)
        if pairs:
            self.calls += len(pairs)
            probs = np.asarray(self.prob([prompt] * len(pairs), [outputs[i] for i, _ in pairs],
                                         [outputs[j] for _, j in pairs]), dtype=np.float64)
            for (i, j), q in zip(pairs, probs):
                p[i, j], p[j, i] = q, 1.0 - q
        return Judgement((p.sum(1) - 0.5) / max(k - 1, 1), p)


def scorer_reward(scorer, sample_rate: int | None = None) -> Callable[[Sequence[str], Sequence], np.ndarray]:
    """The preference builder's scorer (:class:`diffdpo.prefs.backends.Scorer`: CLAP, CLIP, ...) as a
    pointwise reward over (caption, media) pairs, so CLAP-ranked rounds (CRPO) use the same interface."""
    def reward(prompts: Sequence[str], media: Sequence) -> np.ndarray:
        return np.asarray(scorer.score(list(prompts), list(media), sample_rate), dtype=np.float64)
    return reward
