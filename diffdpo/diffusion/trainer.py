"""Diffusion-DPO fine-tuning of a text-to-audio or text-to-image diffusion model on preference pairs.

    python recipes/diffusion_dpo.py --config recipes/configs/tango2_dpo.yaml [key.sub=value ...] [--resume]
    diffdpo train --config recipes/configs/tango2_dpo.yaml ...            # the same, installed
    accelerate launch recipes/diffusion_dpo.py --config recipes/configs/sd15_dpo.yaml

Families: tango (Tango-shaped folder, docs/model_layout.md), audioldm, audioldm2, sd15, sdxl,
sd3, flux, tangoflux (flow-matching transformers: Flow-DPO, the same loss on velocity errors).
Top to bottom:

1. load the backbone (hub id or local folder; offline without a copy it stops at once, saying
   what to download); freeze text encoder(s) and VAE (float32); LoRA via peft (``model.lora_rank``)
   or full fine-tuning; gradient checkpointing on request;
2. read and check every pair (ties dropped by default; bad records raise or are skipped and
   counted); encode VAE latents and prompt conditions once into a cache (``train.cache_latents``);
3. reference: frozen copy, LoRA-disabled policy, or errors cached under fixed per-pair draws;
4. each micro-batch: per-pair noise, timestep and prompt dropout from ``pair_seed`` (shared by
   winner and loser, identical whichever process holds the pair), policy and reference errors,
   log-ratios -> ``diffdpo.losses.preference_loss``; the first ``loss.sft_epochs`` epochs train the
   winners' denoising loss only (every process derives the epoch from the step counter);
   ``Accelerator.accumulate`` divides by the accumulation steps, DDP averages over processes, so
   the update is the mean over every pair of the optimizer step;
5. log loss, implicit accuracy (overall and per timestep bucket), reward margins, policy and
   reference MSE of winners and losers, lr (accelerate trackers, TensorBoard by default);
   sample fixed validation prompts every ``validation.every`` steps;
6. checkpoint atomically every ``train.save_every`` steps (trainable weights, optimizer, lr
   scheduler, RNG, step — the data position is a function of the step); ``--resume`` continues
   bit-identically; at the end save a diffusers folder (full FT) or LoRA weights
   (``pipe.load_lora_weights``) under ``<output_dir>/final``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffdpo.config import load_config, save_config, to_dict
from diffdpo.losses import diffusion_beta, loss_spec, required_inputs

log = logging.getLogger("diffusion_dpo")


# ==================================================================== config


@dataclass
class ModelConfig:
    family: str = field(default="sd15", metadata={
        "help": "tango | audioldm | audioldm2 | sd15 | sdxl | sd3 | flux | tangoflux"})
    name_or_path: str = field(default="", metadata={"help": "hub id or local folder"})
    tiny: bool = field(default=False, metadata={"help": "build a tiny random model of the family's real classes "
                                                        "at name_or_path first (tests, CPU smoke runs)"})
    resolution: int = field(default=512, metadata={"help": "image side (images are resized and centre-cropped)"})
    audio_seconds: float = field(default=10.0, metadata={"help": "clip length (audio is cropped / zero-padded)"})
    lora_rank: int = field(default=0, metadata={"help": "0 = full fine-tuning of the UNet"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default = rank)"})
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={
        "help": "module names LoRA wraps (SD3 / Flux configs add the text stream's add_q/k/v_proj, to_add_out)"})
    guidance: float = field(default=3.5, metadata={
        "help": "flux: the guidance value a guidance-distilled transformer (FLUX.1-dev) is fed in training "
                "(diffusers train_dreambooth_lora_flux.py --guidance_scale, default 3.5)"})
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    source: str = field(default="jsonl", metadata={
        "help": "jsonl | pickapic | audio_alpaca | toy | feedback (unpaired thumbs-up/down: <path>/feedback.jsonl)"})
    path: str = field(default="", metadata={"help": "set folder / Parquet file(s); for toy: where to write it"})
    toy_pairs: int = field(default=16, metadata={"help": "pairs written when source=toy"})
    ties: str = field(default="drop", metadata={"help": "label-0.5 pairs: drop (paper) | error"})
    on_bad_record: str = field(default="error", metadata={"help": "error | skip (counted and logged)"})
    max_pairs: int | None = field(default=None, metadata={"help": "read at most this many pairs (samples if unpaired)"})
    won_and_lost: str = field(default="desirable", metadata={
        "help": "unpaired loss on pairs: a sample that wins one pair and loses another is desirable "
                "(Diffusion-KTO's published policy) | undesirable | drop"})
    desirable_fraction: float | None = field(default=None, metadata={
        "help": "unpaired loss: draw samples with replacement so this share is desirable (Diffusion-KTO's "
                "--positive_ratio, 0.8 published); none = each sample once per epoch"})


@dataclass
class LossConfig:
    type: str = field(default="sigmoid", metadata={"help": "any loss type of diffdpo.losses, or logic:<structure> "
                                                                "over log-ratios (diffdpo losses compile)"})
    beta: float = field(default=5000.0, metadata={"help": "beta as published, in beta_convention"})
    beta_convention: str = field(default="salesforce", metadata={
        "help": "salesforce | tango2: the -0.5*beta form (Salesforce train.py, Tango 2, and the diffusers SDXL "
                "example train_diffusion_dpo_sdxl.py, beta 5000); diffusers: the diffusers SD1.5 example "
                "train_diffusion_dpo.py, beta*(ref_diff - model_diff), beta 2500 (= salesforce 5000); "
                "tangoflux: TangoFlux CRPO's -0.5*beta form (beta 2000, with sft_weight 1); core: diffdpo's own, "
                "required by unpaired and reference-free losses (kto, mapo), whose beta is their own"})
    sft_weight: float = field(default=0.0, metadata={"help": "weight of the winners' denoising loss (CRPO)"})
    sft_epochs: int = field(default=0, metadata={"help": "first epochs train the winners' loss only (Tango 2: 1)"})
    options: dict = field(default_factory=dict, metadata={"help": "loss-type options, e.g. label_smoothing"})
    guidance_scale: float = field(default=1.0, metadata={
        "help": "errors of the classifier-free-guided prediction u + g*(c - u), policy and reference alike "
                "(1 = the conditional prediction, as published; costs a second forward per sample)"})

    def core_beta(self) -> float:
        return diffusion_beta(self.beta, self.beta_convention)


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)
    every: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/diffusion_dpo"
    seed: int = 0
    per_device_batch: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    scale_lr: bool = field(default=False, metadata={"help": "lr *= per_device_batch * grad_accum * processes"})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "diffusers get_scheduler name"})
    warmup_steps: int = 0
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides epochs)"})
    epochs: int = 1
    max_grad_norm: float | None = None
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adamw8bit (bitsandbytes) | adafactor | sgd"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (the VAE stays fp32)"})
    proportion_empty_prompts: float = field(default=0.0, metadata={"help": "CFG prompt dropout, per pair"})
    fixed_draws: bool = field(default=False, metadata={"help": "same noise/timestep for a pair every epoch"})
    timestep_range: list[float] = field(default_factory=lambda: [0.0, 1.0], metadata={
        "help": "fraction of the training timestep indices pairs are drawn from "
                "(DDPM-style schedules: [0.5, 1.0] = the noisier half; flow matching: [0.0, 0.5])"})
    timestep_sampling: str = field(default="uniform", metadata={
        "help": "uniform | logit_normal: u = sigmoid(N(logit_mean, logit_std)) over that range (SD3, TangoFlux)"})
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cache_latents: bool = True
    cache_dir: str | None = field(default=None, metadata={"help": "default <output_dir>/cache"})
    save_every: int = 0
    keep_last: int | None = 2
    log_every: int = 1
    timestep_buckets: int = 4
    report_to: str = field(default="tensorboard", metadata={"help": "accelerate tracker name, or none"})


@dataclass
class DiffusionDPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: str = field(default="copy", metadata={"help": "copy | lora_disabled | cached"})
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self):
        from diffdpo.diffusion.reference import REFERENCE_MODES

        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference: unknown {self.reference!r}; valid: {list(REFERENCE_MODES)}")
        if self.reference == "lora_disabled" and self.model.lora_rank <= 0:
            raise ValueError("reference=lora_disabled needs model.lora_rank > 0")
        self._check_loss()
        if self.loss.guidance_scale <= 0:
            raise ValueError(f"loss.guidance_scale: {self.loss.guidance_scale} must be > 0 (1 = no guidance)")
        span = self.train.timestep_range
        if len(span) != 2 or not 0 <= span[0] < span[1] <= 1:
            raise ValueError(f"train.timestep_range: {span} is not [low, high] with 0 <= low < high <= 1")
        from diffdpo.diffusion.logratios import TIMESTEP_SAMPLING

        if self.train.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"train.timestep_sampling: unknown {self.train.timestep_sampling!r}; "
                             f"valid: {list(TIMESTEP_SAMPLING)}")
        if self.reference == "cached" and loss_spec(self.loss.type).needs_reference:
            self.train.fixed_draws = True  # cached errors are only valid under each pair's fixed draws
        if not self.model.name_or_path:
            raise ValueError("model.name_or_path: required")

    def _check_loss(self) -> None:
        """The loss can train here: a diffusion model gives it what it reads, the data has its shape
        (pairs or labelled samples), and its beta is not converted from another loss's convention."""
        from diffdpo.diffusion.data import WON_AND_LOST
        from diffdpo.diffusion.objective import LOSS_INPUTS

        loss, data = self.loss, self.data
        try:
            spec = loss_spec(loss.type)
        except ValueError as e:
            raise ValueError(f"loss.type: {e}") from None
        missing = [k for k in required_inputs(spec, loss.options) if k not in LOSS_INPUTS]
        if missing:
            hint = " (set loss.options.length_normalize=false)" if loss.type == "ipo" else ""
            raise ValueError(f"loss.type: {loss.type!r} reads {missing}, which a diffusion model does not have; "
                             f"this recipe computes {sorted(LOSS_INPUTS)}{hint}")
        if not (spec.paired and spec.needs_reference) and loss.beta_convention != "core":
            raise ValueError(f"loss.beta_convention: {loss.type!r} takes its own beta (not Diffusion-DPO's); "
                             f"set loss.beta_convention=core")
        if spec.paired and (data.source == "feedback" or data.desirable_fraction is not None):
            what = "data.source=feedback" if data.source == "feedback" else "data.desirable_fraction"
            raise ValueError(f"{what}: unpaired samples need an unpaired loss (kto), not {loss.type!r}")
        if not spec.paired and (loss.sft_weight or loss.sft_epochs):
            raise ValueError(f"loss.sft_weight / loss.sft_epochs: the winners' loss needs pairs; {loss.type!r} "
                             f"is unpaired")
        if data.won_and_lost not in WON_AND_LOST:
            raise ValueError(f"data.won_and_lost: must be one of {WON_AND_LOST}, got {data.won_and_lost!r}")
        if data.desirable_fraction is not None and not 0 < data.desirable_fraction < 1:
            raise ValueError(f"data.desirable_fraction: must lie in (0, 1), got {data.desirable_fraction}")


# ==================================================================== setup pieces


def make_optimizer(params, cfg: TrainConfig, lr: float):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                                 eps=cfg.adam_eps)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":  # plain gradient steps: what the loss-scaling tests compare exactly
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: unknown {cfg.optimizer!r}; valid: adamw, adamw8bit, adafactor, sgd")


def load_trainable_state(unet, state: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    missing = sorted(k for k, p in params.items() if p.requires_grad and k not in state)
    unknown = sorted(set(state) - set(params))
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def save_media(items: list, media: str, sample_rate: int, folder: Path) -> None:
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(items):
        if media == "image":
            item.save(folder / f"{i}.png")
        else:
            wave = np.asarray(item, dtype=np.float32)
            stereo = wave.ndim == 2 and wave.shape[0] == 2  # [channels, samples] (tangoflux) -> frames x channels
            sf.write(folder / f"{i}.wav", wave.T if stereo else wave.reshape(-1), sample_rate)


# ==================================================================== training


def train(cfg: DiffusionDPOConfig, resume: bool | str = False) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from safetensors.torch import load_file, save_file

    from diffdpo.diffusion.data import desirable_weights, micro_batch, read_pairs, read_samples, write_toy_pairs
    from diffdpo.diffusion.encode import Encoded, repeat_for_pair
    from diffdpo.diffusion.logratios import draw_pairs, num_train_steps, pair_errors, pair_inputs, pair_seed, \
        prediction_kind, timestep_buckets
    from diffdpo.diffusion.models import load_backbone
    from diffdpo.diffusion.objective import diffusion_dpo_step, diffusion_kto_step, guided, sample_errors
    from diffdpo.diffusion.reference import CachedReference, FrozenCopyReference, LoraDisabledReference, cache_key, \
        compute_reference_errors
    from diffdpo.diffusion.tiny import build_tiny
    from diffdpo.training.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
    from diffdpo.training.sharding import (check_engine, engine_name, load_model_state, load_optimizer_state,
                                           model_state, optimizer_state, prepare_frozen, whole_weights)

    tc = cfg.train
    out_dir = Path(tc.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.grad_accum, mixed_precision=tc.mixed_precision,
        log_with=None if tc.report_to == "none" else tc.report_to,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")))
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    check_engine(accelerator)
    set_seed(tc.seed)
    if cfg.data.source != "toy" and not Path(cfg.data.path).exists():  # say so before minutes of model loading
        raise FileNotFoundError(f"data.path: no preference data at {cfg.data.path!r}")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    # ---- 1. model
    with accelerator.main_process_first():
        if cfg.model.tiny:
            build_tiny(cfg.model.family, cfg.model.name_or_path, seed=tc.seed)
        backbone = load_backbone(cfg.model.family, cfg.model.name_or_path, cfg.model.resolution,
                                 cfg.model.audio_seconds, cfg.model.guidance)
    pipe, unet = backbone.pipe, backbone.unet
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "projection_model", "language_model",
                 "vocoder", "conditioner"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval().to(accelerator.device)
    # the training (noising) schedule, apart from the pipeline's: sampling's set_timesteps rewrites that one
    scheduler = backbone.pipe.scheduler
    train_cls = type(scheduler) if prediction_kind(scheduler) == "flow_matching" else DDPMScheduler
    scheduler = train_cls.from_config(scheduler.config)
    unet.to(accelerator.device).train()
    if cfg.model.lora_rank > 0:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha or cfg.model.lora_rank,
                                    init_lora_weights="gaussian", target_modules=list(cfg.model.lora_targets)))
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.mixed_precision, torch.float32)

    # ---- 2. data and encodings
    data_path = Path(cfg.data.path)
    if cfg.data.source == "toy":
        with accelerator.main_process_first():
            write_toy_pairs(data_path, backbone.media, cfg.data.toy_pairs, cfg.model.resolution,
                            backbone.sample_rate if backbone.media == "audio" else 16000, backbone.audio_seconds,
                            seed=tc.seed)
    spec = loss_spec(cfg.loss.type)
    if spec.paired:
        pairset = read_pairs(cfg.data.source, data_path, backbone.media, backbone.load_media, cfg.data.ties,
                             cfg.data.on_bad_record, cfg.data.max_pairs)
        pairs = pairset.pairs
    else:  # Diffusion-KTO: labelled samples take the pairs' place everywhere below
        pairset = read_samples(cfg.data.source, data_path, backbone.media, backbone.load_media, cfg.data.ties,
                               cfg.data.on_bad_record, cfg.data.max_pairs, cfg.data.won_and_lost)
        pairs = pairset.samples
    draw_weights = desirable_weights(pairs, cfg.data.desirable_fraction) if cfg.data.desirable_fraction else None
    cache_dir = Path(tc.cache_dir or out_dir / "cache")
    key = cache_key({"model": cfg.model.name_or_path, "family": cfg.model.family, "res": cfg.model.resolution,
                     "sec": backbone.audio_seconds, "data": str(data_path.resolve()),
                     "pairs": [(p.id, p.prompt) for p in pairs]})
    with accelerator.main_process_first():
        encoded = Encoded(backbone, pairs, cache_dir / f"encoded_{key}.safetensors" if tc.cache_latents else None,
                          show_progress=accelerator.is_main_process)
    n_steps_noise = num_train_steps(scheduler)
    latent_shape = tuple(encoded.pair_latents([0])[0].shape[1:])

    def draws_for(indices: list[int], epoch: int):
        seeds = [pair_seed(tc.seed, i, None if tc.fixed_draws else epoch) for i in indices]
        return draw_pairs(seeds, latent_shape, n_steps_noise, tc.proportion_empty_prompts, accelerator.device,
                          step_range=tuple(tc.timestep_range), sampling=tc.timestep_sampling,
                          logit_mean=tc.logit_mean, logit_std=tc.logit_std)

    def batch_inputs(indices: list[int], epoch: int):
        """``((winners, losers) or (samples,), cond, draws)`` of these items."""
        draws = draws_for(indices, epoch)
        latents = tuple(x.to(accelerator.device) for x in encoded.pair_latents(indices))
        cond = encoded.conditions(indices, draws.drop_prompt.tolist())
        cond = {k: v.to(accelerator.device) for k, v in cond.items()}
        return latents, cond, draws

    predict = guided(backbone.predict, encoded.condition(""), cfg.loss.guidance_scale)

    # ---- 3. reference
    if not spec.needs_reference:  # MaPO: no reference model at all
        reference = None
    elif cfg.reference == "copy":
        reference = FrozenCopyReference(unet, weight_dtype)
    elif cfg.reference == "lora_disabled":
        reference = LoraDisabledReference(unet)
    else:
        ref_unet = FrozenCopyReference(unet).unet if cfg.model.lora_rank <= 0 else None

        @torch.no_grad()
        def errors_of(indices):
            latents, cond, draws = batch_inputs(indices, 0)
            model = ref_unet if ref_unet is not None else unet
            if ref_unet is None:
                unet.disable_adapters()
            try:
                if not spec.paired:
                    return (sample_errors(predict, model, scheduler, latents[0], cond, draws),)
                inputs = pair_inputs(scheduler, *latents, draws)
                return pair_errors(lambda x, t, c: predict(model, x, t, c), inputs, repeat_for_pair(cond))
            finally:
                if ref_unet is None:
                    unet.enable_adapters()

        ref_key = cache_key({"encoded": key, "seed": tc.seed, "drop": tc.proportion_empty_prompts,
                             "range": tc.timestep_range, "guidance": cfg.loss.guidance_scale,
                             "sampling": [tc.timestep_sampling, tc.logit_mean, tc.logit_std],
                             "flux_guidance": cfg.model.guidance})
        with accelerator.main_process_first():
            table = compute_reference_errors(cache_dir / f"reference_{ref_key}.safetensors", len(pairs),
                                             tc.per_device_batch, errors_of, sides=2 if spec.paired else 1)
        reference = CachedReference(table.to(accelerator.device))
        del ref_unet

    # ---- optimizer, schedule
    world = accelerator.num_processes
    lr = tc.lr * (tc.per_device_batch * tc.grad_accum * world if tc.scale_lr else 1)
    optimizer = make_optimizer([p for p in unet.parameters() if p.requires_grad], tc, lr)
    micro_per_epoch = len(pairs) // (tc.per_device_batch * world)
    steps_per_epoch = micro_per_epoch // tc.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} pairs give no optimizer step of {tc.per_device_batch} x {tc.grad_accum} "
                         f"x {world} pairs")
    max_steps = tc.max_steps or tc.epochs * steps_per_epoch
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps,
                                 num_training_steps=max_steps)
    # The lr scheduler is stepped here once per optimizer step, not wrapped by accelerate (which
    # would step it once per process).
    unet, optimizer = accelerator.prepare(unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)
    if isinstance(reference, LoraDisabledReference):
        reference.unet = raw_unet
    if isinstance(reference, FrozenCopyReference):  # sharded like the policy under FSDP2
        reference.unet = prepare_frozen(accelerator, reference.unet)

    # ---- resume
    step = 0
    ckpt_root = out_dir / "checkpoints"
    if resume:
        ckpt = latest_checkpoint(ckpt_root) if resume is True else Path(resume)
        if ckpt is None:
            log.info("--resume: no checkpoint in %s, starting fresh", ckpt_root)
        else:
            load_model_state(accelerator, unet, load_file(ckpt / "trainable.safetensors"), str(ckpt))
            load_optimizer_state(accelerator, unet, optimizer,
                                 torch.load(ckpt / "optimizer.pt", weights_only=True))
            lr_scheduler.load_state_dict(torch.load(ckpt / "lr_scheduler.pt", weights_only=True))
            step = load_trainer_state(ckpt)["step"]
            log.info("resumed from %s at step %d", ckpt, step)

    if accelerator.is_main_process and tc.report_to != "none":
        flat = {f"{a}.{b}": (str(v) if isinstance(v, (list, dict)) or v is None else v)
                for a, sec in to_dict(cfg).items() if isinstance(sec, dict) for b, v in sec.items()}
        accelerator.init_trackers("diffusion_dpo", config=flat)
    unit = "pairs" if spec.paired else "samples"
    log.info("%d %s (%d ties dropped, %d bad skipped), %d steps of %d %s on %d processes (%s), beta %.1f "
             "(core), reference %s", len(pairs), unit, pairset.dropped_ties, pairset.skipped, max_steps,
             tc.per_device_batch * tc.grad_accum * world, unit, world, engine_name(accelerator), cfg.loss.core_beta(),
             cfg.reference if reference is not None else "none (reference-free loss)")

    def save(at_step: int) -> None:
        # whole tensors gathered on every process (collectives under FSDP2), written by the main one
        weights = model_state(accelerator, unet, trainable_only=True)
        optim = optimizer_state(accelerator, unet, optimizer)

        def write(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")

        if accelerator.is_main_process:
            save_checkpoint(ckpt_root, at_step, write, {"epoch": at_step // steps_per_epoch}, keep_last=tc.keep_last)
        accelerator.wait_for_everyone()

    def validate(at_step: int) -> None:
        # a sharded UNet samples on every process (its forward gathers shards); the main one writes
        if cfg.validation.prompts and (accelerator.is_main_process or accelerator.is_fsdp2):
            v = cfg.validation
            raw_unet.eval()
            items = backbone.sample(v.prompts, v.num_inference_steps, v.guidance_scale, v.seed)
            raw_unet.train()
        if cfg.validation.prompts and accelerator.is_main_process:
            save_media(items, backbone.media, backbone.sample_rate if backbone.media == "audio" else 0,
                       out_dir / "samples" / f"step_{at_step}")
        accelerator.wait_for_everyone()

    # ---- 4./5. loop
    history = []
    progress = tqdm(total=max_steps, initial=step, desc="diffusion-dpo", disable=not accelerator.is_main_process)
    while step < max_steps:
        epoch = step // steps_per_epoch
        sft_only = epoch < cfg.loss.sft_epochs
        started = time.perf_counter()
        gathered: dict[str, list[torch.Tensor]] = {}
        for k in range(tc.grad_accum):
            micro = (step % steps_per_epoch) * tc.grad_accum + k + epoch * micro_per_epoch
            _, indices = micro_batch(len(pairs), tc.seed, micro, tc.per_device_batch, world,
                                     accelerator.process_index, draw_weights)
            with accelerator.accumulate(unet):
                latents, cond, draws = batch_inputs(indices, epoch)
                with accelerator.autocast():
                    if spec.paired:
                        out = diffusion_dpo_step(predict, unet, reference, scheduler, *latents, cond, draws, indices,
                                                 cfg.loss.type, cfg.loss.core_beta(), cfg.loss.sft_weight, sft_only,
                                                 cfg.loss.options)
                    else:
                        desirable = torch.tensor([pairs[i].desirable for i in indices], device=accelerator.device)
                        out = diffusion_kto_step(predict, unet, reference, scheduler, latents[0], desirable, cond,
                                                 draws, indices, cfg.loss.type, cfg.loss.core_beta(),
                                                 cfg.loss.options, lambda t: accelerator.reduce(t, "mean"))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and tc.max_grad_norm:
                    accelerator.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            per_pair = out.per_pair()
            per_pair["loss"] = out.loss.detach().float().reshape(1)
            per_pair["bucket"] = timestep_buckets(draws.step_index, n_steps_noise, tc.timestep_buckets).float()
            for name, value in per_pair.items():
                gathered.setdefault(name, []).append(accelerator.gather(value.contiguous()))
        lr_scheduler.step()
        step += 1
        progress.update(1)
        metrics = _step_metrics({k: torch.cat(v) for k, v in gathered.items()}, tc.timestep_buckets)
        metrics.update(lr=lr_scheduler.get_last_lr()[0], epoch=epoch, sft_only=float(sft_only))
        metrics["perf/step_seconds"] = time.perf_counter() - started
        history.append(metrics)
        if step % tc.log_every == 0 or step == max_steps:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('rewards/accuracies', 0):.2f}")
            if tc.report_to != "none":
                accelerator.log(metrics, step=step)
        if tc.save_every and step % tc.save_every == 0:
            save(step)
        if cfg.validation.every and step % cfg.validation.every == 0:
            validate(step)
    progress.close()

    # ---- 6. final output
    final = out_dir / "final"
    weights = model_state(accelerator, unet, trainable_only=cfg.model.lora_rank > 0)  # whole, on the main process
    if accelerator.is_main_process:
        if cfg.model.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            backbone.save_lora(final, get_peft_model_state_dict(raw_unet, state_dict=weights))
        else:
            with whole_weights(raw_unet, weights):
                backbone.save_pretrained(final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"history": history, "final": final, "pairs": len(pairs), "steps": step,
            "trainable": {k: weights[k] for k, p in raw_unet.named_parameters()
                          if p.requires_grad and k in weights}}


def _step_metrics(t: dict[str, torch.Tensor], n_buckets: int) -> dict[str, float]:
    """One optimizer step's metrics over every pair of every process and micro-batch."""
    from diffdpo.diffusion.objective import bucket_accuracy

    out = {"loss": t["loss"].mean().item()}
    out.update({k: v.mean().item() for k, v in t.items() if k.startswith("mse/")})
    if "rewards/chosen" in t:
        margins = t["rewards/chosen"] - t["rewards/rejected"]
        out.update({"rewards/chosen": t["rewards/chosen"].mean().item(),
                    "rewards/rejected": t["rewards/rejected"].mean().item(),
                    "rewards/margins": margins.mean().item(),
                    "rewards/accuracies": ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()})
        out.update(bucket_accuracy(margins, t["bucket"].long(), n_buckets))
    if "desirable" in t:  # unpaired (KTO): chosen = desirable, rejected = undesirable; no margins without pairs
        out["kto/reference_point"] = t["kto/reference_point"].mean().item()
        for side, sel in (("chosen", t["desirable"] > 0), ("rejected", t["desirable"] == 0)):
            if sel.any():
                out.update({f"rewards/{side}": t["rewards"][sel].mean().item(),
                            f"mse/policy_{side}": t["mse/policy"][sel].mean().item(),
                            f"mse/ref_{side}": t["mse/ref"][sel].mean().item()})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (recipes/configs/*_dpo.yaml)")
    parser.add_argument("--resume", nargs="?", const=True, default=False,
                        help="resume from the latest checkpoint in <output_dir>/checkpoints (or a given one)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=2000 train.max_steps=10")


def train_from_args(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(DiffusionDPOConfig, args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result["history"]:
        print({k: round(v, 4) for k, v in result["history"][-1].items()})
    print(f"saved {result['final']}")
    return result


def run(args: argparse.Namespace) -> int:
    """``diffdpo train``."""
    train_from_args(args)
    return 0


def main(argv: list[str] | None = None) -> dict:
    """``python recipes/diffusion_dpo.py``; returns the run's history for scripts and tests."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return train_from_args(parser.parse_args(argv))
