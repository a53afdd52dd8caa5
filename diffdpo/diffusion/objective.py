"""One Diffusion-DPO loss evaluation: pair batch -> shared draws -> errors -> log-ratios -> loss core.

    policy errors  (w, l) at x_t = noised(latents, eps, t), eps and t shared by the pair
    reference errors (w, l) at the same inputs (frozen copy / LoRA-disabled / cached)
    logratio = -(err_policy - err_reference)  ->  diffdpo.losses.preference_loss

``sft_only`` (the SFT-first epochs of Tango 2) returns the winners' policy error, computing
neither the losers' nor the reference's; ``sft_weight`` adds that error to every pair's preference loss (CRPO / RPO-style).
A reference-free loss (MaPO) reads the policy's errors and runs no reference at all.

:func:`diffusion_kto_step` is the unpaired counterpart (Diffusion-KTO): each sample its own noise and
timestep, ``logratio = -(err_policy - err_reference)``, desirable and undesirable samples to ``kto``.

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
from diffdpo.diffusion.logratios import PairDraws, logratios, noisy_and_target, pair_errors, pair_inputs, \
    per_sample_mse
from diffdpo.losses import PreferenceLossOutput, loss_spec, preference_loss

LOSS_INPUTS = frozenset({"chosen_logratios", "rejected_logratios", "chosen_errors", "rejected_errors"})
"""The tensors this adapter hands the loss core: a loss that reads others (sequence log-probs, token
counts, win probabilities) cannot train a diffusion model (:func:`diffdpo.losses.required_inputs`)."""


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
        if self.reference_errors is not None:  # None in SFT-only steps and for reference-free losses
            out["mse/ref_chosen"], out["mse/ref_rejected"] = self.reference_errors
        if self.core is not None:
            out["rewards/chosen"], out["rewards/rejected"] = self.core.chosen_rewards, self.core.rejected_rewards
        return {k: v.detach().float() for k, v in out.items()}


@dataclass
class KTOStep:
    """One unpaired micro-batch: ``[B]`` errors, log-ratios and labels, and the reference point used."""

    loss: Tensor
    policy_errors: Tensor
    reference_errors: Tensor
    rewards: Tensor
    desirable: Tensor
    reference_point: Tensor
    core: PreferenceLossOutput

    def per_pair(self) -> dict[str, Tensor]:
        """Detached ``[B]`` per-sample tensors (and the ``[1]`` reference point) for logging."""
        out = {"mse/policy": self.policy_errors, "mse/ref": self.reference_errors, "rewards": self.rewards,
               "desirable": self.desirable, "kto/reference_point": self.reference_point.reshape(1)}
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
    sft = dict(sft_weight=sft_weight, chosen_nll=policy_err[0] if sft_weight else None)
    if not loss_spec(loss_type).needs_reference:  # MaPO: the policy's errors are all it reads
        core = preference_loss(loss_type, beta=beta, chosen_errors=policy_err[0], rejected_errors=policy_err[1],
                               **sft, **(loss_options or {}))
        return DPOStep(core.losses.mean(), policy_err, None, core)
    ref_err = reference.errors(errors_of, indices)
    ref_err = (ref_err[0].to(policy_err[0]), ref_err[1].to(policy_err[1]))
    chosen, rejected = logratios(policy_err, ref_err)
    core = preference_loss(loss_type, chosen, rejected, beta, **sft, **(loss_options or {}))
    return DPOStep(core.losses.mean(), policy_err, ref_err, core)


def sample_errors(predict: Callable, unet, scheduler, latents: Tensor, cond: dict[str, Tensor],
                  draws: PairDraws) -> Tensor:
    """``[B]`` denoising errors of unpaired samples, each at its own noise and timestep."""
    noisy, timesteps, target = noisy_and_target(scheduler, latents, draws.noise.to(latents.dtype), draws.step_index)
    return per_sample_mse(predict(unet, noisy, timesteps, cond), target)


def diffusion_kto_step(predict: Callable, policy, reference, scheduler, latents: Tensor, desirable: Tensor,
                       cond: dict[str, Tensor], draws: PairDraws, indices: list[int], loss_type: str = "kto",
                       beta: float = 1000.0, loss_options: dict | None = None,
                       mean_over_processes: Callable[[Tensor], Tensor] = lambda t: t) -> KTOStep:
    """Diffusion-KTO loss of one micro-batch of ``B`` labelled samples (mean over samples).

    The reference point, unless ``loss_options`` fixes ``reference_point``, is the batch mean of the
    log-ratios over both labels, averaged over processes by ``mean_over_processes`` (then clamped at 0
    by the core): what Diffusion-KTO's ``train_kto_sd_v1.5.py`` computes before its sigmoid utility.
    """
    policy_err = sample_errors(predict, policy, scheduler, latents, cond, draws)
    (ref_err,) = reference.errors(lambda unet: (sample_errors(predict, unet, scheduler, latents, cond, draws),),
                                  indices)
    ratio = -(policy_err - ref_err.to(policy_err).detach())
    options = dict(loss_options or {})
    if options.get("reference_point") is None:
        options["reference_point"] = mean_over_processes(ratio.detach().mean())
    core = preference_loss(loss_type, ratio[desirable], ratio[~desirable], beta, **options)
    z0 = torch.as_tensor(options["reference_point"], dtype=ratio.dtype, device=ratio.device).clamp(min=0)
    return KTOStep(core.losses.mean(), policy_err, ref_err, beta * ratio.detach(), desirable, z0, core)


def bucket_accuracy(margins: Tensor, buckets: Tensor, n_buckets: int) -> dict[str, float]:
    """Implicit accuracy (tie = 0.5) per timestep bucket, for buckets that have pairs."""
    out = {}
    correct = (margins > 0).float() + 0.5 * (margins == 0).float()
    for b in range(n_buckets):
        sel = buckets == b
        if sel.any():
            out[f"accuracy_t/bucket_{b}of{n_buckets}"] = correct[sel].mean().item()
    return out

