"""The mel front end of a latent text-to-audio model, at the settings of ``audio_config.json``.

Audio -> (optionally peak-normalised) -> magnitude mel (torchaudio MelSpectrogram, Slaney mel scale
and norm) -> log, cropped to ``frames`` columns; back through torchaudio's InverseMelScale +
GriffinLim (a model with a HiFi-GAN vocoder uses that instead). Two published recipes share it:

* SoundWorld: ``log(mel + log_offset)`` of the raw waveform;
* Tango / AudioLDM: ``log(clamp(mel, log_offset))`` of the waveform normalised as Tango's data
  loader does (minus its mean, divided by its peak, times 0.5), n_fft 1024, hop 160, 64 mels 0-8 kHz.

Everything that turns audio into the model's features (the generator, SoundWorld's oracle and
CLAP) goes through :func:`log_mel`, so one module owns them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


VOCODERS = ("griffin_lim", "hifigan")
LOG_MODES = ("offset", "clamp")  # log(mel + log_offset) | log(clamp(mel, min=log_offset))
MEL_LAYOUTS = ("mel_first", "time_first")  # the VAE reads [B, 1, n_mels, frames] | [B, 1, frames, n_mels]


@dataclass(frozen=True)
class AudioConfig:
    """The fields of ``audio_config.json`` (docs/model_layout.md)."""

    sample_rate: int = 16_000
    n_fft: int = 1024
    hop_length: int = 500
    win_length: int = 1024
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    mel_scale: str = "slaney"
    log_offset: float = 1e-5
    clip_seconds: float = 2.0
    vocoder: str = "griffin_lim"
    griffin_lim_iters: int = 32
    log_mode: str = "offset"
    normalize_waveform: bool = False
    mel_layout: str = "mel_first"

    def __post_init__(self):
        for name, valid in (("vocoder", VOCODERS), ("log_mode", LOG_MODES), ("mel_layout", MEL_LAYOUTS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"audio_config.{name}: {getattr(self, name)!r} is not one of {valid}")

    @property
    def frames(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate / self.hop_length))

    @property
    def samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "AudioConfig":
        data = json.loads(Path(path).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@lru_cache(maxsize=4)
def _mel(cfg: AudioConfig):
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels, power=1.0, norm="slaney", mel_scale=cfg.mel_scale)


@lru_cache(maxsize=4)
def _inverse(cfg: AudioConfig):
    import torchaudio

    inv_mel = torchaudio.transforms.InverseMelScale(
        n_stft=cfg.n_fft // 2 + 1, n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, f_min=cfg.f_min,
        f_max=cfg.f_max, norm="slaney", mel_scale=cfg.mel_scale)
    gl = torchaudio.transforms.GriffinLim(n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
                                          power=1.0, n_iter=cfg.griffin_lim_iters)
    return inv_mel, gl


def fit_length(audio: torch.Tensor, n: int) -> torch.Tensor:
    """Crop or zero-pad the last axis to ``n`` samples."""
    if audio.shape[-1] >= n:
        return audio[..., :n]
    return torch.nn.functional.pad(audio, (0, n - audio.shape[-1]))


def normalize_peak(audio: torch.Tensor) -> torch.Tensor:
    """Tango's loudness normalisation of each clip: minus its mean, divided by its peak, times 0.5."""
    audio = audio - audio.mean(dim=-1, keepdim=True)
    return 0.5 * audio / (audio.abs().amax(dim=-1, keepdim=True) + 1e-8)


def prepare_waveform(audio: np.ndarray | torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """``[..., samples]`` -> the clip the mel is taken of: cropped/zero-padded to ``clip_seconds``;
    with ``normalize_waveform`` normalised before (over the whole clip given, as Tango's loader
    does) and its peak set to 0.5 again after (a no-op unless the crop removed the peak)."""
    x = torch.as_tensor(np.asarray(audio), dtype=torch.float32)
    if not cfg.normalize_waveform:
        return fit_length(x, cfg.samples)
    x = fit_length(normalize_peak(x), cfg.samples)
    return (0.5 * x / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)).clamp(-1.0, 1.0)


def log_mel(audio: np.ndarray | torch.Tensor, cfg: AudioConfig = AudioConfig(), prepared: bool = False) -> torch.Tensor:
    """``[..., samples]`` -> ``[..., n_mels, frames]`` log-mel of :func:`prepare_waveform`'s clip
    (``prepared``: ``audio`` already is that clip)."""
    x = torch.as_tensor(np.asarray(audio), dtype=torch.float32) if prepared else prepare_waveform(audio, cfg)
    with torch.no_grad():
        mel = _mel(cfg)(x)[..., : cfg.frames]
    return torch.log(mel + cfg.log_offset) if cfg.log_mode == "offset" else torch.log(mel.clamp_min(cfg.log_offset))


def mel_from_log(logmel: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """The magnitude mel a log-mel of :func:`log_mel` came from (the inverse of its log)."""
    mel = logmel.float().exp()
    return (mel - cfg.log_offset).clamp_min(0.0) if cfg.log_mode == "offset" else mel


def griffin_lim(logmel: torch.Tensor, cfg: AudioConfig = AudioConfig(), seed: int = 0) -> torch.Tensor:
    """``[..., n_mels, frames]`` log-mel -> ``[..., samples]`` waveform (peak <= 0.99).

    Griffin-Lim starts from random phases; the torch RNG is seeded per spectrogram, so a given
    mel always gives the same waveform, whatever else is in the batch.
    """
    inv_mel, gl = _inverse(cfg)
    mel = mel_from_log(logmel, cfg)
    flat = mel.reshape(-1, *mel.shape[-2:])
    state = torch.random.get_rng_state()
    try:
        with torch.no_grad():
            waves = []
            for item in flat:
                torch.manual_seed(seed)
                waves.append(gl(inv_mel(item)))
            wave = torch.stack(waves).reshape(*mel.shape[:-2], -1)
    finally:
        torch.random.set_rng_state(state)
    wave = fit_length(wave, cfg.samples)
    peak = wave.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
    return wave * torch.where(peak > 0.99, 0.99 / peak, torch.ones_like(peak))
