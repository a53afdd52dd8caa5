"""Backbones Diffusion-DPO trains: one small adapter per model family over its real components.

A :class:`Backbone` knows, for its family, how to turn a prompt into the UNet's condition, media
(image or audio file) into VAE latents, call the UNet, sample, and save. Families:

* ``tango``     — Tango / Tango 2 (their published checkpoint folders as they are, or converted)
  and any folder in docs/model_layout.md's layout (the SoundWorld base model), loaded by
  :class:`diffdpo.diffusion.tango.TangoPipeline`.
* ``audioldm``  — diffusers ``AudioLDMPipeline`` (CLAP text embedding as UNet class label).
* ``audioldm2`` — diffusers ``AudioLDM2Pipeline`` (GPT-2 generated + T5 states, two cross-attentions).
* ``sd15``      — diffusers ``StableDiffusionPipeline``.
* ``sdxl``      — diffusers ``StableDiffusionXLPipeline`` (pooled text + size/crop time ids).
* ``sd3``       — diffusers ``StableDiffusion3Pipeline`` (SD3Transformer2DModel, flow matching; two CLIP
  + T5 states and pooled CLIP).
* ``flux``      — diffusers ``FluxPipeline`` (FluxTransformer2DModel, flow matching; T5 states, pooled
  CLIP, 2x2-packed latents with image ids, FLUX.1-dev's distilled guidance embedding).
* ``tangoflux`` — TangoFlux (declare-lab/TangoFlux): FluxTransformer2DModel over Stable Audio Open VAE latents,
  T5 states + a duration token, its published folder as it is (:mod:`diffdpo.diffusion.tangoflux`).

Text encoders and the VAE are frozen (every published setting freezes them) and stay float32;
only the denoiser trains: the UNet, or the transformer of SD3 / Flux (called ``unet`` here and in the
trainer, whichever it is). Latents use the VAE posterior *mean* so that cached latents are exact.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffdpo.diffusion.hub import OfflineModelError, from_pretrained

FAMILIES = ("tango", "audioldm", "audioldm2", "sd15", "sdxl", "sd3", "flux", "tangoflux")


class Backbone:
    """Family adapter. Subclasses set ``media`` ("image" | "audio") and implement the hooks."""

    family: str = ""
    media: str = ""

    def __init__(self, pipe, resolution: int = 512, audio_seconds: float = 10.0):
        self.pipe = pipe
        self.unet = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
        self.vae = pipe.vae
        self.resolution, self.audio_seconds = resolution, audio_seconds

    # ---------------------------------------------------------------- conditions
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        """The UNet condition of one prompt, tensors with a leading dim of 1 (cacheable per prompt)."""
        raise NotImplementedError

    def unet_kwargs(self, cond: dict[str, Tensor]) -> dict:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}

    def predict(self, unet, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return unet(noisy, timesteps, **self.unet_kwargs(cond)).sample

    # ---------------------------------------------------------------- media
    def load_media(self, path: Path) -> Tensor:
        """An image ``[3, R, R]`` in [-1, 1], or a mono waveform at the model's sample rate."""
        return load_image(path, self.resolution) if self.media == "image" else self._load_audio(path)

    def _load_audio(self, path: Path) -> Tensor:
        return load_audio(path, self.sample_rate, int(round(self.audio_seconds * self.sample_rate)))

    @torch.no_grad()
    def media_to_latents(self, media: Tensor) -> Tensor:
        """Scaled VAE latents (posterior mean), computed in float32."""
        x = self._vae_input(media).float()
        cfg = self.vae.config
        shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        return (self.vae.encode(x).latent_dist.mode() - shift) * float(cfg.scaling_factor)

    def _vae_input(self, media: Tensor) -> Tensor:
        return media

    # ---------------------------------------------------------------- sampling / saving
    @torch.no_grad()
    def sample(self, prompts: list[str], num_inference_steps: int, guidance_scale: float, seed: int) -> list:
        """Images (PIL) or waveforms (float32 numpy) for ``prompts``."""
        gen = torch.Generator().manual_seed(seed)
        key = "audios" if self.media == "audio" else "images"
        kwargs = {"output_type": "np"} if self.media == "audio" else {}
        if self.media == "audio":
            kwargs["audio_length_in_s"] = self.audio_seconds
        out = self.pipe(list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=gen, **kwargs)
        return list(getattr(out, key))

    def save_pretrained(self, path: Path) -> None:
        self.pipe.save_pretrained(path)

    lora_writer = "StableDiffusionPipeline"  # the diffusers pipeline class whose save_lora_weights writes the file

    def save_lora(self, path: Path, lora_state: dict[str, Tensor]) -> None:
        """``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(path)`` loads, from the
        denoiser's peft state dict (UNets: converted to diffusers' key names, as its examples save them)."""
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers

        getattr(diffusers, self.lora_writer).save_lora_weights(
            path, unet_lora_layers=convert_state_dict_to_diffusers(lora_state), safe_serialization=True)

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.vocoder.config.sampling_rate)


class StableDiffusionBackbone(Backbone):
    family, media = "sd15", "image"

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt([prompt], self.unet.device, 1, False)
        return {"encoder_hidden_states": embeds.float()}


class StableDiffusionXLBackbone(Backbone):
    family, media = "sdxl", "image"
    lora_writer = "StableDiffusionXLPipeline"

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt([prompt], device=self.unet.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        size = (self.resolution, self.resolution)
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, torch.float32,
                                               text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim)
        return {"encoder_hidden_states": embeds.float(), "text_embeds": pooled.float(), "time_ids": time_ids}

    def unet_kwargs(self, cond):
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}


class AudioLDMBackbone(Backbone):
    """AudioLDM: log-mel ``[B, 1, frames, n_mels]`` at 16 kHz (n_fft 1024, hop 160, 0-8 kHz)."""

    family, media = "audioldm", "audio"

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        return {"class_labels": self.pipe._encode_prompt([prompt], self.unet.device, 1, False).float()}

    def unet_kwargs(self, cond):
        return {"encoder_hidden_states": None, "class_labels": cond["class_labels"]}

    def _vae_input(self, media: Tensor) -> Tensor:
        return audioldm_log_mel(media, self.sample_rate, int(self.pipe.vocoder.config.model_in_dim))

    def _load_audio(self, path: Path) -> Tensor:
        # frames must divide by the VAE's downsampling; AudioLDM rounds the length the same way.
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        frames = int(self.audio_seconds * self.sample_rate / 160)
        frames = max(down, frames // down * down)
        return load_audio(path, self.sample_rate, frames * 160 - 1)


class AudioLDM2Backbone(AudioLDMBackbone):
    family = "audioldm2"

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        embeds, mask, generated = self.pipe.encode_prompt([prompt], self.unet.device, 1, False)
        return {"encoder_hidden_states": generated.float(), "encoder_hidden_states_1": embeds.float(),
                "encoder_attention_mask_1": mask}

    def unet_kwargs(self, cond):
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "encoder_hidden_states_1": cond["encoder_hidden_states_1"],
                "encoder_attention_mask_1": cond["encoder_attention_mask_1"]}


class TangoBackbone(Backbone):
    """A Tango-shaped model: T5 states + mask, log-mel VAE, optional time-ramp UNet channel."""

    family, media = "tango", "audio"

    def __init__(self, pipe, resolution: int = 512, audio_seconds: float = 10.0):
        super().__init__(pipe, resolution, pipe.audio_config.clip_seconds)

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.audio_config.sample_rate)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        states, mask = self.pipe.encode_text([prompt])
        return {"encoder_hidden_states": states.float(), "encoder_attention_mask": mask}

    def unet_kwargs(self, cond):
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "encoder_attention_mask": cond["encoder_attention_mask"]}

    def predict(self, unet, noisy, timesteps, cond):
        from diffdpo.diffusion.tango.position import with_time_ramp

        in_channels = getattr(unet, "module", unet).config.in_channels  # DDP-wrapped or not
        return unet(with_time_ramp(noisy, in_channels), timesteps, **self.unet_kwargs(cond)).sample

    def _load_audio(self, path: Path) -> Tensor:
        from diffdpo.diffusion.tango.audio import prepare_waveform

        return prepare_waveform(load_audio(path, self.sample_rate), self.pipe.audio_config)

    @torch.no_grad()
    def media_to_latents(self, media: Tensor) -> Tensor:
        from diffdpo.diffusion.tango.audio import log_mel

        mel = log_mel(media.float().cpu(), self.pipe.audio_config, prepared=True)
        return self.pipe.mel_to_latents(mel.to(self.vae.device))

    @torch.no_grad()
    def sample(self, prompts, num_inference_steps, guidance_scale, seed):
        return self.pipe(list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         seed=seed, output="audio")


class FlowTransformerBackbone(Backbone):
    """SD3 / Flux: a flow-matching transformer (target ``noise - latents``, read from the
    ``FlowMatchEulerDiscreteScheduler`` by :mod:`diffdpo.diffusion.logratios`).

    Prompts are encoded to ``max_sequence_length`` T5 tokens in training and sampling alike: 77, the
    default of diffusers' ``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py``
    (the pipelines' own default is longer: 256 for SD3, 512 for Flux)."""

    media = "image"
    max_sequence_length = 77

    @torch.no_grad()
    def sample(self, prompts, num_inference_steps, guidance_scale, seed):
        gen = torch.Generator().manual_seed(seed)
        return list(self.pipe(list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              generator=gen, height=self.resolution, width=self.resolution,
                              max_sequence_length=self.max_sequence_length).images)

    def save_lora(self, path, lora_state):
        """The peft state dict as it is, as diffusers' SD3 / Flux LoRA examples save it (converted to
        diffusers' old ``lora.down`` names, SD3's loader would drop the ``to_q/k/v/out`` layers)."""
        type(self.pipe).save_lora_weights(path, transformer_lora_layers=lora_state, safe_serialization=True)


class StableDiffusion3Backbone(FlowTransformerBackbone):
    family = "sd3"

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=[prompt], prompt_2=None, prompt_3=None, device=self.unet.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}

    def predict(self, unet, noisy, timesteps, cond):
        return unet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                    pooled_projections=cond["pooled_projections"]).sample


class FluxBackbone(FlowTransformerBackbone):
    """Latents stay ``[B, 16, h, w]`` everywhere else (noise, target, MSE); :meth:`predict` packs them
    into 2x2 patches with their image ids for the transformer and unpacks its output, as
    ``FluxPipeline`` and diffusers' ``train_dreambooth_lora_flux.py`` do.

    ``guidance`` is the value fed to a guidance-distilled transformer's guidance embedding
    (FLUX.1-dev) in training: 3.5, the default of ``train_dreambooth_lora_flux.py`` (its README runs use
    1.0); a transformer without the embedding (FLUX.1-schnell) gets none. Sampling feeds it the
    sampler's ``guidance_scale``, as ``FluxPipeline`` does."""

    family = "flux"
    guidance = 3.5

    def __init__(self, pipe, resolution: int = 512, audio_seconds: float = 10.0, guidance: float = 3.5):
        super().__init__(pipe, resolution, audio_seconds)
        self.guidance = guidance

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=self.unet.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}

    def predict(self, unet, noisy, timesteps, cond):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        states = cond["encoder_hidden_states"]
        guidance = None
        if getattr(unet, "module", unet).config.guidance_embeds:  # DDP-wrapped or not
            guidance = torch.full((b,), self.guidance, device=noisy.device, dtype=noisy.dtype)
        out = unet(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=timesteps / 1000,
                   guidance=guidance, pooled_projections=cond["pooled_projections"], encoder_hidden_states=states,
                   txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                   img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)).sample
        # _unpack_latents takes pixel sizes and the VAE factor; latent sizes with factor 1 are the same view
        return FluxPipeline._unpack_latents(out, h, w, 1)


def load_backbone(family: str, name_or_path: str, resolution: int = 512, audio_seconds: float = 10.0,
                  guidance: float = 3.5) -> Backbone:
    """Load a family's pipeline from a local folder or hub id (see :func:`diffdpo.diffusion.hub.from_pretrained`).
    ``guidance``: Flux's training guidance value (:class:`FluxBackbone`)."""
    if family not in FAMILIES:
        raise ValueError(f"model.family: unknown {family!r}; valid: {list(FAMILIES)}")
    if family == "tango":
        from diffdpo.diffusion.tango.pipeline import TangoPipeline

        if not Path(name_or_path).is_dir():
            raise OfflineModelError(
                f"model {name_or_path!r}: the tango family loads a local folder: a Tango / Tango 2 checkpoint as "
                "published (hf download declare-lab/tango2-full --local-dir models/tango2-full), or "
                "one in docs/model_layout.md's layout (e.g. the SoundWorld base model)")
        return TangoBackbone(TangoPipeline.from_pretrained(name_or_path), resolution, audio_seconds)
    if family == "tangoflux":
        from diffdpo.diffusion.tangoflux import TangoFluxBackbone, load_tangoflux

        return TangoFluxBackbone(load_tangoflux(name_or_path), resolution, audio_seconds)
    import diffusers

    cls_name, backbone = {
        "sd15": ("StableDiffusionPipeline", StableDiffusionBackbone),
        "sdxl": ("StableDiffusionXLPipeline", StableDiffusionXLBackbone),
        "audioldm": ("AudioLDMPipeline", AudioLDMBackbone),
        "audioldm2": ("AudioLDM2Pipeline", AudioLDM2Backbone),
        "sd3": ("StableDiffusion3Pipeline", StableDiffusion3Backbone),
        "flux": ("FluxPipeline", FluxBackbone),
    }[family]
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    if family == "audioldm2":
        # The published cvssp/audioldm2* model_index.json names GPT2Model, which cannot generate under
        # transformers 5; the pipeline needs the same weights as GPT2LMHeadModel.
        from transformers import GPT2LMHeadModel

        kwargs["language_model"] = from_pretrained(GPT2LMHeadModel, name_or_path, subfolder="language_model")
    # float32 whatever the configs say: transformers 5 loads a component in its config's torch_dtype (the
    # published SDXL / SD3 text encoders say float16), which half-precision-mismatches the rest on a CPU
    pipe = from_pretrained(getattr(diffusers, cls_name), name_or_path, dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if family == "flux":
        return FluxBackbone(pipe, resolution, audio_seconds, guidance)
    return backbone(pipe, resolution, audio_seconds)


# -------------------------------------------------------------------- media readers


def _open(media: Path | bytes):
    return io.BytesIO(media) if isinstance(media, bytes) else media


def load_image(path: Path | bytes, resolution: int) -> Tensor:
    """RGB image (file or encoded bytes) resized (shorter side) and centre-cropped to ``resolution``,
    in [-1, 1]: Pick-a-Pic images of any size are accepted."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(_open(path)) as im:
        im = im.convert("RGB")
        im = TF.center_crop(TF.resize(im, resolution), resolution)
        return TF.to_tensor(im) * 2 - 1


def load_audio(path: Path | bytes, sample_rate: int, samples: int | None = None) -> Tensor:
    """Mono float32 waveform at ``sample_rate`` (stereo averaged, resampled), cropped/zero-padded
    to ``samples`` (None: as long as the file)."""
    import soundfile as sf
    import torchaudio.functional as AF

    data, sr = sf.read(_open(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if sr != sample_rate:
        wave = AF.resample(wave, sr, sample_rate)
    if samples is None or wave.numel() >= samples:
        return wave[:samples]
    return torch.nn.functional.pad(wave, (0, samples - wave.numel()))


def audioldm_log_mel(wave: Tensor, sample_rate: int, n_mels: int) -> Tensor:
    """AudioLDM's features: ``log(clamp(mel, 1e-5))``, magnitude STFT n_fft 1024 / hop 160, Slaney
    mel 0-8 kHz, laid out ``[B, 1, frames, n_mels]``."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=1024, win_length=1024, hop_length=160,
                                               f_min=0.0, f_max=8000.0, n_mels=n_mels, power=1.0, norm="slaney",
                                               mel_scale="slaney").to(wave.device)(wave.float())
    return torch.log(mel.clamp(min=1e-5)).transpose(1, 2).unsqueeze(1)
