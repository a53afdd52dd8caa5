"""From sequence log-probs to per-example losses through the shared core, plus LLM metrics.

Metric names: the core's (``loss``, ``rewards/{chosen,rejected,margins,accuracies}``,
``logps/{chosen,rejected}``) plus

* ``nll``: per-token negative log-likelihood of the chosen completions (what RPO's SFT term
  pushes down; TRL issue #800 is chosen log-probs falling without it);
* ``kl``: mean sequence log-ratio ``log pi - log pi_ref`` over the batch's completions. It is a
  KL estimate only where completions are sampled from the policy; on dataset completions it
  tracks drift from the reference (``diffdpo.llm.metrics`` estimates KL on sampled completions);
* ``entropy``: mean per-token entropy of the policy over completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from diffdpo.llm.logps import SequenceLogps
from diffdpo.losses import loss_spec, preference_loss


@dataclass
class LossConfig:
    type: str = field(default="sigmoid", metadata={
        "help": "a loss type of diffdpo.losses.LOSS_TYPES, or logic:<structure> (diffdpo losses compile)"})
    beta: float = field(default=0.1, metadata={"help": "inverse temperature (ORPO: lambda)"})
    options: dict = field(default_factory=dict, metadata={"help": "loss options, e.g. label_smoothing (rDPO flip rate)"})
    sft_weight: float = field(default=0.0, metadata={"help": "eta of the SFT/NLL term on chosen (RPO)"})
    sft_reduction: Literal["sum", "mean"] = field(default="sum", metadata={"help": "summed or per-token NLL"})

    def __post_init__(self):
        try:
            loss_spec(self.type)
        except ValueError as e:
            raise ValueError(f"loss.type: {e}") from None
        if self.sft_reduction not in ("sum", "mean"):
            raise ValueError(f"loss.sft_reduction: 'sum' or 'mean', got {self.sft_reduction!r}")

    @property
    def needs_reference(self) -> bool:
        return loss_spec(self.type).needs_reference

    @property
    def paired(self) -> bool:
        return loss_spec(self.type).paired


def _extras(policy: SequenceLogps, ref: Tensor | None, chosen: slice) -> dict[str, Tensor]:
    """Sums (not means) so micro-batches can be pooled exactly."""
    lengths = policy.lengths
    out = {"nll_sum": -policy.logps[chosen].detach().sum(), "nll_tokens": lengths[chosen].sum(),
           "entropy_sum": policy.entropy.sum(), "entropy_tokens": lengths.sum()}
    if ref is not None:
        out["kl_sum"] = (policy.logps.detach() - ref).sum()
        out["kl_count"] = torch.tensor(float(ref.numel()))
    return out


def pair_losses(policy: SequenceLogps, ref: Tensor | None, cfg: LossConfig):
    """Losses ``[B]`` and the core's output for a concatenated batch (chosen rows first).

    ``ref``: reference log-probs ``[2B]`` in the same order, or None for reference-free losses.
    """
    b = policy.logps.shape[0] // 2
    pc, pr = policy.logps[:b], policy.logps[b:]
    kwargs = dict(chosen_logps=pc, rejected_logps=pr, chosen_lengths=policy.lengths[:b],
                  rejected_lengths=policy.lengths[b:], sft_weight=cfg.sft_weight, sft_reduction=cfg.sft_reduction,
                  **cfg.options)
    if cfg.needs_reference:
        if ref is None:
            raise ValueError(f"loss type {cfg.type!r} needs reference log-probs")
        kwargs.update(chosen_logratios=pc - ref[:b].to(pc), rejected_logratios=pr - ref[b:].to(pr))
    out = preference_loss(cfg.type, beta=cfg.beta, **kwargs)
    return out.losses, out, _extras(policy, ref, slice(0, b))


def unpaired_losses(policy: SequenceLogps, ref: Tensor, desirable: Tensor, kl_logratios: Tensor, cfg: LossConfig):
    """KTO: losses ``[n]`` over desirable then undesirable completions; ``kl_logratios`` are the
    mismatched pairs' log-ratios (TRL computes them without gradient, as here)."""
    ratios = policy.logps - ref.to(policy.logps)
    out = preference_loss(cfg.type, chosen_logratios=ratios[desirable], rejected_logratios=ratios[~desirable],
                          beta=cfg.beta, chosen_logps=policy.logps[desirable],
                          rejected_logps=policy.logps[~desirable], kl_logratios=kl_logratios, **cfg.options)
    return out.losses, out, _extras(policy, ref, desirable)


class MetricPool:
    """Pools per-micro-batch metrics into step metrics: the core's means weighted by pair count,
    NLL / entropy / KL as exact token- or sequence-weighted ratios of pooled sums."""

    def __init__(self):
        self.weighted: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.sums: dict[str, float] = {}

    def add(self, core_out, extras: dict[str, Tensor]) -> None:
        n_c, n_r = core_out.chosen_rewards.numel(), core_out.rejected_rewards.numel()
        n = core_out.losses.numel()
        for key, value in core_out.metrics().items():
            w = n_c if key.endswith("chosen") else n_r if key.endswith("rejected") else n
            self.weighted[key] = self.weighted.get(key, 0.0) + value * w
            self.weights[key] = self.weights.get(key, 0.0) + w
        for key, value in extras.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def result(self, prefix: str = "") -> dict[str, float]:
        out = {k: self.weighted[k] / self.weights[k] for k in self.weighted if self.weights[k]}
        s = self.sums
        if s.get("nll_tokens"):
            out["nll"] = s["nll_sum"] / s["nll_tokens"]
        if s.get("entropy_tokens"):
            out["entropy"] = s["entropy_sum"] / s["entropy_tokens"]
        if s.get("kl_count"):
            out["kl"] = s["kl_sum"] / s["kl_count"]
        return {prefix + k: v for k, v in out.items()}
