"""The Diffusion-DPO loss of one batch of pairs, in one call, for your own training loop.

    out = diffusion_dpo_loss(unet, reference, scheduler, winners, losers, condition, noise, timesteps,
                             beta=5000, beta_convention="salesforce")
    out.loss.backward()          # gradients reach the policy only
    log(out.metrics)             # loss, implicit accuracy, reward margins, policy / reference MSE

Everything that decides the loss is an argument: the winners' and losers' clean latents, the
condition, one noise and one timestep per pair (both shared by its winner and loser), the
scheduler (which sets the training target: epsilon, v-prediction or flow matching) and beta with
the convention it was published in. The computation is the toolkit's own
(:func:`diffdpo.diffusion.objective.diffusion_dpo_step` -> :mod:`diffdpo.diffusion.logratios` ->
:func:`diffdpo.losses.preference_loss`), the same code the ``diffdpo train`` recipe runs. See
docs/diffusion_api.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from diffdpo.diffusion.logratios import PairDraws, num_train_steps, prediction_kind
from diffdpo.diffusion.objective import diffusion_dpo_step
from diffdpo.diffusion.reference import CachedReference, LoraDisabledReference
from diffdpo.losses import LOGIC_PREFIX, LOSS_TYPES, diffusion_beta, loss_spec

__all__ = ["BETA_CONVENTIONS", "DiffusionDPOLoss", "core_beta", "diffusion_dpo_loss"]

BETA_CONVENTIONS: dict[str, str] = {
    "salesforce": "loss = -logsigmoid(-0.5 * beta * (model_diff - ref_diff)), model_diff = mse_w - mse_l of the "
                  "policy, ref_diff the same of the reference: Salesforce DiffusionDPO train.py (beta 5000 for SD1.5 "
                  "and SDXL) and the diffusers SDXL example examples/research_projects/diffusion_dpo/"
                  "train_diffusion_dpo_sdxl.py (beta 5000)",
    "tango2": "the same -0.5 * beta form as 'salesforce': Tango 2 (declare-lab/tango tango2/tango2-train.py; "
              "README beta 2000)",
    "tangoflux": "the same -0.5 * beta form as 'salesforce', on flow-matching velocity errors: TangoFlux CRPO "
                 "(declare-lab/TangoFlux tangoflux/model.py, beta 2000, which adds the winners' MSE: sft_weight 1)",
    "diffusers": "loss = -logsigmoid(beta * (ref_diff - model_diff)): the diffusers SD1.5 example "
                 "examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (beta 2500, the same loss as "
                 "'salesforce' at beta 5000). Not the SDXL script in the same folder, train_diffusion_dpo_sdxl.py: "
                 "it keeps -0.5 * beta, so its beta 5000 is 'salesforce'",
    "core": "diffdpo's own: loss = -logsigmoid(beta * (r_w - r_l)), r = -(mse_policy - mse_ref); "
            "beta = published beta / 2 for 'salesforce', 'tango2' and 'tangoflux', = published beta for "
            "'diffusers'",
}
"""Each accepted ``beta_convention`` and the published loss it reproduces."""


def core_beta(beta: float, beta_convention: str) -> float:
    """``beta`` as published in ``beta_convention`` -> the loss core's beta (:func:`diffdpo.losses.diffusion_beta`)."""
    if beta_convention not in BETA_CONVENTIONS:
        lines = "\n".join(f"  {name}: {text}" for name, text in BETA_CONVENTIONS.items())
        raise ValueError(f"beta_convention: unknown {beta_convention!r}; valid are:\n{lines}")
    return diffusion_beta(float(beta), beta_convention)


@dataclass
class DiffusionDPOLoss:
    """What :func:`diffusion_dpo_loss` returns.

    ``loss`` is the mean over pairs (a scalar to ``backward()``); everything else is detached.
    ``metrics`` uses the toolkit's vocabulary (the trainer logs the same names):

    * ``loss``; ``rewards/chosen``, ``rewards/rejected`` = mean of ``beta_core * r``, with
      ``r = -(mse_policy - mse_ref)``; ``rewards/margins`` = their mean difference, which is
      Salesforce's ``inside_term`` (``-0.5 * beta * (model_diff - ref_diff)``) averaged;
    * ``rewards/accuracies`` = implicit accuracy, the share of pairs whose margin is > 0, a tie
      counting 0.5 (as the diffusers examples count it; Salesforce's ``implicit_acc`` counts a tie 0);
    * ``mse/policy_chosen``, ``mse/policy_rejected``, ``mse/ref_chosen``, ``mse/ref_rejected``: mean
      per-sample denoising MSE; ``mse/policy`` and ``mse/ref`` over both halves (what Salesforce's
      ``train.py`` logs as ``model_mse_unaccumulated`` and ``ref_mse_unaccumulated``).
    """

    loss: Tensor
    losses: Tensor
    metrics: dict[str, float]
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    policy_errors: tuple[Tensor, Tensor]
    reference_errors: tuple[Tensor, Tensor]
    beta_core: float


def unet_call(model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """The default ``predict``: ``model(noisy, timesteps, **cond)``, taking ``.sample`` (diffusers
    models) or the first element of a tuple if the model returns one."""
    out = model(noisy, timesteps, **cond)
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


class _FrozenModule:
    """A reference model given by the caller, run under ``no_grad`` (never copied, never trained)."""

    def __init__(self, module: nn.Module):
        self.unet = module

    @torch.no_grad()
    def errors(self, run, indices):
        return run(self.unet)


def _reference(reference, policy, batch: int):
    if isinstance(reference, str):
        if reference != "lora_disabled":
            raise ValueError(f"reference: a module, 'lora_disabled' or (errors_chosen, errors_rejected); "
                             f"got {reference!r}")
        return LoraDisabledReference(policy)
    if isinstance(reference, (tuple, list)):
        if len(reference) != 2 or not all(isinstance(t, Tensor) and t.shape == (batch,) for t in reference):
            raise ValueError(f"reference: precomputed errors must be two [B] = [{batch}] tensors (chosen, rejected)")
        return CachedReference(torch.stack([t.detach().float() for t in reference], 1))
    if callable(reference):
        return _FrozenModule(reference)
    raise ValueError(f"reference: a module, 'lora_disabled' or (errors_chosen, errors_rejected); got "
                     f"{type(reference).__name__}")


def diffusion_dpo_loss(policy: nn.Module, reference: nn.Module | str | tuple[Tensor, Tensor], scheduler,
                       chosen_latents: Tensor, rejected_latents: Tensor, condition: Tensor | dict[str, Tensor],
                       noise: Tensor, timesteps: Tensor, *, beta: float, beta_convention: str,
                       loss_type: str = "sigmoid", sft_weight: float = 0.0,
                       predict: Callable[[nn.Module, Tensor, Tensor, dict], Tensor] | None = None,
                       **loss_options) -> DiffusionDPOLoss:
    """Diffusion-DPO loss of ``B`` preference pairs.

    Args:
        policy: the model being trained, e.g. a diffusers ``UNet2DConditionModel`` (with or without LoRA).
        reference: the frozen reference: a module (run under ``no_grad``; pass a frozen copy of the
            initial policy), ``"lora_disabled"`` (the policy with its peft LoRA adapters switched off,
            as the diffusers example does), or ``(errors_chosen, errors_rejected)``, two ``[B]`` tensors
            of reference MSE you computed beforehand at the same noise and timesteps.
        scheduler: a diffusers noise scheduler; it sets the noised input and the target:
            ``prediction_type`` ``"epsilon"`` -> the noise, ``"v_prediction"`` -> ``get_velocity``,
            ``"sample"`` -> the clean latents, ``FlowMatch*`` schedulers -> ``noise - latents`` at
            ``x_t = (1 - sigma) x0 + sigma noise``.
        chosen_latents, rejected_latents: ``[B, ...]`` clean (VAE) latents of the winners and the losers.
        condition: ``[B, ...]`` encoder hidden states (passed as ``encoder_hidden_states``), or a dict
            of ``[B, ...]`` tensors passed to the model as keyword arguments; each pair's condition is
            used for its winner and its loser.
        noise: ``[B, ...]`` one noise per pair, shared by its winner and loser.
        timesteps: ``[B]`` integer, one per pair, shared by its winner and loser: the training timestep
            (``0 .. num_train_timesteps - 1``) for DDPM-style schedulers, the index into
            ``scheduler.sigmas`` / ``scheduler.timesteps`` for flow-matching ones.
        beta: beta as published, in ``beta_convention``.
        beta_convention: ``"salesforce"`` | ``"tango2"`` | ``"tangoflux"`` | ``"diffusers"`` | ``"core"``; what
            each means is in :data:`BETA_CONVENTIONS`. Salesforce's 5000, the diffusers SD1.5 example's 2500
            (``"diffusers"``) and its SDXL example's 5000 (``"salesforce"``) are the same loss.
        loss_type: a paired, reference-based loss of :data:`diffdpo.losses.LOSS_TYPES` (``sigmoid`` is DPO),
            or ``logic:<structure>`` whose loss reads log-ratios only (``diffdpo losses explain`` says).
        sft_weight: weight of the winners' policy MSE added to every pair's loss (TangoFlux CRPO: 1).
        predict: ``predict(model, noisy, timesteps, cond_dict) -> prediction``; default
            :func:`unet_call`. Pass your own for models with other call signatures (e.g. SDXL's
            ``added_cond_kwargs``).
        **loss_options: options of ``loss_type`` (e.g. ``label_smoothing``).

    Returns:
        :class:`DiffusionDPOLoss`: ``loss`` (mean over pairs, with the graph to the policy), per-pair
        ``losses``, ``metrics``, rewards and errors (detached) and the core beta used.
    """
    b = _check_batch(chosen_latents, rejected_latents, noise, timesteps, scheduler)
    cond = {"encoder_hidden_states": condition} if isinstance(condition, Tensor) else dict(condition)
    for key, value in cond.items():
        if not isinstance(value, Tensor) or value.shape[:1] != (b,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"condition[{key!r}]: expected a tensor with leading dimension B = {b}, got {shape}")
    spec = loss_spec(loss_type) if loss_type in LOSS_TYPES or loss_type.startswith(LOGIC_PREFIX) else None
    if spec is None or not spec.paired or not spec.needs_reference or "chosen_logps" in spec.needs:
        valid = sorted(n for n, s in LOSS_TYPES.items() if s.paired and s.needs_reference)
        raise ValueError(f"loss_type: {loss_type!r} is not a paired loss with a reference; valid: {valid} or "
                         f"'{LOGIC_PREFIX}<structure>' over log-ratios")
    beta_core = core_beta(beta, beta_convention)
    draws = PairDraws(noise.to(chosen_latents.dtype), timesteps.to(chosen_latents.device),
                      torch.zeros(b, dtype=torch.bool, device=chosen_latents.device))
    step = diffusion_dpo_step(predict or unet_call, policy, _reference(reference, policy, b), scheduler,
                              chosen_latents, rejected_latents, cond, draws, list(range(b)), loss_type=loss_type,
                              beta=beta_core, sft_weight=sft_weight, loss_options=loss_options)
    pw, pl = (t.detach().float() for t in step.policy_errors)
    rw, rl = (t.detach().float() for t in step.reference_errors)
    metrics = step.core.metrics()
    metrics["loss"] = step.loss.item()
    metrics.update({"mse/policy_chosen": pw.mean().item(), "mse/policy_rejected": pl.mean().item(),
                    "mse/ref_chosen": rw.mean().item(), "mse/ref_rejected": rl.mean().item(),
                    "mse/policy": torch.cat([pw, pl]).mean().item(), "mse/ref": torch.cat([rw, rl]).mean().item()})
    return DiffusionDPOLoss(step.loss, step.core.losses.detach(), metrics, step.core.chosen_rewards,
                            step.core.rejected_rewards, (pw, pl), (rw, rl), beta_core)


def _check_batch(chosen: Tensor, rejected: Tensor, noise: Tensor, timesteps: Tensor, scheduler) -> int:
    if chosen.ndim < 2 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen_latents {tuple(chosen.shape)} and rejected_latents {tuple(rejected.shape)}: "
                         "expected the same shape [B, ...]")
    if noise.shape != chosen.shape:
        raise ValueError(f"noise: expected one noise per pair, shape {tuple(chosen.shape)}, got {tuple(noise.shape)}")
    b = chosen.shape[0]
    if timesteps.shape != (b,) or timesteps.is_floating_point() or timesteps.dtype == torch.bool:
        raise ValueError(f"timesteps: expected an integer tensor of shape [B] = [{b}], got {timesteps.dtype} "
                         f"{tuple(timesteps.shape)} (flow-matching schedulers: pass indices into scheduler.sigmas)")
    n = num_train_steps(scheduler)
    if b and (timesteps.min() < 0 or timesteps.max() >= n):
        raise ValueError(f"timesteps: must lie in [0, {n}) for {type(scheduler).__name__} "
                         f"({prediction_kind(scheduler)}), got [{timesteps.min().item()}, {timesteps.max().item()}]")
    return b
