"""From one prompt's judged outputs to preference pairs.

Each function returns ``Pair``s of output indices with the two outputs' estimated probabilities of
beating the sampling policy, ``P(y > pi) ~ mean_{j != i} P(y_i > y_j)`` over the prompt's other
samples (SPPO's estimator, Wu et al. 2024, arXiv:2405.00675, §4: the soft labels of its loss).
Pairs the preference model cannot order (``P = 0.5``) are dropped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from diffdpo.preference_model import Judgement


@dataclass(frozen=True)
class Pair:
    chosen: int
    rejected: int
    chosen_win_prob: float
    rejected_win_prob: float


def win_probs(probs: np.ndarray) -> np.ndarray:
    """Each output's mean probability of beating the prompt's other outputs."""
    k = len(probs)
    return (probs.sum(1) - 0.5) / max(k - 1, 1)


def best_vs_worst(j: Judgement) -> list[Pair]:
    """The output most likely to beat the others against the least likely (iterative DPO, SPPO's
    pair; with two samples, the labelled pair of online IPO)."""
    w = win_probs(j.probs)
    hi, lo = int(np.argmax(w)), int(np.argmin(w))
    if w[hi] == w[lo]:
        return []
    return [Pair(hi, lo, float(w[hi]), float(w[lo]))]


def rso_accept(rewards: np.ndarray, beta: float, num_accept: int, rng: random.Random) -> list[int]:
    """Statistical rejection sampling (Liu et al. 2023, arXiv:2309.06657, Algorithm 1).

    Candidates drawn from the SFT policy are accepted with probability ``exp((r - r_max) / beta)``,
    ``r_max`` the best remaining reward, without replacement, until ``num_accept`` are kept: the
    accepted outputs approximate draws from the optimal policy ``pi_sft exp(r / beta)`` of the
    KL-regularised reward problem, whose pairs DPO's derivation assumes. The best remaining
    candidate is always accepted, so every pass keeps at least one.
    """
    if not beta > 0:
        raise ValueError(f"rso beta must be > 0, got {beta}")
    remaining, accepted = list(range(len(rewards))), []
    while remaining and len(accepted) < num_accept:
        r_max = max(rewards[i] for i in remaining)
        for i in list(remaining):
            if rng.random() < math.exp((rewards[i] - r_max) / beta):
                accepted.append(i)
                remaining.remove(i)
                if len(accepted) == num_accept:
                    break
    return accepted


def rso_pairs(j: Judgement, beta: float, num_accept: int, rng: random.Random) -> list[Pair]:
    """RSO's data step: accept ``num_accept`` candidates (:func:`rso_accept`), pair them at random
    (the paper's random pairing; its tournament variant is not built) and order each pair by the
    preference model."""
    kept = rso_accept(j.rewards, beta, num_accept, rng)
    rng.shuffle(kept)
    w = win_probs(j.probs)
    pairs = []
    for a, b in zip(kept[0::2], kept[1::2]):
        if j.probs[a, b] == 0.5:
            continue
        hi, lo = (a, b) if j.probs[a, b] > 0.5 else (b, a)
        pairs.append(Pair(hi, lo, float(w[hi]), float(w[lo])))
    return pairs
