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

Text encoders and the VAE are frozen (every published setting freezes them) and stay float32;
only the UNet trains. Latents use the VAE posterior *mean* so that cached latents are exact.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffdpo.diffusion.hub import OfflineModelError, from_pretrained

FAMILIES = ("tango", "audioldm", "audioldm2", "sd15", "sdxl")


class Backbone:
    """Family adapter. Subclasses set ``media`` ("image" | "audio") and implement the hooks."""

    family: str = ""
    media: str = ""

    def __init__(self, pipe, resolution: int = 512, audio_seconds: float = 10.0):
        self.pipe = pipe
        self.unet, self.vae = pipe.unet, pipe.vae
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

    def save_lora(self, path: Path, unet_lora_layers: dict[str, Tensor]) -> None:
        """``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(path)`` loads."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=unet_lora_layers, safe_serialization=True)

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

    def save_lora(self, path, unet_lora_layers):
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline.save_lora_weights(path, unet_lora_layers=unet_lora_layers, safe_serialization=True)


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


def load_backbone(family: str, name_or_path: str, resolution: int = 512, audio_seconds: float = 10.0) -> Backbone:
    """Load a family's pipeline from a local folder or hub id (see :func:`diffdpo.diffusion.hub.from_pretrained`)."""
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
    import diffusers

    cls_name, backbone = {
        "sd15": ("StableDiffusionPipeline", StableDiffusionBackbone),
        "sdxl": ("StableDiffusionXLPipeline", StableDiffusionXLBackbone),
        "audioldm": ("AudioLDMPipeline", AudioLDMBackbone),
        "audioldm2": ("AudioLDM2Pipeline", AudioLDM2Backbone),
    }[family]
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    if family == "audioldm2":
        # The published cvssp/audioldm2* model_index.json names GPT2Model, which cannot generate under
        # transformers 5; the pipeline needs the same weights as GPT2LMHeadModel.
        from transformers import GPT2LMHeadModel

        kwargs["language_model"] = from_pretrained(GPT2LMHeadModel, name_or_path, subfolder="language_model")
    pipe = from_pretrained(getattr(diffusers, cls_name), name_or_path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
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
