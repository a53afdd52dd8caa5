"""Load, save and sample a Tango-shaped model folder (docs/model_layout.md).

    text -> tokenizer -> T5 encoder states -> DDIM denoising of VAE latents with classifier-free
    guidance -> VAE decode -> log-mel -> vocoder (HiFi-GAN, or Griffin-Lim) -> waveform

Each component is loaded with its own library's ``from_pretrained``. The same class runs Tango /
Tango 2 (converted from their published files, or read from them directly: see
:mod:`diffdpo.diffusion.tango.checkpoint`) and SoundWorld's base model. A UNet with one more input
channel than the VAE has latents gets the time ramp (:mod:`.position`); any code that calls the
UNet directly (Diffusion-DPO training) must build its input the same way, which
:meth:`TangoPipeline.unet_forward` does. Latents are scaled as diffusers does:
``(z - shift_factor) * scaling_factor`` from ``vae/config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from diffdpo.diffusion.tango.audio import AudioConfig, griffin_lim, log_mel
from diffdpo.diffusion.tango.position import position_features, set_position_features, with_time_ramp

MODEL_INDEX = {
    "_class_name": "TangoStylePipeline",
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "vae": ["diffusers", "AutoencoderKL"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "DDPMScheduler"],
}
VOCODER_ENTRY = ["transformers", "SpeechT5HifiGan"]


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


def load_training_scheduler(folder: Path):
    """The saved training schedule: rectified flow (``FlowMatchEulerDiscreteScheduler``) when the
    config names it, else DDPM (Tango's, AudioLDM's and SoundWorld's clean and weak bases)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name")
    cls = FlowMatchEulerDiscreteScheduler if name == "FlowMatchEulerDiscreteScheduler" else DDPMScheduler
    return cls.from_pretrained(folder)


def default_sampler(training_scheduler):
    """A fresh sampler for a training schedule (``set_timesteps`` mutates it): DDIM for DDPM
    schedules (prediction type and spacing from the config), Euler for rectified flow."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(training_scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(training_scheduler.config)
    return DDIMScheduler.from_config(training_scheduler.config)


class TangoPipeline:
    """The components of a Tango-shaped model plus sampling. Inference only (``torch.no_grad``).

    ``vocoder`` is a transformers ``SpeechT5HifiGan`` when ``audio_config.vocoder`` is "hifigan"
    (Tango, AudioLDM), else None (Griffin-Lim). ``converted_from`` is what a converted model
    remembers of its source layout (written to ``model_index.json``; used to write it back)."""

    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, audio_config: AudioConfig, vocoder=None,
                 converted_from: dict | None = None):
        if (vocoder is None) != (audio_config.vocoder == "griffin_lim"):
            raise ValueError(f"audio_config.vocoder is {audio_config.vocoder!r} but a vocoder module was "
                             f"{'not ' if vocoder is None else ''}given")
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.scheduler, self.audio_config, self.vocoder = scheduler, audio_config, vocoder
        self.converted_from = converted_from

    # ------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | Path, text_encoder: str | None = None) -> "TangoPipeline":
        """A folder in docs/model_layout.md's layout, or a checkpoint folder in Tango's own layout
        (``main_config.json`` + ``pytorch_model_*.bin``), read as it is; ``text_encoder`` overrides
        where a Tango checkpoint's tokenizer and T5 config come from (default: its main_config)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import T5EncoderModel

        from diffdpo.diffusion.tango import checkpoint

        path = Path(path)
        if checkpoint.is_tango_checkpoint(path):
            return checkpoint.load_tango_checkpoint(path, text_encoder=text_encoder)
        missing = [p for p in ("model_index.json", "audio_config.json", "text_encoder", "tokenizer", "vae", "unet",
                               "scheduler") if not (path / p).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: neither a Tango-layout model folder (missing {missing}, see "
                                    "docs/model_layout.md) nor a Tango checkpoint (main_config.json + "
                                    "pytorch_model_main.bin)")
        cfg = AudioConfig.load(path / "audio_config.json")
        index = json.loads((path / "model_index.json").read_text())
        unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
        features = index.get("position_features")
        if features:  # cross-attention position features (position.PositionalCrossAttnProcessor)
            set_position_features(unet, features["query_time"], features["key_position"])
        vocoder = None
        if cfg.vocoder == "hifigan":
            from transformers import SpeechT5HifiGan

            if not (path / "vocoder").is_dir():
                raise FileNotFoundError(f"{path}: audio_config.json names the hifigan vocoder but there is no vocoder/")
            vocoder = SpeechT5HifiGan.from_pretrained(path / "vocoder").eval()
        return cls(load_tokenizer(path / "tokenizer"),
                   T5EncoderModel.from_pretrained(path / "text_encoder").eval(),
                   AutoencoderKL.from_pretrained(path / "vae").eval(),
                   unet, load_training_scheduler(path / "scheduler"), cfg, vocoder,
                   index.get("converted_from"))

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the folder atomically (temporary sibling, then rename)."""
        path = Path(path)
        tmp = path.parent / f".tmp_{path.name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        features = position_features(self.unet)
        index = {**MODEL_INDEX, "scheduler": ["diffusers", type(self.scheduler).__name__],
                 **({"vocoder": VOCODER_ENTRY} if self.vocoder is not None else {}),
                 **({"position_features": features} if features else {}),
                 **({"converted_from": self.converted_from} if self.converted_from else {})}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        self.audio_config.save(tmp / "audio_config.json")
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        self.text_encoder.save_pretrained(tmp / "text_encoder")
        self.vae.save_pretrained(tmp / "vae")
        self.unet.save_pretrained(tmp / "unet")
        self.scheduler.save_pretrained(tmp / "scheduler")
        if self.vocoder is not None:
            self.vocoder.save_pretrained(tmp / "vocoder")
        _drop_load_time_keys(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------ pieces
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [B, L, D], attention_mask [B, L])``; captions longer than the tokenizer's
        ``model_max_length`` are truncated (as Tango does)."""
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt")
        device = self.text_encoder.device
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        return self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    def unet_forward(self, latents, timesteps, states, mask) -> torch.Tensor:
        """The UNet's prediction for (scaled) ``latents``, with the time ramp added where needed."""
        return self.unet(with_time_ramp(latents, self.unet.config.in_channels), timesteps,
                         encoder_hidden_states=states, encoder_attention_mask=mask).sample

    @property
    def time_first(self) -> bool:
        return self.audio_config.mel_layout == "time_first"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        mels, frames = self.audio_config.n_mels // down, self.audio_config.frames // down
        return (self.vae.config.latent_channels, *((frames, mels) if self.time_first else (mels, frames)))

    def _scale(self) -> tuple[float, float]:
        return float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)

    @torch.no_grad()
    def mel_to_latents(self, mel: torch.Tensor) -> torch.Tensor:
        """``[B, n_mels, frames]`` log-mel -> scaled latents (the posterior mean)."""
        scale, shift = self._scale()
        image = (mel.transpose(1, 2) if self.time_first else mel).unsqueeze(1)
        return (self.vae.encode(image.to(self.vae.dtype)).latent_dist.mode() - shift) * scale

    @torch.no_grad()
    def audio_to_latents(self, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[B, samples]`` waveforms at ``audio_config.sample_rate`` -> scaled latents."""
        return self.mel_to_latents(log_mel(audio, self.audio_config).to(self.vae.device))

    @torch.no_grad()
    def latents_to_mel(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> ``[B, n_mels, frames]`` log-mel."""
        scale, shift = self._scale()
        image = self.vae.decode(latents.to(self.vae.device, self.vae.dtype) / scale + shift).sample[:, 0]
        return image.transpose(1, 2) if self.time_first else image

    @torch.no_grad()
    def mel_to_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """``[B, n_mels, frames]`` log-mel -> ``[B, samples]`` waveforms."""
        if self.vocoder is None:
            return griffin_lim(mel, self.audio_config)
        return self.vocoder(mel.transpose(1, 2).to(self.vocoder.device, self.vocoder.dtype)).float().cpu().reshape(len(mel), -1)

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_latents(self, captions: list[str], num_inference_steps: int = 25, guidance_scale: float = 3.0,
                       seed: int | list[int] = 0, scheduler=None, batch_size: int = 32) -> torch.Tensor:
        """Scaled latents for ``captions``. Caption ``i`` starts from noise seeded ``seed + i``
        (or ``seed[i]``), so a sample does not depend on what else is in the batch."""
        seeds = [seed + i for i in range(len(captions))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(captions):
            raise ValueError(f"{len(seeds)} seeds for {len(captions)} captions")
        sampler = scheduler or default_sampler(self.scheduler)
        out = []
        for s in range(0, len(captions), batch_size):
            caps, sds = list(captions[s:s + batch_size]), seeds[s:s + batch_size]
            b = len(caps)
            guided = guidance_scale != 1.0
            states, mask = self.encode_text(caps + [""] * b if guided else caps)
            lat = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(x)))
                               for x in sds]).to(self.unet.device)
            lat = lat * getattr(sampler, "init_noise_sigma", 1.0)  # rectified flow starts at unit noise
            sampler.set_timesteps(num_inference_steps)
            for t in sampler.timesteps:
                inp = torch.cat([lat, lat]) if guided else lat
                if hasattr(sampler, "scale_model_input"):  # DDIM's is the identity; flow samplers have none
                    inp = sampler.scale_model_input(inp, t)
                pred = self.unet_forward(inp, t.expand(len(inp)), states, mask)
                if guided:
                    cond, uncond = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                lat = sampler.step(pred, t, lat).prev_sample
            out.append(lat.cpu())
        return torch.cat(out)

    def __call__(self, captions: list[str] | str, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 seed: int | list[int] = 0, output: str = "audio", **kwargs):
        """``output``: "audio" (list of float32 arrays), "mel" (``[B, n_mels, frames]``) or "latent"."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        lat = self.sample_latents(captions, num_inference_steps, guidance_scale, seed, **kwargs)
        if output == "latent":
            return lat
        mel = self.latents_to_mel(lat).cpu()
        if output == "mel":
            return mel
        if output != "audio":
            raise ValueError(f"output must be 'audio', 'mel' or 'latent', got {output!r}")
        return [w.cpu().numpy().astype(np.float32) for w in self.mel_to_audio(mel)]
