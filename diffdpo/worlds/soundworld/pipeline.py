"""Load, save and sample a Tango-shaped model folder (docs/model_layout.md).

    text -> tokenizer -> T5 encoder states -> DDIM denoising of VAE latents with classifier-free
    guidance -> VAE decode -> log-mel -> Griffin-Lim -> waveform

Each component is loaded with its own library's ``from_pretrained``. A UNet with one more input
channel than the VAE has latents gets SoundWorld's time ramp (:func:`components.with_time_ramp`);
any code that calls the UNet directly (Diffusion-DPO training) must build its input the same
way, which :meth:`SoundWorldPipeline.unet_forward` does. Latents are scaled as diffusers does:
``(z - shift_factor) * scaling_factor`` from ``vae/config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from diffdpo.worlds.soundworld.audio import AudioConfig, griffin_lim, log_mel
from diffdpo.worlds.soundworld.components import position_features, set_position_features, with_time_ramp

MODEL_INDEX = {
    "_class_name": "TangoStylePipeline",
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "vae": ["diffusers", "AutoencoderKL"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "DDPMScheduler"],
}


def default_model_dir() -> Path:
    from diffdpo.worlds.soundworld import WEIGHTS_DIR

    return WEIGHTS_DIR / "generator"


def load_tokenizer(path: str | Path):
    """The fast tokenizer saved under ``path``; refuses a degenerate one (transformers can return
    a near-empty tokenizer for a folder it cannot read instead of raising)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected a saved fast tokenizer)")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if len(tok) < 16:
        raise ValueError(f"{path}: tokenizer loaded with only {len(tok)} tokens; the folder is probably damaged")
    return tok


LOAD_TIME_KEYS = ("_name_or_path", "is_local", "local_files_only")


def _drop_load_time_keys(folder: Path) -> None:
    """Remove what ``from_pretrained`` records about where and how a model was loaded (a local path,
    offline flags) from the configs ``save_pretrained`` just wrote: a saved folder describes the
    model, not the machine it was loaded on."""
    for config in folder.glob("*/*config.json"):
        data = json.loads(config.read_text())
        if any(k in data for k in LOAD_TIME_KEYS):
            config.write_text(json.dumps({k: v for k, v in data.items() if k not in LOAD_TIME_KEYS}, indent=2) + "\n")


class SoundWorldPipeline:
    """The components of a Tango-shaped model plus sampling. Inference only (``torch.no_grad``)."""

    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, audio_config: AudioConfig):
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.scheduler, self.audio_config = scheduler, audio_config

    # ------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "SoundWorldPipeline":
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import T5EncoderModel

        path = Path(path) if path is not None else default_model_dir()
        missing = [p for p in ("model_index.json", "audio_config.json", "text_encoder", "tokenizer", "vae", "unet",
                               "scheduler") if not (path / p).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: not a Tango-layout model folder, missing {missing} "
                                    "(see docs/model_layout.md; the shipped base model is built by "
                                    "recipes/soundworld_pretrain.py)")
        cfg = AudioConfig.load(path / "audio_config.json")
        if cfg.vocoder != "griffin_lim":
            raise ValueError(f"{path}: vocoder {cfg.vocoder!r} is not supported by SoundWorldPipeline")
        unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
        features = json.loads((path / "model_index.json").read_text()).get("position_features")
        if features:  # cross-attention position features (components.PositionalCrossAttnProcessor)
            set_position_features(unet, features["query_time"], features["key_position"])
        return cls(load_tokenizer(path / "tokenizer"),
                   T5EncoderModel.from_pretrained(path / "text_encoder").eval(),
                   AutoencoderKL.from_pretrained(path / "vae").eval(),
                   unet, DDPMScheduler.from_pretrained(path / "scheduler"), cfg)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the folder atomically (temporary sibling, then rename)."""
        path = Path(path)
        tmp = path.parent / f".tmp_{path.name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        features = position_features(self.unet)
        index = {**MODEL_INDEX, **({"position_features": features} if features else {})}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        self.audio_config.save(tmp / "audio_config.json")
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        self.text_encoder.save_pretrained(tmp / "text_encoder")
        self.vae.save_pretrained(tmp / "vae")
        self.unet.save_pretrained(tmp / "unet")
        self.scheduler.save_pretrained(tmp / "scheduler")
        _drop_load_time_keys(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------ pieces
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [B, L, D], attention_mask [B, L])``."""
        enc = self.tokenizer(list(captions), padding=True, return_tensors="pt")
        states = self.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        return states, enc.attention_mask

    def unet_forward(self, latents, timesteps, states, mask) -> torch.Tensor:
        """The UNet's prediction for (scaled) ``latents``, with the time ramp added where needed."""
        return self.unet(with_time_ramp(latents, self.unet.config.in_channels), timesteps,
                         encoder_hidden_states=states, encoder_attention_mask=mask).sample

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.latent_channels, self.audio_config.n_mels // down, self.audio_config.frames // down)

    def _scale(self) -> tuple[float, float]:
        return float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)

    @torch.no_grad()
    def mel_to_latents(self, mel: torch.Tensor) -> torch.Tensor:
        """``[B, n_mels, frames]`` log-mel -> scaled latents (the posterior mean)."""
        scale, shift = self._scale()
        return (self.vae.encode(mel.unsqueeze(1)).latent_dist.mode() - shift) * scale

    @torch.no_grad()
    def audio_to_latents(self, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[B, samples]`` waveforms at ``audio_config.sample_rate`` -> scaled latents."""
        return self.mel_to_latents(log_mel(audio, self.audio_config))

    @torch.no_grad()
    def latents_to_mel(self, latents: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale()
        return self.vae.decode(latents / scale + shift).sample[:, 0]

    def mel_to_audio(self, mel: torch.Tensor) -> torch.Tensor:
        return griffin_lim(mel, self.audio_config)

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_latents(self, captions: list[str], num_inference_steps: int = 25, guidance_scale: float = 3.0,
                       seed: int | list[int] = 0, scheduler=None, batch_size: int = 32) -> torch.Tensor:
        """Scaled latents for ``captions``. Caption ``i`` starts from noise seeded ``seed + i``
        (or ``seed[i]``), so a sample does not depend on what else is in the batch."""
        from diffusers import DDIMScheduler

        seeds = [seed + i for i in range(len(captions))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(captions):
            raise ValueError(f"{len(seeds)} seeds for {len(captions)} captions")
        sampler = scheduler or DDIMScheduler.from_config(self.scheduler.config)
        out = []
        for s in range(0, len(captions), batch_size):
            caps, sds = list(captions[s:s + batch_size]), seeds[s:s + batch_size]
            b = len(caps)
            guided = guidance_scale != 1.0
            states, mask = self.encode_text(caps + [""] * b if guided else caps)
            lat = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(x)))
                               for x in sds]) * sampler.init_noise_sigma
            sampler.set_timesteps(num_inference_steps)
            for t in sampler.timesteps:
                inp = sampler.scale_model_input(torch.cat([lat, lat]) if guided else lat, t)
                eps = self.unet_forward(inp, t.expand(len(inp)), states, mask)
                if guided:
                    cond, uncond = eps.chunk(2)
                    eps = uncond + guidance_scale * (cond - uncond)
                lat = sampler.step(eps, t, lat).prev_sample
            out.append(lat)
        return torch.cat(out)

    def __call__(self, captions: list[str] | str, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 seed: int | list[int] = 0, output: str = "audio", **kwargs):
        """``output``: "audio" (list of float32 arrays), "mel" (``[B, n_mels, frames]``) or "latent"."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        lat = self.sample_latents(captions, num_inference_steps, guidance_scale, seed, **kwargs)
        if output == "latent":
            return lat
        mel = self.latents_to_mel(lat)
        if output == "mel":
            return mel
        if output != "audio":
            raise ValueError(f"output must be 'audio', 'mel' or 'latent', got {output!r}")
        return [w.numpy().astype(np.float32) for w in self.mel_to_audio(mel)]
