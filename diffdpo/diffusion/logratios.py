"""Diffusion log-ratios: per-sample denoising errors of policy and reference at a SHARED noise and timestep.

For a pair (winner w, loser l) with condition c, one noise ``eps`` and one timestep ``t`` are drawn
per pair and used for both halves; the condition (after classifier-free-guidance prompt dropout,
which is decided per pair) is repeated for both halves. Then

    err = mean over non-batch dims of (target - model(x_t, t, c))^2          (float32)
    logratio = -(err_policy - err_reference)

and the loss core (``diffdpo.losses.preference_loss``) turns the chosen/rejected log-ratios into
the loss. With ``sigmoid`` and ``beta = diffusion_beta(B, "salesforce")`` this is Salesforce's
``-logsigmoid(-0.5 * B * (model_diff - ref_diff))``.

The target is read from the noise scheduler, never hard-coded: ``epsilon`` -> eps,
``v_prediction`` -> ``scheduler.get_velocity``, flow-matching schedulers (``FlowMatch*``) ->
``eps - x0`` with ``x_t = (1 - sigma) x0 + sigma eps``.

Timesteps are drawn uniformly over the schedule's indices, or (``sampling="logit_normal"``) at
``u = sigmoid(N(logit_mean, logit_std))``, index ``floor(u * steps)``: SD3's rectified-flow sampling
(Esser et al. 2024, arXiv:2403.03206), which diffusers' SD3 training example, TangoFlux and
flow_grpo's SD3 DPO use (``diffusers.training_utils.compute_density_for_timestep_sampling``).

Noise, timestep and prompt dropout come from a per-pair seed (:func:`pair_seed`), not from a global
RNG stream: the same pair gets the same draws whichever process or micro-batch it lands in, so
multi-process runs, resumed runs and cached reference errors all see identical noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Predict = Callable[[Tensor, Tensor, dict], Tensor]
"""``predict(noisy_latents [2B,...], timesteps [2B], cond) -> model output [2B,...]``."""


def pair_seed(seed: int, index: int, epoch: int | None) -> int:
    """Seed of one pair's draws: a hash of (run seed, record index, epoch).

    ``epoch=None`` gives draws fixed across epochs (needed when reference errors are cached).
    """
    key = f"{seed}/{index}/{'fixed' if epoch is None else epoch}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def prediction_kind(scheduler) -> str:
    """``epsilon`` | ``v_prediction`` | ``sample`` | ``flow_matching`` from the scheduler config."""
    if "FlowMatch" in type(scheduler).__name__:
        return "flow_matching"
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"scheduler {type(scheduler).__name__}: unsupported prediction_type {kind!r}")
    return kind


@dataclass
class PairDraws:
    """One pair batch's shared draws: noise ``[B, ...]``, timestep indices ``[B]``, dropout ``[B]``."""

    noise: Tensor
    step_index: Tensor
    drop_prompt: Tensor


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def draw_pairs(seeds: list[int], latent_shape: tuple[int, ...], num_steps: int, proportion_empty_prompts: float,
               device=None, dtype=torch.float32, step_range: tuple[float, float] = (0.0, 1.0),
               sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0) -> PairDraws:
    """Noise, timestep index and prompt-dropout decision of each pair, each from its own seed.

    ``step_range`` restricts the timestep index to that fraction of the schedule (DDPM-style
    schedules: ``(0.5, 1.0)`` is the noisier half, where a sample's layout is decided; flow-matching
    schedules run the other way, index 0 = pure noise); ``sampling`` is :data:`TIMESTEP_SAMPLING`'s
    density over it. The defaults draw exactly as before."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep sampling {sampling!r}: valid are {list(TIMESTEP_SAMPLING)}")
    low, high = round(step_range[0] * num_steps), round(step_range[1] * num_steps)
    if not 0 <= low < high <= num_steps:
        raise ValueError(f"timestep range {list(step_range)} is empty or outside [0, 1]")
    noise, steps, drops = [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        noise.append(torch.randn(latent_shape, generator=g))
        if sampling == "uniform":
            steps.append(torch.randint(low, high, (1,), generator=g))
        else:  # sigmoid(normal) can round to 1.0 in float32: clamp into the range
            u = compute_density_for_timestep_sampling(sampling, 1, logit_mean, logit_std, generator=g)
            steps.append((low + (u * (high - low)).long()).clamp(max=high - 1))
        drops.append(torch.rand(1, generator=g) < proportion_empty_prompts)
    return PairDraws(torch.stack(noise).to(device=device, dtype=dtype), torch.cat(steps).to(device),
                     torch.cat(drops).to(device))


def noisy_and_target(scheduler, latents: Tensor, noise: Tensor, step_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, timesteps, target)`` for clean ``latents`` under ``scheduler``'s training objective."""
    kind = prediction_kind(scheduler)
    if kind == "flow_matching":
        sigmas = scheduler.sigmas.to(latents.device, torch.float32)[step_index]
        timesteps = scheduler.timesteps.to(latents.device)[step_index]
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        return (1 - s) * latents + s * noise, timesteps, noise - latents
    timesteps = step_index.long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    return noisy, timesteps, target


def num_train_steps(scheduler) -> int:
    if prediction_kind(scheduler) == "flow_matching":
        return len(scheduler.timesteps)
    return int(scheduler.config.num_train_timesteps)


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every non-batch dimension, in float32: ``[N]``."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


@dataclass
class PairInputs:
    """The 2B-sample model input of a pair batch: winners first, then losers (same order)."""

    noisy: Tensor
    timesteps: Tensor
    target: Tensor


def pair_inputs(scheduler, chosen_latents: Tensor, rejected_latents: Tensor, draws: PairDraws) -> PairInputs:
    """Stack winners and losers; both halves get the pair's noise and timestep."""
    latents = torch.cat([chosen_latents, rejected_latents])
    noise = torch.cat([draws.noise, draws.noise]).to(latents.dtype)
    steps = torch.cat([draws.step_index, draws.step_index])
    noisy, timesteps, target = noisy_and_target(scheduler, latents, noise, steps)
    return PairInputs(noisy, timesteps, target)


def pair_errors(predict: Predict, inputs: PairInputs, cond: dict) -> tuple[Tensor, Tensor]:
    """``(err_chosen [B], err_rejected [B])`` of one model on the pair batch."""
    err = per_sample_mse(predict(inputs.noisy, inputs.timesteps, cond), inputs.target)
    return err.chunk(2)


def logratios(policy_err: tuple[Tensor, Tensor], reference_err: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``-(err_policy - err_reference)`` for chosen and rejected; the reference side is detached."""
    (pw, pl), (rw, rl) = policy_err, reference_err
    return -(pw - rw.detach()), -(pl - rl.detach())


def timestep_buckets(step_index: Tensor, num_steps: int, n_buckets: int = 4) -> Tensor:
    """Bucket of each pair's timestep, ``0 .. n_buckets-1`` (accuracy per noise level)."""
    return (step_index.long() * n_buckets // num_steps).clamp(max=n_buckets - 1)
