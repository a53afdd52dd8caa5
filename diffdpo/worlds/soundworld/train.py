"""Training loops for the SoundWorld models (the recipe ``recipes/soundworld_pretrain.py`` calls them).

Each loop trains on tensors already in memory (SoundWorld clips render at ~250 a second, so the
recipe synthesises its data instead of reading files), logs to a callback, and stops at
``steps`` or ``max_minutes``, whichever comes first, reporting which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

Log = Callable[[int, dict], None]


def _no_log(step: int, metrics: dict) -> None:
    return None


def _stop(step: int, steps: int, t0: float, max_minutes: float) -> bool:
    return step >= steps or (max_minutes > 0 and time.time() - t0 > 60 * max_minutes)


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled index batches (epoch by epoch)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch_size + 1, batch_size):
            yield perm[s:s + batch_size]


@dataclass
class LoopConfig:
    steps: int = field(default=1000, metadata={"help": "optimizer steps (upper bound)"})
    max_minutes: float = field(default=0.0, metadata={"help": "wall-clock cap; 0 = none"})
    batch_size: int = field(default=32, metadata={"help": "clips per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (after warmup)"})
    warmup: int = field(default=50, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})


def _optimizer(params, cfg: LoopConfig):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    return opt, sched


# ---------------------------------------------------------------- VAE
@dataclass
class VAEConfig(LoopConfig):
    kl_weight: float = field(default=1e-5, metadata={"help": "weight of the KL term (per element)"})


def train_vae(vae, mels: torch.Tensor, cfg: VAEConfig, seed: int = 0, log: Log = _no_log) -> dict:
    """Reconstruct ``mels [N, n_mels, frames]`` (L1 on a sampled latent + a small KL)."""
    gen = torch.Generator().manual_seed(seed)
    opt, sched = _optimizer(vae.parameters(), cfg)
    vae.train()
    t0, step = time.time(), 0
    bar = tqdm(total=cfg.steps, desc="vae")
    for idx in _batches(len(mels), cfg.batch_size, gen):
        if _stop(step, cfg.steps, t0, cfg.max_minutes):
            break
        x = mels[idx].unsqueeze(1)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update()
        if step % 25 == 0:
            bar.set_postfix(l1=f"{l1.item():.3f}")
            log(step, {"vae/l1": l1.item(), "vae/kl": kl.item()})
    bar.close()
    vae.eval()
    return {"steps": step, "minutes": (time.time() - t0) / 60}


def train_decoder(vae, mels: torch.Tensor, cfg: LoopConfig, seed: int = 0, log: Log = _no_log) -> dict:
    """Fine-tune only the decoder (``post_quant_conv`` + ``decoder``) to reconstruct ``mels`` from
    the frozen encoder's posterior means (L1).

    The encoder, and so the latent space a UNet was trained in, stays bit-for-bit as it was: the
    new decoder drops in under an existing UNet (Stable Diffusion's ft-EMA / ft-MSE VAEs fine-tuned
    only their decoder for the same reason). Means, not samples, because a sampler hands the
    decoder the latents it was taught to denoise toward, which are means.
    """
    latents = encode_mels(vae, mels)  # computed once, outside the graph: no gradient reaches the encoder
    gen = torch.Generator().manual_seed(seed)
    opt, sched = _optimizer([*vae.post_quant_conv.parameters(), *vae.decoder.parameters()], cfg)
    vae.decoder.train()
    t0, step, running = time.time(), 0, None
    bar = tqdm(total=cfg.steps, desc="decoder")
    for idx in _batches(len(mels), cfg.batch_size, gen):
        if _stop(step, cfg.steps, t0, cfg.max_minutes):
            break
        l1 = (vae.decode(latents[idx]).sample[:, 0] - mels[idx]).abs().mean()
        opt.zero_grad(set_to_none=True)
        l1.backward()
        opt.step()
        sched.step()
        step += 1
        running = l1.item() if running is None else 0.98 * running + 0.02 * l1.item()
        bar.update()
        if step % 25 == 0:
            bar.set_postfix(l1=f"{running:.3f}")
            log(step, {"decoder/l1": running})
    bar.close()
    vae.eval()
    return {"steps": step, "minutes": (time.time() - t0) / 60, "final_l1_ema": running,
            "stopped_by": "steps" if step >= cfg.steps else "max_minutes"}


@torch.no_grad()
def encode_mels(vae, mels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unscaled latent means ``[N, C, n_mels/2, frames/2]``."""
    return torch.cat([vae.encode(mels[s:s + batch_size].unsqueeze(1)).latent_dist.mode()
                      for s in range(0, len(mels), batch_size)])


def reconstruction_l1(vae, mels: torch.Tensor) -> float:
    """Mean |decode(encode(mel)) - mel| through the posterior means: the VAE's held-out number."""
    return (decode_latents(vae, encode_mels(vae, mels)) - mels).abs().mean().item()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unscaled latents -> ``[N, n_mels, frames]`` log-mels."""
    return torch.cat([vae.decode(latents[s:s + batch_size]).sample[:, 0] for s in range(0, len(latents), batch_size)])


# ---------------------------------------------------------------- UNet + text encoder
@dataclass
class GeneratorConfig(LoopConfig):
    cfg_dropout: float = field(default=0.1, metadata={"help": "share of captions replaced by '' (for CFG)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of UNet and text encoder (with warmup)"})
    snapshot_every: int = field(default=500, metadata={"help": "call the snapshot hook every N steps; 0 = never"})
    prediction_type: str = field(default="epsilon", metadata={
        "help": "UNet target, saved in the scheduler config: epsilon | v_prediction (v keeps weight on the "
                "noisiest steps, where a sample's layout is decided) | flow_matching (rectified flow, target "
                "eps - x0; components.build_scheduler)"})
    timestep_spacing: str = field(default="leading", metadata={
        "help": "DDIM sampling steps: leading (first step t=900 of 1000 at 10 steps) | trailing (first t=999)"})
    timestep_sampling: str = field(default="uniform", metadata={
        "help": "training timestep density: uniform | logit_normal (u = sigmoid(N(0, 1)); SD3's and "
                "TangoFlux's for rectified flow, Esser et al. 2024, arXiv:2403.03206)"})


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(captions), padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def train_generator(unet, text_encoder, tokenizer, noise_scheduler, latents: torch.Tensor, captions: list[str],
                    cfg: GeneratorConfig, seed: int = 0, log: Log = _no_log,
                    snapshot: Callable[[int, object, object], None] | None = None):
    """Denoising training of UNet and text encoder jointly on scaled ``latents``, toward the
    target of ``noise_scheduler``'s ``prediction_type``.

    Returns ``(metrics, ema_unet, ema_text)``: EMA models are what ships. ``snapshot(step,
    ema_unet, ema_text)`` is called every ``snapshot_every`` steps.
    """
    from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling

    from diffdpo.diffusion.logratios import TIMESTEP_SAMPLING, noisy_and_target, num_train_steps
    from diffdpo.diffusion.tango.position import with_time_ramp

    if cfg.timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"generator.timestep_sampling {cfg.timestep_sampling!r}: valid are {list(TIMESTEP_SAMPLING)}")

    gen = torch.Generator().manual_seed(seed)
    ids, mask = tokenize(tokenizer, captions)
    empty_ids, empty_mask = tokenize(tokenizer, [""])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt, sched = _optimizer(params, cfg)
    ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    ema_text = EMAModel(text_encoder.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    unet.train()
    text_encoder.train()
    n_train_t = num_train_steps(noise_scheduler)
    t0, step, running = time.time(), 0, None
    bar = tqdm(total=cfg.steps, desc="generator")
    for idx in _batches(len(latents), cfg.batch_size, gen):
        if _stop(step, cfg.steps, t0, cfg.max_minutes):
            break
        b_ids, b_mask = ids[idx].clone(), mask[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < cfg.cfg_dropout
        b_ids[drop] = 0
        b_mask[drop] = 0
        b_ids[drop, : empty_ids.shape[1]] = empty_ids[0]
        b_mask[drop, : empty_ids.shape[1]] = empty_mask[0]
        width = int(b_mask.sum(1).max())
        b_ids, b_mask = b_ids[:, :width], b_mask[:, :width]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.timestep_sampling == "uniform":
            step_index = torch.randint(0, n_train_t, (len(idx),), generator=gen)
        else:  # sigmoid(normal) can round to 1.0 in float32
            u = compute_density_for_timestep_sampling(cfg.timestep_sampling, len(idx), 0.0, 1.0, generator=gen)
            step_index = (u * n_train_t).long().clamp(max=n_train_t - 1)
        xt, t, target = noisy_and_target(noise_scheduler, x0, noise, step_index)
        states = text_encoder(input_ids=b_ids, attention_mask=b_mask).last_hidden_state
        pred = unet(with_time_ramp(xt, unet.config.in_channels), t, encoder_hidden_states=states,
                    encoder_attention_mask=b_mask).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
            log(step, {"generator/loss": running, "generator/steps_per_s": step / (time.time() - t0)})
        if snapshot is not None and cfg.snapshot_every and step % cfg.snapshot_every == 0:
            snapshot(step, ema_unet, ema_text)
    bar.close()
    unet.eval()
    text_encoder.eval()
    metrics = {"steps": step, "minutes": (time.time() - t0) / 60, "final_loss_ema": running,
               "stopped_by": "steps" if step >= cfg.steps else "max_minutes"}
    return metrics, ema_unet, ema_text


def copy_ema(ema, model) -> None:
    """Write EMA weights into ``model`` (in place)."""
    ema.copy_to(model.parameters())

