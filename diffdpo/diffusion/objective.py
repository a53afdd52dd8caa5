"""One Diffusion-DPO loss evaluation: pair batch -> shared draws -> errors -> log-ratios -> loss core.

    policy errors  (w, l) at x_t = noised(latents, eps, t), eps and t shared by the pair
    reference errors (w, l) at the same inputs (frozen copy / LoRA-disabled / cached)
    logratio = -(err_policy - err_reference)  ->  diffdpo.losses.preference_loss

``sft_only`` (the SFT-first epochs of Tango 2) returns the winners' policy error, computing
neither the losers' nor the reference's; ``sft_weight`` adds that error to every pair's preference loss (CRPO / RPO-style).

:func:`guided` swaps the model's conditional prediction for the classifier-free-guided one, so the
loss scores the sampler that is actually used (and that made the pairs) rather than the
conditional model alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from diffdpo.diffusion.encode import repeat_for_pair, stack_conditions
from diffdpo.diffusion.logratios import PairDraws, logratios, pair_errors, pair_inputs, per_sample_mse
from diffdpo.losses import PreferenceLossOutput, preference_loss


@dataclass
class DPOStep:
    loss: Tensor
    policy_errors: tuple[Tensor, Tensor | None]
    reference_errors: tuple[Tensor, Tensor] | None = None
    core: PreferenceLossOutput | None = None

    def per_pair(self) -> dict[str, Tensor]:
        """Detached ``[B]`` tensors for logging (gathered across processes by the recipe)."""
        out = {"mse/policy_chosen": self.policy_errors[0]}
        if self.policy_errors[1] is not None:  # None in SFT-only steps
            out["mse/policy_rejected"] = self.policy_errors[1]
        if self.reference_errors is not None:
            out["mse/ref_chosen"], out["mse/ref_rejected"] = self.reference_errors
            out["rewards/chosen"], out["rewards/rejected"] = self.core.chosen_rewards, self.core.rejected_rewards
        return {k: v.detach().float() for k, v in out.items()}


def guided(predict: Callable, uncond: dict[str, Tensor], scale: float) -> Callable:
    """``predict`` replaced by the guided prediction ``u + scale * (c - u)``, where ``u`` is the
    model's output for the empty prompt ``uncond`` (a ``[1, ...]`` condition) at the same input.

    Both halves run in one forward pass; gradients flow through both. ``scale == 1`` returns
    ``predict`` itself (the conditional prediction, as published)."""
    if scale == 1.0:
        return predict

    def run(unet, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        n = noisy.shape[0]
        empty = {k: v.to(cond[k].device).expand(n, *v.shape[1:]) for k, v in uncond.items()}
        out = predict(unet, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                      stack_conditions([cond, empty]))
        conditional, unconditional = out.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return run


def diffusion_dpo_step(predict: Callable, policy, reference, scheduler, chosen_latents: Tensor,
                       rejected_latents: Tensor, cond: dict[str, Tensor], draws: PairDraws, indices: list[int],
                       loss_type: str = "sigmoid", beta: float = 2500.0, sft_weight: float = 0.0,
                       sft_only: bool = False, loss_options: dict | None = None) -> DPOStep:
    """Loss of one micro-batch of ``B`` pairs (mean over pairs).

    ``predict(unet, noisy, timesteps, cond)`` is the backbone's UNet call; ``cond`` is the
    per-pair condition after prompt dropout, repeated here for both halves.
    """
    inputs = pair_inputs(scheduler, chosen_latents, rejected_latents, draws)
    if sft_only:  # winners only: the losers' half would cost a forward and backward for nothing
        b = len(chosen_latents)
        err_w = per_sample_mse(predict(policy, inputs.noisy[:b], inputs.timesteps[:b], cond), inputs.target[:b])
        return DPOStep(err_w.mean(), (err_w, None))
    cond2 = repeat_for_pair(cond)

    def errors_of(unet) -> tuple[Tensor, Tensor]:
        return pair_errors(lambda x, t, c: predict(unet, x, t, c), inputs, cond2)

    policy_err = errors_of(policy)
    ref_err = reference.errors(errors_of, indices)
    ref_err = (ref_err[0].to(policy_err[0]), ref_err[1].to(policy_err[1]))
    chosen, rejected = logratios(policy_err, ref_err)
    core = preference_loss(loss_type, chosen, rejected, beta, sft_weight=sft_weight,
                           chosen_nll=policy_err[0] if sft_weight else None, **(loss_options or {}))
    return DPOStep(core.losses.mean(), policy_err, ref_err, core)


def bucket_accuracy(margins: Tensor, buckets: Tensor, n_buckets: int) -> dict[str, float]:
    """Implicit accuracy (tie = 0.5) per timestep bucket, for buckets that have pairs."""
    out = {}
    correct = (margins > 0).float() + 0.5 * (margins == 0).float()
    for b in range(n_buckets):
        sel = buckets == b
        if sel.any():
            out[f"accuracy_t/bucket_{b}of{n_buckets}"] = correct[sel].mean().item()
    return out

