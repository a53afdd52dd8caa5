"""Diffusion-DPO step cost at the published denoiser sizes: seconds per step and peak memory, CPU.

Each family's published ``unet/config.json`` (``diffdpo/diffusion/published/unets/``; Tango's is
``diffdpo/diffusion/tango/published/tango_unet_config.json``) or ``transformer/config.json`` (SD3-medium,
FLUX.1-dev: ``diffdpo/diffusion/published/hub/<repo>/``) is built with random weights and trained on one
pair per step (a batch of 2: winner + loser) at the shapes the family trains on:

    sd15       512x512   -> latents 4x64x64,   CLIP-L states 77x768
    sdxl       1024x1024 -> latents 4x128x128, states 77x2048 + pooled 1280 + time ids 6
    audioldm   10.24 s   -> latents 8x256x16,  CLAP class label 512 (encoder_hidden_states=None)
    audioldm2  10.24 s   -> latents 8x256x16,  GPT-2 generated 8x768 + FLAN-T5 states Lx1024 + mask
    tango      10.24 s   -> latents 8x256x16,  FLAN-T5-large states Lx1024 + mask
    sd3        1024x1024 -> latents 16x128x128 (2x2 patches: 4096 tokens), states 154x4096 + pooled 2048
    flux       1024x1024 -> latents 16x128x128 (packed 4096x64), T5 states 77x4096 + pooled 768, guidance

SD3 / Flux are flow matching (velocity target, the published FlowMatchEulerDiscreteScheduler config) with
77 T5 tokens, the training default of diffusers' SD3 / Flux LoRA examples; SD3's 154 = 77 CLIP + 77 T5.
What fits 24 GiB: SD3-medium's 2.03B-parameter transformer with LoRA (its fp32 weights are about 7.6 GiB);
not a full fine-tune of it (weights, copy, gradients and AdamW states: about 38 GiB), and nothing of
FLUX.1-dev, whose 11.9B-parameter transformer is 44 GiB in fp32 and 22 GiB in bf16 before anything else.

The DPO step is the toolkit's own (``diffdpo.diffusion.objective.diffusion_dpo_step`` with the
reference classes of ``diffdpo.diffusion.reference`` and the loss core of ``diffdpo.losses``,
under ``accelerate`` as the trainer runs it); the SFT step is the same call with
``sft_only=True`` (winners' denoising loss only). The *floor* is plain torch doing the least any
implementation must: policy forward + backward on both halves, the reference forward under
``no_grad`` (none for cached reference errors) and the same optimizer step. Ratios DPO/floor and
SFT/floor say what the toolkit costs on top (SFT/floor is below 1: it skips the losers and the
reference).

Variants are ``<train>+<reference>[+gc][+bf16|+fp16][+adamw8bit][@side]``: train ``full``
(AdamW over every UNet weight, states included) or ``lora`` (peft rank 8 on
to_q/to_k/to_v/to_out.0, as the diffusers example); reference ``copy`` (frozen deep copy),
``lora_disabled`` (LoRA only) or ``cached`` (errors computed once, no reference forward in the
step); ``gc`` = gradient checkpointing; ``bf16``/``fp16`` = mixed precision through accelerate;
``adamw8bit`` = bitsandbytes' 8-bit AdamW; ``@512`` = another image side (SD1.5/SDXL).

After one warm-up DPO step, rounds of (DPO, floor, SFT, SFT floor) steps are timed, interleaved so
that other jobs on a shared machine weigh on every kind alike; wall and CPU seconds are both kept.
Every variant runs in a fresh interpreter so its peak RSS is its own. Memory limit:
``min(--max-gib, MemAvailable - 1 GiB)`` when the variant starts. A variant is skipped when its
static memory (weights, frozen copy, gradients, optimizer states) or that plus its probed
activations (peak-RSS rise of one forward + backward at a quarter of the latent area, in its own
process, scaled up) passes the limit; one that passes it while running is killed by the bench
(before the kernel's OOM killer picks some other process) and listed as "exceeded".

    flock /tmp/diffdpo-bench.lock .venv/bin/python bench/bench_full_size.py \\
        [--families sd15 tango] [--variants full+copy lora+lora_disabled] [--steps 2] \\
        [--family-steps sdxl=1] [--no-sft sdxl] [--budget-s 4200] [--resume] \\
        [--reduced] [--json out.json] [--md out.md]

Measured on this project's 2-core machine: ``docs/results/bench_full_size_cpu.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
UNETS = ROOT / "diffdpo" / "diffusion" / "published" / "unets"
HUB = ROOT / "diffdpo" / "diffusion" / "published" / "hub"
SD3_REPO = HUB / "stabilityai--stable-diffusion-3-medium-diffusers"
FLUX_REPO = HUB / "black-forest-labs--FLUX.1-dev"
TANGO = ROOT / "diffdpo" / "diffusion" / "tango" / "published"
TANGOFLUX = ROOT / "diffdpo" / "diffusion" / "published" / "tangoflux"
GIB = 2**30
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_RANK = 8
BETA = 5000.0  # Salesforce's published beta (SD1.5 and SDXL launchers), in the salesforce convention
TEXT_LEN = 32  # FLAN-T5 tokens of a caption (padded to the longest prompt, as Tango / AudioLDM2 do)


# ==================================================================== families


@dataclass
class Family:
    name: str
    config: Path
    unet_class: str  # attribute of diffusers, or "audioldm2" for AudioLDM2UNet2DConditionModel
    backbone: str  # class in diffdpo.diffusion.models whose predict the denoiser call uses
    latent: tuple[int, ...]
    cond_shapes: dict[str, tuple]  # per-sample shapes; "L" = the prompt's token count, ("mask", "L") = its mask
    scheduler: dict  # DDPMScheduler arguments, or a FlowMatchEulerDiscreteScheduler config (transformers)
    shapes_note: str
    reduced_latent: tuple[int, ...] = (4, 16, 16)

    @property
    def flow(self) -> bool:
        return self.unet_class.endswith("Transformer2DModel")


_SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
_AUDIOLDM_SCHEDULE = {"beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear"}

FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", UNETS / "sd15.json", "UNet2DConditionModel", "StableDiffusionBackbone", (4, 64, 64),
                   {"encoder_hidden_states": (77, 768)}, {**_SD_SCHEDULE, "prediction_type": "epsilon"},
                   "512x512 -> latents 4x64x64; CLIP-L text states 77x768"),
    "sdxl": Family("sdxl", UNETS / "sdxl.json", "UNet2DConditionModel", "StableDiffusionXLBackbone", (4, 128, 128),
                   {"encoder_hidden_states": (77, 2048), "text_embeds": (1280,), "time_ids": (6,)},
                   {**_SD_SCHEDULE, "prediction_type": "epsilon"},
                   "1024x1024 -> latents 4x128x128; text states 77x2048, pooled 1280, time ids 6"),
    "audioldm": Family("audioldm", UNETS / "audioldm.json", "UNet2DConditionModel", "AudioLDMBackbone", (8, 256, 16),
                       {"class_labels": (512,)}, {**_AUDIOLDM_SCHEDULE, "prediction_type": "epsilon"},
                       "10.24 s at 16 kHz -> mel 1024x64 -> latents 8x256x16; CLAP class label 512, "
                       "encoder_hidden_states=None", reduced_latent=(8, 32, 8)),
    "audioldm2": Family("audioldm2", UNETS / "audioldm2.json", "audioldm2", "AudioLDM2Backbone", (8, 256, 16),
                        {"encoder_hidden_states": (8, 768), "encoder_hidden_states_1": ("L", 1024),
                         "encoder_attention_mask_1": ("mask", "L")},
                        {**_AUDIOLDM_SCHEDULE, "prediction_type": "epsilon"},
                        f"10.24 s at 16 kHz -> latents 8x256x16; GPT-2 generated states 8x768 + FLAN-T5 states "
                        f"{TEXT_LEN}x1024 with mask", reduced_latent=(8, 32, 8)),
    "tango": Family("tango", TANGO / "tango_unet_config.json", "UNet2DConditionModel", "TangoBackbone", (8, 256, 16),
                    {"encoder_hidden_states": ("L", 1024), "encoder_attention_mask": ("mask", "L")},
                    {**_SD_SCHEDULE, "prediction_type": "v_prediction"},
                    f"10.24 s at 16 kHz -> latents 8x256x16 (time first); FLAN-T5-large states {TEXT_LEN}x1024 "
                    f"with mask; SD-2.1 v-prediction schedule", reduced_latent=(8, 32, 8)),
    "sd3": Family("sd3", SD3_REPO / "transformer" / "config.json", "SD3Transformer2DModel", "StableDiffusion3Backbone",
                  (16, 128, 128), {"encoder_hidden_states": (154, 4096), "pooled_projections": (2048,)},
                  json.loads((SD3_REPO / "scheduler" / "scheduler_config.json").read_text()),
                  "1024x1024 -> latents 16x128x128 (4096 tokens of 2x2 patches); states 154x4096 (77 CLIP + 77 "
                  "T5), pooled 2048; flow matching, shift 3", reduced_latent=(16, 8, 8)),
    "flux": Family("flux", FLUX_REPO / "transformer" / "config.json", "FluxTransformer2DModel", "FluxBackbone",
                   (16, 128, 128), {"encoder_hidden_states": (77, 4096), "pooled_projections": (768,)},
                   json.loads((FLUX_REPO / "scheduler" / "scheduler_config.json").read_text()),
                   "1024x1024 -> latents 16x128x128 packed to 4096x64; T5 states 77x4096, pooled 768, guidance "
                   "3.5; flow matching", reduced_latent=(16, 8, 8)),
    # TangoFlux: its transformer as its model.py builds it from config.json (derived file, published/tangoflux/);
    # sequence latents [frames, channels], not [C, H, W]; the FLAN-T5 states carry the duration token
    "tangoflux": Family("tangoflux", TANGOFLUX / "transformer_config.json", "FluxTransformer2DModel",
                        "diffdpo.diffusion.tangoflux.TangoFluxBackbone", (645, 64),
                        {"encoder_hidden_states": ("L", 1024), "encoder_attention_mask": ("mask", "L"),
                         "pooled_projections": (1024,)},
                        {"num_train_timesteps": 1000, "shift": 1.0},
                        f"30 s at 44.1 kHz stereo -> Oobleck latents 645x64 (a sequence); FLAN-T5-large states "
                        f"{TEXT_LEN}x1024 + a duration token, pooled 1024; flow matching, shift 1",
                        reduced_latent=(16, 64)),
}
IMAGE_FAMILIES = ("sd15", "sdxl", "sd3", "flux")
REDUCED_TEXT_LEN = 8


def published_config(family: str) -> dict:
    return json.loads(FAMILIES[family].config.read_text())


def reduced_config(config: dict) -> dict:
    """A tiny config of the same class: two blocks of 32/64 channels, one layer each, the same
    block kinds (mirrored), conditioning widths and embedding types; transformers: one layer (of
    each kind) and a narrow width (Flux keeps its head width, the sum of its rotary axes)."""
    if config["_class_name"] == "SD3Transformer2DModel":
        return {**config, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
                "caption_projection_dim": 16}
    if config["_class_name"] == "FluxTransformer2DModel":
        return {**config, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 1}
    c = dict(config)
    c["block_out_channels"] = [32, 64]
    c["down_block_types"] = list(config["down_block_types"][:2])
    c["up_block_types"] = list(config["up_block_types"][-2:])
    c["layers_per_block"] = 1
    c["attention_head_dim"] = 2
    c["norm_num_groups"] = 8
    if "transformer_layers_per_block" in c:
        c["transformer_layers_per_block"] = 1
    cross = config.get("cross_attention_dim")
    if isinstance(cross, list):
        # AudioLDM: per-block widths equal to the block's own (its UNet self-attends); AudioLDM2:
        # per-block lists of (None, GPT-2, T5) widths, kept.
        c["cross_attention_dim"] = [32, 64] if not isinstance(cross[0], list) else cross[:2]
    return c


def build_unet(family: str, reduced: bool = False, seed: int = 0, device=None):
    """The family's UNet class at its published config (or the reduced one), random weights."""
    import diffusers
    import torch

    spec = FAMILIES[family]
    config = published_config(family)
    if reduced:
        config = reduced_config(config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if spec.unet_class == "audioldm2":
        from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel as cls
    else:
        cls = getattr(diffusers, spec.unet_class)
    torch.manual_seed(seed)
    if device is not None and torch.device(device).type != "cpu":
        with torch.device(device):
            return cls.from_config(config)
    return cls.from_config(config)


def make_scheduler(family: str):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    spec = FAMILIES[family]
    if spec.flow:
        return FlowMatchEulerDiscreteScheduler.from_config(spec.scheduler)
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **spec.scheduler)


def condition(family: str, batch: int, reduced: bool = False, seed: int = 1, device=None,
              side: int | None = None) -> dict:
    """Random conditions of the family's shapes, ``[batch, ...]`` (masks all ones)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_text = REDUCED_TEXT_LEN if reduced else TEXT_LEN
    out = {}
    for key, shape in FAMILIES[family].cond_shapes.items():
        if shape[0] == "mask":
            out[key] = torch.ones(batch, n_text, dtype=torch.long)
            continue
        out[key] = torch.randn(batch, *[n_text if d == "L" else d for d in shape], generator=g)
    if "time_ids" in out:  # SDXL: (original size, crop top-left, target size)
        side = 32 if reduced else (side or 1024)
        out["time_ids"] = torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def latent_shape(family: str, reduced: bool = False, side: int | None = None) -> tuple[int, ...]:
    """The family's latent; ``side`` (image families) = another image resolution (the VAE
    downsamples by 8)."""
    spec = FAMILIES[family]
    if reduced:
        return spec.reduced_latent
    if side is not None:
        if family not in IMAGE_FAMILIES or side % 64:
            raise ValueError(f"{family}: an image side (multiple of 64) applies to {'/'.join(IMAGE_FAMILIES)} "
                             f"only, got {side}")
        return (spec.latent[0], side // 8, side // 8)
    return spec.latent


def backbone_shim(family: str):
    """The family's :class:`diffdpo.diffusion.models.Backbone` subclass, uninitialised: its
    ``predict`` / ``unet_kwargs`` (how the family calls its denoiser) read nothing from the instance
    but class defaults (Flux: its training guidance 3.5)."""
    import importlib

    from diffdpo.diffusion import models

    module, _, name = FAMILIES[family].backbone.rpartition(".")  # a dotted path outside models (tangoflux)
    cls = getattr(importlib.import_module(module) if module else models, name)
    return cls.__new__(cls)


def predictor(family: str) -> Callable:
    """``predict(unet, noisy, timesteps, cond)``: the family backbone's own denoiser call
    (``diffdpo.diffusion.models``: its ``predict``), without loading a pipeline."""
    return backbone_shim(family).predict


# ==================================================================== variants


@dataclass
class Variant:
    name: str
    train: str  # full | lora
    reference: str  # copy | lora_disabled | cached
    gc: bool = False
    precision: str = "no"  # no | bf16 | fp16 (accelerate's mixed_precision)
    optimizer: str = "adamw"  # adamw | adamw8bit
    side: int | None = None  # "@768": image side other than the family's own

    @property
    def base(self) -> str:
        return self.name.split("@")[0]

    @classmethod
    def parse(cls, name: str) -> "Variant":
        side = None
        if "@" in name:
            side = int(name.split("@")[1])
        parts = name.split("@")[0].split("+")
        if len(parts) < 2 or parts[0] not in ("full", "lora") or parts[1] not in ("copy", "lora_disabled", "cached"):
            raise ValueError(f"variant {name!r}: expected <full|lora>+<copy|lora_disabled|cached>[+gc][+bf16|+fp16]"
                             f"[+adamw8bit][@image_side]")
        v = cls(name, parts[0], parts[1], side=side)
        for flag in parts[2:]:
            if flag == "gc":
                v.gc = True
            elif flag in ("bf16", "fp16"):
                v.precision = flag
            elif flag == "adamw8bit":
                v.optimizer = flag
            else:
                raise ValueError(f"variant {name!r}: unknown flag {flag!r}")
        if v.reference == "lora_disabled" and v.train != "lora":
            raise ValueError(f"variant {name!r}: lora_disabled needs lora")
        return v


ALL_VARIANTS = ["full+copy", "full+copy+gc", "full+cached", "full+cached+gc", "lora+copy", "lora+lora_disabled",
                "lora+cached", "lora+lora_disabled+gc", "lora+lora_disabled+bf16", "lora+lora_disabled+fp16",
                "lora+lora_disabled+adamw8bit", "full+cached+gc+adamw8bit", "full+copy+bf16"]
# What the default full-size run measures, in this order (the most wanted first, so a time budget
# cuts the least wanted): about an hour on 2 cores, see docs/results/bench_full_size_cpu.md.
DEFAULT_PLAN: list[tuple[str, str]] = [
    ("tango", "lora+copy"), ("tango", "lora+lora_disabled"), ("sd15", "lora+copy"), ("sd15", "lora+lora_disabled"),
    ("tango", "full+copy"), ("sd15", "full+copy"), ("tango", "full+copy+gc"), ("sdxl", "full+copy"),
    ("sdxl", "lora+lora_disabled+gc"), ("sdxl", "lora+lora_disabled+gc@768"), ("sdxl", "lora+lora_disabled+gc@512"),
    ("audioldm", "full+copy"), ("audioldm", "lora+copy"), ("audioldm", "lora+lora_disabled"),
    ("audioldm2", "full+copy"), ("audioldm2", "full+cached"), ("audioldm2", "lora+lora_disabled"),
    ("audioldm2", "full+copy+gc"),
    ("tango", "full+cached+gc"), ("tango", "full+cached+gc+adamw8bit"), ("tango", "full+copy+gc+adamw8bit"),
    ("tango", "lora+lora_disabled+gc"), ("tango", "lora+lora_disabled+bf16"), ("tango", "lora+cached"),
    ("sd15", "lora+lora_disabled+fp16"), ("sd15", "lora+lora_disabled+bf16"), ("sd15", "lora+lora_disabled+gc"),
    ("sd15", "full+cached+gc+adamw8bit"), ("sd15", "lora+cached"), ("sd15", "lora+lora_disabled+adamw8bit"),
    ("sd3", "lora+lora_disabled+gc"), ("sd3", "lora+lora_disabled+gc@768"), ("sd3", "lora+lora_disabled+gc@512"),
    ("sd3", "full+copy"), ("flux", "lora+lora_disabled+gc"),
    ("tangoflux", "full+copy"), ("tangoflux", "lora+lora_disabled"), ("tangoflux", "lora+lora_disabled+gc"),
]


def unsupported_reason(family: str, v: Variant) -> str | None:
    """Why the toolkit cannot train a variant of a family at all (None when it can)."""
    if v.side and family not in IMAGE_FAMILIES:
        return f"an image side (@{v.side}) applies to image families only ({', '.join(IMAGE_FAMILIES)})"
    if v.gc and FAMILIES[family].unet_class == "audioldm2":
        return ("diffusers' AudioLDM2UNet2DConditionModel breaks under gradient checkpointing: its checkpointed "
                "branch passes the Transformer2DModel arguments by position without added_cond_kwargs, so the "
                "cross-attention mask lands in attention_mask (a shape error; modeling_audioldm2.py, diffusers 0.42.1)")
    if v.train == "lora" and FAMILIES[family].unet_class == "audioldm2":
        from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

        if not hasattr(AudioLDM2UNet2DConditionModel, "add_adapter"):
            return ("AudioLDM2UNet2DConditionModel has no add_adapter (diffusers' PeftAdapterMixin is not among "
                    "its bases), and diffdpo's trainer adds LoRA with unet.add_adapter")
    return None


def gpu_only_reason(v: Variant) -> str | None:
    """Why a variant cannot run on this CPU (None when it can)."""
    if v.precision == "fp16":
        return ("GPU only: accelerate's fp16 on a CPU sets native_amp=False and its autocast does nothing, "
                "so the step would run in fp32")
    if v.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed here (not a diffdpo dependency); GPU only as far as this run shows"
    return None


# ==================================================================== memory prediction


def param_count(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


def static_gib(params: int, lora_params: int, v: Variant, base_gib: float = 0.77) -> float:
    """What a variant holds whatever the activations: the interpreter and libraries (``base_gib``,
    measured after imports), fp32 weights, the frozen copy (cast to the mixed-precision dtype, as
    the trainer does), gradients and optimizer states of what trains (AdamW: two fp32 states;
    8-bit AdamW: two uint8 states)."""
    w = 4 * params
    total = w
    if v.reference == "copy":
        total += w // 2 if v.precision in ("bf16", "fp16") else w
    trainable = params if v.train == "full" else lora_params
    total += trainable * (4 + (2 if v.optimizer == "adamw8bit" else 8))
    if v.train == "full" and v.reference == "cached":
        total = max(total, 2 * w)  # the copy that computes the cache at setup
    return base_gib + total / GIB


def count_params(family: str) -> dict:
    """Parameters of the published UNet and of its rank-8 LoRA, counted on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        unet = build_unet(family)
    lora = sum(LORA_RANK * (m.in_features + m.out_features) for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in LORA_TARGETS))
    return {"params": param_count(unet), "lora": lora}


def probe_kind(v: Variant) -> str:
    """Activation memory depends on what trains (frozen linears save less), checkpointing and precision."""
    return f"{v.train}{'+gc' if v.gc else ''}{'+' + v.precision if v.precision != 'no' else ''}"


def activation_probe(family: str, kind: str, area_fraction: float = 0.25) -> dict:
    """Activation bytes of one policy forward + backward on a pair (batch 2) at ``area_fraction``
    of the latent area, from the rise of peak RSS in a fresh process (run it in a child), scaled
    to the full area: what the step holds beyond weights, gradients and optimizer states. The
    saved tensors of these UNets (convolutions, norms, flash attention on the CPU) grow linearly
    with the latent area."""
    import torch
    from peft import LoraConfig

    train, *flags = kind.split("+")
    shape = latent_shape(family)
    if len(shape) == 2:  # tangoflux: a sequence [frames, channels]; the probe shortens the sequence
        (h, c), w = shape, 1
        ph, pw = max(8, int(round(h * area_fraction))), 1
        probe = (ph, c)
    else:
        c, h, w = shape
        scale = area_fraction ** 0.5
        ph, pw = max(8, int(round(h * scale / 8)) * 8), max(8, int(round(w * scale / 8)) * 8)
        probe = (c, ph, pw)
    unet = build_unet(family).train()
    if train == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    if "gc" in flags:
        unet.enable_gradient_checkpointing()
    x = torch.randn(2, *probe)
    cond = condition(family, 2)
    predict = predictor(family)
    grads = sum(p.numel() * 4 for p in unet.parameters() if p.requires_grad)
    sampler = PeakSampler()
    sampler.reset()
    before = sampler.rss()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in flags)
    with amp:
        out = predict(unet, x, torch.tensor([500, 500]), cond)
    out.float().pow(2).mean().backward()
    time.sleep(0.05)
    sampler.stop()
    act = max(0, sampler.peak - before - grads)
    return {"act_bytes": int(act * (h * w) / (ph * pw)), "probe_latent": list(probe),
            "params": param_count(unet), "trainable": sum(p.numel() for p in unet.parameters() if p.requires_grad)}


# ==================================================================== the measurement


class PeakSampler:
    """Current RSS sampled every 20 ms, so each phase's own peak is known (ru_maxrss is a
    process-wide maximum)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def reset(self) -> None:
        self.peak = self.rss()

    def stop(self) -> None:
        self._stop.set()


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _snapshot(unet) -> dict:
    """Copies of four trainable tensors (first, two middle, last): enough to see a step move them."""
    named = [(k, p) for k, p in unet.named_parameters() if p.requires_grad]
    picks = {named[i][0]: named[i][1].detach().clone()
             for i in sorted({0, len(named) // 3, 2 * len(named) // 3, len(named) - 1})}
    return picks


def measure(family: str, variant: str, steps: int = 2, warmup: int = 1, reduced: bool = False, device: str = "cpu",
            floor_steps: int | None = None, sft_steps: int | None = None, seed: int = 0,
            peak_fn: Callable[[], float] | None = None) -> dict:
    """One variant: DPO steps (``warmup`` + ``steps`` timed), then the floor and SFT steps
    (``steps`` timed each, no warm-up: the process is warm by then). Returns seconds, ratios,
    parameter counts and (via ``peak_fn``, or RSS on a CPU) the peak memory of the DPO phase."""
    import torch

    v = Variant.parse(variant)
    if unsupported_reason(family, v):
        raise ValueError(f"{family} {variant}: {unsupported_reason(family, v)}")
    threads = torch.get_num_threads()
    if reduced and not torch.device(device).type == "cuda":
        # tiny ops: with other processes on the cores, OpenMP threads spin at every barrier waiting for
        # a preempted sibling, and a step of a tiny UNet takes seconds instead of milliseconds
        torch.set_num_threads(1)
    # Subnormal floats take x86's slow path (tens of times slower per operation). At random weights a huge
    # Diffusion-DPO beta saturates the sigmoid after a step, and the backward pass then carries subnormal
    # gradients: measured on TangoFlux full+copy, one DPO step took 432 s against 32 s for the next (whose
    # loss was exactly 0). Flushing them to zero times the step's arithmetic, not the slow path.
    flushed = device == "cpu" and torch.set_flush_denormal(True)
    try:
        return _measure(family, v, steps, warmup, reduced, device, floor_steps, sft_steps, seed, peak_fn)
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)


def _measure(family, v, steps, warmup, reduced, device, floor_steps, sft_steps, seed, peak_fn) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft import LoraConfig

    from diffdpo.diffusion.encode import repeat_for_pair
    from diffdpo.diffusion.logratios import draw_pairs, pair_errors, pair_inputs, pair_seed
    from diffdpo.diffusion.objective import diffusion_dpo_step
    from diffdpo.diffusion.reference import (CachedReference, FrozenCopyReference, LoraDisabledReference,
                                             adapters_disabled, compute_reference_errors)
    from diffdpo.diffusion.trainer import TrainConfig, make_optimizer
    from diffdpo.losses import diffusion_beta

    variant = v.name
    floor_steps = steps if floor_steps is None else floor_steps
    sft_steps = steps if sft_steps is None else sft_steps
    is_cuda = torch.device(device).type == "cuda"
    sampler = None if is_cuda else PeakSampler()
    t_setup = time.perf_counter()

    AcceleratorState._reset_state(reset_partial_state=True)  # several variants may share one process (gpu_check)
    accelerator = Accelerator(mixed_precision=v.precision, cpu=not is_cuda)
    unet = build_unet(family, reduced, seed, device=device).to(device).train()
    params = param_count(unet)
    if v.train == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    lora_params = sum(p.numel() for p in unet.parameters() if p.requires_grad) if v.train == "lora" else 0
    if v.gc:
        unet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(v.precision, torch.float32)
    attn = sorted({type(p).__name__ for p in unet.attn_processors.values()})

    scheduler = make_scheduler(family)
    predict = predictor(family)
    shape = latent_shape(family, reduced, v.side)
    g = torch.Generator().manual_seed(seed + 7)
    w_lat = torch.randn(1, *shape, generator=g).to(device)
    l_lat = torch.randn(1, *shape, generator=g).to(device)
    cond = condition(family, 1, reduced, device=device, side=v.side)
    indices = [0]
    draws = draw_pairs([pair_seed(seed, 0, None)], shape, 1000, 0.0, device=device)

    # ---- reference, as diffdpo.diffusion.trainer builds it
    if v.reference == "copy":
        reference = FrozenCopyReference(unet, weight_dtype)
    elif v.reference == "lora_disabled":
        reference = LoraDisabledReference(unet)
    else:
        ref_unet = FrozenCopyReference(unet).unet if v.train == "full" else None

        @torch.no_grad()
        def errors_of(idx):
            inputs = pair_inputs(scheduler, w_lat, l_lat, draws)
            if ref_unet is not None:
                return pair_errors(lambda x, t, c: predict(ref_unet, x, t, c), inputs, repeat_for_pair(cond))
            with adapters_disabled(unet):
                return pair_errors(lambda x, t, c: predict(unet, x, t, c), inputs, repeat_for_pair(cond))

        with tempfile.TemporaryDirectory() as tmp:
            table = compute_reference_errors(Path(tmp) / "reference.safetensors", 1, 1, errors_of)
        reference = CachedReference(table.to(device))
        del ref_unet

    optimizer = make_optimizer([p for p in unet.parameters() if p.requires_grad],
                               TrainConfig(optimizer=v.optimizer), lr=1e-5)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    beta = diffusion_beta(BETA, "salesforce")
    setup_s = time.perf_counter() - t_setup

    def dpo_step(sft_only: bool = False):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with accelerator.autocast():
            out = diffusion_dpo_step(predict, unet, reference, scheduler, w_lat, l_lat, cond, draws, indices,
                                     "sigmoid", beta, sft_only=sft_only)
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0, out

    # plain-torch inputs of the floor (the noising is part of neither timing); it calls the denoiser
    # as the family does (predict: Flux packs latents), with nothing of the toolkit's DPO step around it
    inputs = pair_inputs(scheduler, w_lat, l_lat, draws)
    cond2 = repeat_for_pair(cond)
    ref_module = reference.unet if v.reference == "copy" else None
    amp = dict(device_type=torch.device(device).type, dtype=weight_dtype, enabled=v.precision == "bf16" or
               (v.precision == "fp16" and is_cuda))

    def floor_step(winner_only: bool = False):
        n = 1 if winner_only else 2
        x, t, target = inputs.noisy[:n], inputs.timesteps[:n], inputs.target[:n]
        c = {k: val[:n] for k, val in cond2.items()}
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(**amp):
            pred = predict(unet, x, t, c)
            loss = (pred.float() - target.float()).pow(2).mean()
            if not winner_only and v.reference != "cached":
                with torch.no_grad():
                    if ref_module is not None:
                        predict(ref_module, x, t, c)
                    else:
                        unet.disable_adapters()
                        try:
                            predict(unet, x, t, c)
                        finally:
                            unet.enable_adapters()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    before = _snapshot(unet)
    # Warm-up DPO steps, then rounds of (DPO, floor, SFT, SFT floor): what else runs on the machine
    # then weighs on every kind of step alike. The DPO phase's peak memory is read before any floor
    # step has run (a fresh process: its own).
    if sampler:
        sampler.reset()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = {"dpo": [], "floor": [], "sft": [], "sft_floor": []}
    cpu = {k: [] for k in times}
    losses = []
    change = None
    dpo_peak = floor_peak = None
    rss_max = None
    for i in range(warmup + max(steps, floor_steps, sft_steps)):
        if i < warmup + steps:
            dt, ct, out = dpo_step()
            losses.append(out.loss.item())
            if i >= warmup:
                times["dpo"].append(dt)
                cpu["dpo"].append(ct)
        if i < warmup:
            continue
        if change is None:  # after the warm-up and the first timed DPO step
            after = {k: p.detach() for k, p in unet.named_parameters() if k in before}
            change = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
            dpo_peak = peak_fn() if peak_fn else (torch.cuda.max_memory_allocated() if is_cuda else sampler.peak)
            rss_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if sampler:
                sampler.reset()
        r = i - warmup
        if r < floor_steps:
            dt, ct = floor_step()
            times["floor"].append(dt)
            cpu["floor"].append(ct)
            floor_peak = None if is_cuda else max(floor_peak or 0, sampler.peak)
        if r < sft_steps:
            dt, ct, _ = dpo_step(sft_only=True)
            times["sft"].append(dt)
            cpu["sft"].append(ct)
            dt, ct = floor_step(winner_only=True)
            times["sft_floor"].append(dt)
            cpu["sft_floor"].append(ct)
    if change is None:  # no timed step at all
        after = {k: p.detach() for k, p in unet.named_parameters() if k in before}
        change = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
        dpo_peak = peak_fn() if peak_fn else (torch.cuda.max_memory_allocated() if is_cuda else sampler.peak)
    if sampler:
        sampler.stop()

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    def ratio(a, b):
        return a / b if a and b else None

    dpo_s, floor_s, sft_s, sft_floor_s = (mean(times[k]) for k in ("dpo", "floor", "sft", "sft_floor"))
    dpo_c, floor_c, sft_c = (mean(cpu[k]) for k in ("dpo", "floor", "sft"))
    return {
        "family": family, "variant": variant, "status": "ok", "device": device, "reduced": reduced,
        "latent": list(shape), "params": params, "trainable_params": lora_params if v.train == "lora" else params,
        "attention_processors": attn, "setup_s": setup_s,
        "dpo_step_s": dpo_s, "sft_step_s": sft_s, "floor_step_s": floor_s, "sft_floor_step_s": sft_floor_s,
        "dpo_over_floor": ratio(dpo_s, floor_s), "sft_over_floor": ratio(sft_s, floor_s),
        "sft_over_sft_floor": ratio(sft_s, sft_floor_s),
        "dpo_over_floor_cpu": ratio(dpo_c, floor_c), "sft_over_floor_cpu": ratio(sft_c, floor_c),
        "step_times_s": times, "step_cpu_s": cpu,
        "samples_per_s": 2 / dpo_s if dpo_s else None,
        "peak_dpo_bytes": int(dpo_peak), "peak_dpo_gib": dpo_peak / GIB,
        "peak_floor_gib": floor_peak / GIB if floor_peak else None,
        "ru_maxrss_after_dpo_gib": rss_max / GIB if rss_max and not is_cuda else None,
        "losses": losses, "param_change_after_dpo": change,
        "timed_steps": {"warmup": warmup, **{k: len(x) for k, x in times.items()}},
    }


# ==================================================================== driver


def child(args: list[str]) -> None:
    spec = json.loads(args[0])
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.manual_seed(0)
    base = PeakSampler().rss()
    result = measure(**spec)
    result["rss_after_imports_gib"] = base / GIB
    print("BENCH " + json.dumps(result))


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError):
        return 0


def run_child(argv: list[str], tag: str, limit_bytes: int | None = None) -> tuple[str, str, dict]:
    """Run ``bench_full_size.py <argv>`` in a fresh interpreter; kill it (SIGKILL) when its RSS
    passes ``limit_bytes``, before the machine's OOM killer picks some other process on a
    shared machine. Returns ``(status, stderr_tail, {peak_rss_seen, killed_at_s})``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    out_path = Path(tempfile.mkstemp(prefix="bench_full_size_", suffix=".out")[1])
    err_path = out_path.with_suffix(".err")
    started, seen, killed = time.time(), 0, None
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=out, stderr=err, env=env)
        while proc.poll() is None:
            rss = _rss_of(proc.pid)
            seen = max(seen, rss)
            if limit_bytes and rss > limit_bytes and killed is None:
                proc.kill()
                killed = time.time() - started
            time.sleep(0.25)
    text, err_text = out_path.read_text(), err_path.read_text()
    out_path.unlink(missing_ok=True)
    err_path.unlink(missing_ok=True)
    info = {"peak_rss_seen_gib": seen / GIB, "killed_at_s": killed}
    line = [x for x in text.splitlines() if x.startswith(tag)]
    if killed is not None:
        return "exceeded", err_text[-800:], info
    if proc.returncode or not line:
        return f"exit {proc.returncode}", err_text[-1500:], info
    return line[0][len(tag):], "", info


def probe_child(args: list[str]) -> None:
    print("PROBE " + json.dumps(activation_probe(args[0], args[1])))


def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    head = ("| family | variant | DPO s/step | floor s/step | DPO/floor (wall; CPU time) | SFT s/step | SFT/floor | "
            "peak RSS GiB (DPO) | predicted GiB | status |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if r["status"] == "ok":
            lines.append(f"| {r['family']} | {r['variant']} | {fmt(r['dpo_step_s'])} | {fmt(r['floor_step_s'])} | "
                         f"{fmt(r['dpo_over_floor'], '.2f')}; {fmt(r.get('dpo_over_floor_cpu'), '.2f')} | "
                         f"{fmt(r['sft_step_s'])} | {fmt(r['sft_over_floor'], '.2f')} | "
                         f"{fmt(r['peak_dpo_gib'], '.2f')} | {fmt(r.get('predicted_gib'), '.1f')} | ok |")
        else:
            lines.append(f"| {r['family']} | {r['variant']} | - | - | - | - | - | - | "
                         f"{fmt(r.get('predicted_gib') or r.get('static_gib'), '.1f')} | {r['status']}: "
                         f"{r.get('reason', '')[:220]} |")
    return "\n".join(lines)


def lora_disabled_vs_copy(results: list[dict]) -> dict:
    """Peak memory of the LoRA-disabled reference over the frozen copy's, per family (same flags)."""
    out = {}
    ok = {(r["family"], r["variant"]): r for r in results if r["status"] == "ok"}
    for (fam, name), r in ok.items():
        if "+lora_disabled" in name:
            twin = ok.get((fam, name.replace("+lora_disabled", "+copy")))
            if twin:
                out[f"{fam}:{name}"] = {"peak_ratio": r["peak_dpo_gib"] / twin["peak_dpo_gib"],
                                        "step_time_ratio": r["dpo_step_s"] / twin["dpo_step_s"],
                                        "vs": twin["variant"]}
    return out


def machine() -> dict:
    import diffusers
    import peft
    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        info["cpu_model"] = [x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")][0]
        info["mem_total_gib"] = int(open("/proc/meminfo").readline().split()[1]) * 1024 / GIB
    except (OSError, IndexError):
        pass
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1:])
    if argv and argv[0] == "--probe":
        return probe_child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"variant names (default: each family's plan, DEFAULT_PLAN); known: {ALL_VARIANTS}")
    parser.add_argument("--steps", type=int, default=2, help="timed DPO steps after one warm-up (also floor/SFT steps)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--family-steps", nargs="*", default=[], metavar="FAMILY=N",
                        help="timed steps for one family (e.g. sdxl=1: one SDXL step takes minutes here)")
    parser.add_argument("--no-sft", nargs="*", default=[], metavar="FAMILY",
                        help="families whose SFT and SFT-floor steps are not timed (time budget)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the measured rows of an existing --json file and run only the others")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no variant after this many seconds (the rest are listed as skipped)")
    parser.add_argument("--reduced", action="store_true", help="tiny configs of the same classes (tests)")
    parser.add_argument("--max-gib", type=float, default=22.0, help="skip variants predicted above this peak")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None, help="also write the table as markdown here")
    args = parser.parse_args(argv)
    started = time.time()
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, "bench/bench_full_size.py", *argv]),
              "machine": machine(), "reduced": args.reduced, "steps": args.steps, "warmup": args.warmup,
              "pairs_per_step": 1, "shapes": {f: FAMILIES[f].shapes_note for f in args.families},
              "lora": {"rank": LORA_RANK, "alpha": LORA_RANK, "targets": LORA_TARGETS}, "beta_salesforce": BETA,
              "max_gib": args.max_gib, "probes": {}, "results": []}
    done = {}
    if args.resume and args.json and args.json.is_file():
        old = json.loads(args.json.read_text())
        done = {(r["family"], r["variant"]): r for r in old["results"] if r["status"] == "ok"}
        report["probes"] = old.get("probes", {})
        report["resumed_from"] = {"date": old["date"], "rows": len(done)}
    family_steps = {k: int(n) for k, n in (x.split("=") for x in args.family_steps)}
    plan = ([(f, n) for f in args.families for n in args.variants] if args.variants
            else [(f, n) for f, n in DEFAULT_PLAN if f in args.families])
    fitted: dict[tuple[str, str], int] = {}  # (family, variant without @side) -> the largest side that fit

    def save():
        if args.json:  # written as the run goes: a long run keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))

    def add(row: dict, status: str, reason: str = "") -> None:
        report["results"].append({**row, "status": status, "reason": reason})
        print(f"{row['family']:9s} {row['variant']:34s} {status}: {reason}", flush=True)
        save()

    for family, name in plan:
        v = Variant.parse(name)
        row = {"family": family, "variant": name}
        if (family, name) in done:
            report["results"].append(done[(family, name)])
            if v.side:
                fitted[(family, v.base)] = max(v.side, fitted.get((family, v.base), 0))
            print(f"{family:9s} {name:34s} kept from {args.json}", flush=True)
            continue
        if v.side and fitted.get((family, v.base), 0) > v.side:  # a smaller side says nothing more
            add(row, "skipped", f"a larger image side ({fitted[(family, v.base)]}) fit")
            continue
        if args.budget_s is not None and time.time() - started > args.budget_s:
            add(row, "skipped", f"time budget ({args.budget_s:.0f} s) spent")
            continue
        reason = unsupported_reason(family, v)
        if reason:
            add(row, "unsupported", reason)
            continue
        reason = gpu_only_reason(v)
        if reason:
            add(row, "GPU only" if reason.startswith("GPU") else "not run", reason)
            continue
        limit = None
        if not args.reduced:
            # the limit: --max-gib, or what the machine has free now (it is shared), less 1 GiB
            limit = min(args.max_gib * GIB, mem_available() - GIB)
            row["limit_gib"] = limit / GIB
            fam_params = report["probes"].get(f"{family}:params")
            if fam_params is None:
                fam_params = report["probes"][f"{family}:params"] = count_params(family)
            static = static_gib(fam_params["params"], fam_params["lora"], v)
            row["static_gib"] = static
            if static * GIB > limit:
                add(row, "skipped", f"static memory alone (weights, copy, grads, optimizer states) {static:.1f} GiB "
                                    f"> limit {limit / GIB:.1f} GiB")
                continue
            key = f"{family}:{probe_kind(v)}"  # at the family's own size; other image sides scale by area
            if key not in report["probes"]:
                status, err, _ = run_child(["--probe", family, probe_kind(v)], "PROBE ", limit)
                if status == "exceeded" or status.startswith("exit"):
                    add(row, "skipped", f"the activation probe at a quarter of the area already passed the limit "
                                        f"({status})")
                    continue
                report["probes"][key] = json.loads(status)
            act = report["probes"][key]["act_bytes"]
            if v.side:
                full = FAMILIES[family].latent
                act = act * (v.side // 8) ** 2 / (full[1] * full[2])
            row["predicted_gib"] = static + act / GIB
            if row["predicted_gib"] * GIB > limit:
                add(row, "skipped", f"predicted peak {row['predicted_gib']:.1f} GiB (static {static:.1f} + "
                                    f"activations {act / GIB:.1f}) > limit {limit / GIB:.1f} GiB")
                continue
        steps = family_steps.get(family, args.steps)
        spec = {"family": family, "variant": name, "steps": steps, "warmup": args.warmup,
                "reduced": args.reduced, "sft_steps": 0 if family in args.no_sft else steps}
        t0 = time.time()
        load0 = os.getloadavg()[0]
        status, err, info = run_child(["--child", json.dumps(spec)], "BENCH ", int(limit) if limit else None)
        if status == "exceeded":
            add({**row, **info}, "exceeded", f"RSS passed the limit {limit / GIB:.1f} GiB after "
                                             f"{info['killed_at_s']:.0f} s; killed by the bench")
            continue
        if status.startswith("exit"):
            add({**row, **info}, "failed", f"{status}: {err}")
            continue
        res = {**json.loads(status), **{k: x for k, x in row.items() if k not in ("family", "variant")}, **info}
        res["wall_s"] = time.time() - t0
        res["loadavg_1min"] = [load0, os.getloadavg()[0]]
        report["results"].append(res)
        if v.side:
            fitted[(family, v.base)] = max(v.side, fitted.get((family, v.base), 0))
        print(f"{family:9s} {name:34s} DPO {res['dpo_step_s']:8.2f}s  floor {res['floor_step_s']:8.2f}s  "
              f"x{res['dpo_over_floor']:.3f} (cpu x{res['dpo_over_floor_cpu']:.3f})  SFT {fmt(res['sft_step_s'], '.2f')}s"
              f"  peak {res['peak_dpo_gib']:6.2f} GiB  ({res['wall_s']:.0f}s wall, load {load0:.1f})", flush=True)
        save()
    report["lora_disabled_vs_copy"] = lora_disabled_vs_copy(report["results"])
    report["total_wall_s"] = time.time() - started
    md = table(report["results"])
    print("\n" + md)
    for k, r in report["lora_disabled_vs_copy"].items():
        print(f"  {k}: peak x{r['peak_ratio']:.3f} of {r['vs']}, step time x{r['step_time_ratio']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md + "\n")
    return report


if __name__ == "__main__":
    main()
