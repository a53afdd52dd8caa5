"""TangoFlux-style text-to-audio flow matching: a diffusers ``FluxTransformer2DModel`` over the latents of Stable
Audio Open's VAE (diffusers ``AutoencoderOobleck``), conditioned on FLAN-T5 states and the clip's duration.

TangoFlux (Hung et al. 2024, arXiv:2412.21037; code https://github.com/declare-lab/TangoFlux, weights
https://huggingface.co/declare-lab/TangoFlux) is not a diffusers pipeline folder. Its hub repository holds

* ``config.json`` — TangoFlux's own keys (carried verbatim in ``published/tangoflux/config.json``, sources in
  ``published/tangoflux/SOURCES.md``);
* ``tangoflux.safetensors`` — one state dict: ``transformer.*`` (a diffusers ``FluxTransformer2DModel``),
  ``text_encoder.*`` (a transformers ``T5EncoderModel``; the tied alias ``encoder.embed_tokens.weight`` is not
  stored, ``shared.weight`` is), and the two small modules TangoFlux adds: ``fc.0.{weight,bias}`` (the pooled
  text projection) and ``duration_emebdder.time_positional_embedding.{0.weights,1.weight,1.bias}`` (sic: the
  duration embedding);
* ``vae.safetensors`` — an ``AutoencoderOobleck`` at its default config (= Stable Audio Open 1.0's ``vae``).

This module reads and writes exactly that layout: :data:`CONDITIONER_KEYS` maps the two small modules' published
names onto :class:`TangoFluxConditioner`; the rest are the diffusers / transformers names behind a prefix. So a
folder from ``hf download declare-lab/TangoFlux`` loads as it is, and a model fine-tuned here is written back as
files TangoFlux's own inference class reads. FLAN-T5's tokenizer and config come from ``text_encoder_name`` (a hub
id in the Hugging Face cache, or a folder; relative to the checkpoint folder first), as TangoFlux reads them.

The conditioning, as TangoFlux describes and computes it (written here from that description, not copied: the
repository's code and model are under its non-commercial LICENSE.md):

* text: T5 states of the prompt (at most 64 tokens in training), *and* one extra token: the duration embedding
  ``Linear([u, sin(2 pi u w), cos(2 pi u w)])`` of ``u = clamp(seconds, 0, max_duration) / max_duration`` with
  128 learnt frequencies ``w``, at the T5 width;
* pooled: ``ReLU(Linear(mean of the T5 states over the prompt's tokens))``, the transformer's
  ``pooled_projections``;
* audio: VAE latents ``[B, 64, T]`` read as a sequence ``[B, T, 64]`` (no 2x2 packing), rotary ids = the frame
  index on all three axes, text ids zero; timestep ``sigma * 1000`` fed as ``t / 1000``; no guidance embedding
  (classifier-free guidance by a second, empty-prompt pass).

Training draws sigma from ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)`` (shift 1) at
logit-normal(0, 1) indices, target ``noise - latents``: the trainer's flow-matching objective as it is.

Where this differs from TangoFlux's code, on purpose: a batch whose prompts tokenize to different lengths is
right-padded and the padded text tokens are masked out of the joint attention, so a sample's prediction does not
depend on its batch mates (TangoFlux feeds T5's pad-position states unmasked; at one prompt per batch, as its
inference runs, the two agree). Latents are the VAE posterior mean (TangoFlux samples the posterior).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from diffdpo.diffusion.models import Backbone, _open

PUBLISHED = Path(__file__).resolve().parent / "published" / "tangoflux"
PUBLISHED_CONFIG = PUBLISHED / "config.json"
SAO_VAE_CONFIG = PUBLISHED / "stable_audio_open_vae_config.json"

WEIGHTS, VAE_WEIGHTS, CONFIG = "tangoflux.safetensors", "vae.safetensors", "config.json"
MAX_TEXT_TOKENS = 64     # TangoFlux tokenizes training prompts to at most 64 tokens
FOURIER_DIM = 256        # duration embedding: 128 frequencies -> [u, 128 sines, 128 cosines]
# published name -> TangoFluxConditioner name
CONDITIONER_KEYS = {
    "fc.0.weight": "pooled_proj.weight",
    "fc.0.bias": "pooled_proj.bias",
    "duration_emebdder.time_positional_embedding.0.weights": "duration_frequencies",
    "duration_emebdder.time_positional_embedding.1.weight": "duration_proj.weight",
    "duration_emebdder.time_positional_embedding.1.bias": "duration_proj.bias",
}
TIED_T5_KEY = "encoder.embed_tokens.weight"  # alias of shared.weight, absent from the published file
# diffdpo's own key in config.json: the VAE config when it is not AutoencoderOobleck's default (tiny models only;
# the published file has no such key and TangoFlux builds AutoencoderOobleck() with its defaults)
VAE_CONFIG_KEY = "diffdpo_vae_config"


class TangoFluxConditioner(nn.Module):
    """The two small modules TangoFlux adds around the transformer: the pooled text projection and the duration
    embedding (one extra token at the T5 width appended to the prompt's states)."""

    def __init__(self, text_dim: int, joint_dim: int, max_duration: float, fourier_dim: int = FOURIER_DIM):
        super().__init__()
        if fourier_dim % 2:
            raise ValueError(f"fourier_dim {fourier_dim} must be even")
        self.max_duration = float(max_duration)
        self.pooled_proj = nn.Linear(text_dim, joint_dim)
        self.duration_frequencies = nn.Parameter(torch.randn(fourier_dim // 2))
        self.duration_proj = nn.Linear(fourier_dim + 1, text_dim)

    def pooled(self, states: Tensor, mask: Tensor) -> Tensor:
        """``ReLU(W mean + b)`` of the states over the tokens ``mask`` marks: ``[B, joint_dim]``."""
        m = mask.to(states.dtype).unsqueeze(-1)
        mean = (states * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.relu(self.pooled_proj(mean))

    def duration(self, seconds: Tensor) -> Tensor:
        """The duration token ``[B, 1, text_dim]`` of clip lengths ``seconds`` ``[B]``."""
        u = seconds.float().clamp(0.0, self.max_duration) / self.max_duration
        u = u.to(self.duration_frequencies.dtype).unsqueeze(-1)
        angles = 2 * math.pi * u * self.duration_frequencies
        features = torch.cat([u, angles.sin(), angles.cos()], dim=-1)
        return self.duration_proj(features).unsqueeze(1)


def _resolve_text_encoder(folder: Path, name: str) -> str:
    local = folder / name
    return str(local) if local.is_dir() else name


class TangoFluxPipeline:
    """Tokenizer + T5 encoder + conditioner + transformer + Oobleck VAE + flow-matching Euler scheduler, loaded from
    (and saved to) TangoFlux's published files. ``pipe(prompts)`` samples waveforms as TangoFlux does."""

    def __init__(self, tokenizer, text_encoder, transformer, vae, scheduler, conditioner: TangoFluxConditioner,
                 config: dict):
        self.tokenizer, self.text_encoder, self.transformer = tokenizer, text_encoder, transformer
        self.vae, self.scheduler, self.conditioner, self.config = vae, scheduler, conditioner, dict(config)
        self.text_encoder_source: str | None = None  # folder the tokenizer/config came from, when it is local

    # ------------------------------------------------------------------ properties
    @property
    def audio_seq_len(self) -> int:
        return int(self.config.get("audio_seq_len", 645))

    @property
    def max_duration(self) -> float:
        return float(self.config.get("max_duration", 30))

    @property
    def sample_rate(self) -> int:
        return int(self.vae.config.sampling_rate)

    @property
    def hop(self) -> int:
        return int(np.prod(self.vae.config.downsampling_ratios))

    @property
    def window_samples(self) -> int:
        """Samples every clip is zero-padded to before encoding: ``max_duration`` seconds (TangoFlux pads to 30 s)."""
        return int(self.max_duration * self.sample_rate)

    # ------------------------------------------------------------------ building and loading
    @staticmethod
    def build_modules(config: dict, t5_config, vae_config: dict | None = None):
        """``(text_encoder, transformer, vae, conditioner)`` with random weights, as TangoFlux sizes them from its
        config: the transformer's ``pooled_projection_dim`` is the T5 width and its ``joint_attention_dim`` must be
        too (the T5 states enter the transformer unprojected)."""
        from diffusers import AutoencoderOobleck, FluxTransformer2DModel
        from transformers import T5EncoderModel

        text_dim = int(t5_config.d_model)
        joint = int(config.get("joint_attention_dim", 1024))
        if joint != text_dim:
            raise ValueError(f"config.json: joint_attention_dim {joint} must equal the text encoder's width "
                             f"d_model {text_dim} (TangoFlux feeds the T5 states to the transformer unprojected)")
        transformer = FluxTransformer2DModel(
            in_channels=int(config.get("in_channels", 64)), num_layers=int(config.get("num_layers", 6)),
            num_single_layers=int(config.get("num_single_layers", 18)),
            attention_head_dim=int(config.get("attention_head_dim", 128)),
            num_attention_heads=int(config.get("num_attention_heads", 8)), joint_attention_dim=joint,
            pooled_projection_dim=text_dim, guidance_embeds=False)
        vae = AutoencoderOobleck(**(vae_config or {}))
        if transformer.config.in_channels != vae.config.decoder_input_channels:
            raise ValueError(f"config.json: in_channels {transformer.config.in_channels} != the VAE's latent "
                             f"channels {vae.config.decoder_input_channels}")
        conditioner = TangoFluxConditioner(text_dim, joint, float(config.get("max_duration", 30)))
        return T5EncoderModel(t5_config), transformer, vae, conditioner

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "TangoFluxPipeline":
        """Load a folder in TangoFlux's published layout (see the module docstring)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from safetensors.torch import load_file
        from transformers import T5Config, T5TokenizerFast

        from diffdpo.diffusion.hub import from_pretrained

        folder = Path(folder)
        missing = [f for f in (CONFIG, WEIGHTS, VAE_WEIGHTS) if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: not a TangoFlux checkpoint folder, missing {missing} (download one "
                                    f"with: hf download declare-lab/TangoFlux --local-dir models/TangoFlux)")
        config = json.loads((folder / CONFIG).read_text())
        source = _resolve_text_encoder(folder, config.get("text_encoder_name", "google/flan-t5-large"))
        setting = f"{folder / CONFIG} text_encoder_name"
        tokenizer = from_pretrained(T5TokenizerFast, source, setting=setting)
        t5_config = from_pretrained(T5Config, source, setting=setting)
        text_encoder, transformer, vae, conditioner = cls.build_modules(config, t5_config, config.get(VAE_CONFIG_KEY))
        parts = split_published_state(load_file(folder / WEIGHTS))
        _load(transformer, parts["transformer"], "transformer")
        _load(conditioner, parts["conditioner"], "conditioner")
        _load(text_encoder, parts["text_encoder"], "text_encoder", optional={TIED_T5_KEY})
        text_encoder.encoder.embed_tokens = text_encoder.shared  # the published file stores only shared.weight
        _load(vae, load_file(folder / VAE_WEIGHTS), "vae")
        pipe = cls(tokenizer, text_encoder, transformer, vae, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
                   conditioner, config)
        pipe.text_encoder_source = source if Path(source).is_dir() else None
        for module in (text_encoder, transformer, vae, conditioner):
            if dtype != torch.float32:
                module.to(dtype)
            module.eval()
        for module in (text_encoder, vae, conditioner):  # frozen; the transformer is what trains
            module.requires_grad_(False)
        return pipe

    def save_pretrained(self, path: str | Path) -> None:
        """``config.json``, ``tangoflux.safetensors`` and ``vae.safetensors`` in the published names; a local
        tokenizer/T5-config folder named by ``text_encoder_name`` is copied beside them."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = published_state(self.transformer, self.text_encoder, self.conditioner)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path / WEIGHTS)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.vae.state_dict().items()}, path / VAE_WEIGHTS)
        config = dict(self.config)
        name = config.get("text_encoder_name", "google/flan-t5-large")
        if self.text_encoder_source is not None and not Path(name).is_absolute():
            target = path / name
            if target.resolve() != Path(self.text_encoder_source).resolve():
                shutil.copytree(self.text_encoder_source, target, dirs_exist_ok=True)
        (path / CONFIG).write_text(json.dumps(config))

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None) -> None:
        """A ``pytorch_lora_weights.safetensors`` with ``transformer.`` keys (as ``FluxPipeline.save_lora_weights``
        writes it) onto the transformer."""
        path = Path(path)
        folder, name = (path, "pytorch_lora_weights.safetensors") if path.is_dir() else (path.parent, path.name)
        self.transformer.load_lora_adapter(str(folder), weight_name=name, use_safetensors=True, prefix="transformer",
                                           adapter_name=adapter_name)

    # ------------------------------------------------------------------ conditions
    @torch.no_grad()
    def encode_text(self, prompts: list[str], max_length: int = MAX_TEXT_TOKENS) -> tuple[Tensor, Tensor]:
        """T5 states ``[B, L, d]`` and token mask ``[B, L]`` (bool), padded to the longest prompt."""
        device = self.text_encoder.device
        batch = self.tokenizer(list(prompts), max_length=max_length, padding=True, truncation=True,
                               return_tensors="pt")
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        return self.text_encoder(input_ids=ids, attention_mask=mask)[0], mask.bool()

    @torch.no_grad()
    def condition(self, prompts: list[str], seconds: float | Tensor,
                  max_length: int = MAX_TEXT_TOKENS) -> dict[str, Tensor]:
        """``encoder_hidden_states`` (T5 states + the duration token), their mask, and ``pooled_projections``."""
        states, mask = self.encode_text(prompts, max_length)
        b = states.shape[0]
        seconds = torch.as_tensor(seconds, dtype=torch.float32, device=states.device).reshape(-1).expand(b)
        duration = self.conditioner.duration(seconds).to(states.dtype)
        return {"encoder_hidden_states": torch.cat([states, duration], dim=1),
                "encoder_attention_mask": torch.cat([mask, mask.new_ones(b, 1)], dim=1),
                "pooled_projections": self.conditioner.pooled(states, mask).to(states.dtype)}

    @staticmethod
    def velocity(transformer, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The transformer's velocity for sequence latents ``[B, T, C]`` at scheduler timesteps (0..1000)."""
        b, frames, _ = latents.shape
        states = cond["encoder_hidden_states"]
        mask = cond.get("encoder_attention_mask")
        kwargs = {}
        if mask is not None and not bool(mask.all()):  # padded prompts: keep their padding out of the attention
            joint = torch.cat([mask.bool(), mask.new_ones(b, frames, dtype=torch.bool)], dim=1)
            kwargs["joint_attention_kwargs"] = {"attention_mask": joint[:, None, None, :]}
        audio_ids = torch.arange(frames, device=latents.device, dtype=latents.dtype)[:, None].expand(frames, 3)
        timesteps = timesteps.to(latents.dtype).reshape(-1).expand(b)
        return transformer(hidden_states=latents, timestep=timesteps / 1000, guidance=None,
                           pooled_projections=cond["pooled_projections"], encoder_hidden_states=states,
                           txt_ids=torch.zeros(states.shape[1], 3, device=latents.device, dtype=latents.dtype),
                           img_ids=audio_ids, **kwargs).sample

    # ------------------------------------------------------------------ audio
    @torch.no_grad()
    def encode_audio(self, waves: Tensor) -> Tensor:
        """Sequence latents ``[B, T, C]`` (VAE posterior mean) of waveforms ``[B, channels, samples]``."""
        lat = self.vae.encode(waves.to(self.vae.device, self.vae.dtype)).latent_dist.mean.transpose(1, 2)
        if lat.shape[1] != self.audio_seq_len:
            raise ValueError(f"{waves.shape[-1]} samples gave {lat.shape[1]} latent frames; the model reads "
                             f"audio_seq_len {self.audio_seq_len} (clips are padded to {self.window_samples})")
        return lat

    @torch.no_grad()
    def decode_audio(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents.transpose(1, 2).to(self.vae.dtype)).sample

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, num_inference_steps: int = 25, guidance_scale: float = 4.5,
                 duration: float = 10.0, seed: int = 0) -> list[np.ndarray]:
        """Waveforms ``[channels, duration * sample_rate]`` (float32): Euler steps of the flow from noise at
        sigmas ``linspace(1, 1/N, N)``, classifier-free guidance against the empty prompt when ``guidance_scale``
        > 1 (TangoFlux's defaults: 25 steps, guidance 4.5; its README finds 50 steps best)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from diffdpo.diffusion.encode import stack_conditions

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n, device = len(prompts), self.transformer.device
        dtype = self.transformer.dtype
        cond = self.condition(prompts, duration, max_length=self.tokenizer.model_max_length)
        cfg = guidance_scale > 1.0
        if cfg:
            empty = self.condition([""] * n, duration)
            cond = stack_conditions([cond, empty])
        cond = {k: v.to(device) if v.dtype == torch.bool else v.to(device, dtype) for k, v in cond.items()}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist(),
                                device=device)
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(n, self.audio_seq_len, self.transformer.config.in_channels, generator=gen)
        latents = latents.to(device, dtype)
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if cfg else latents
            v = self.velocity(self.transformer, x, t.expand(x.shape[0]), cond)
            if cfg:
                cond_v, uncond_v = v.chunk(2)
                v = uncond_v + guidance_scale * (cond_v - uncond_v)
            latents = scheduler.step(v, t, latents).prev_sample
        waves = self.decode_audio(latents).float().cpu()
        end = int(round(duration * self.sample_rate))
        return [w[:, :end].numpy() for w in waves]


# ---------------------------------------------------------------------- the published key layout


def split_published_state(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``tangoflux.safetensors`` keys by module: ``transformer.*`` and ``text_encoder.*`` with their prefix removed,
    the conditioner's renamed by :data:`CONDITIONER_KEYS`; any other key is an error."""
    parts: dict[str, dict[str, Tensor]] = {"transformer": {}, "text_encoder": {}, "conditioner": {}}
    unknown = []
    for key, value in state.items():
        if key in CONDITIONER_KEYS:
            parts["conditioner"][CONDITIONER_KEYS[key]] = value
        elif key.startswith(("transformer.", "text_encoder.")):
            prefix, rest = key.split(".", 1)
            parts[prefix][rest] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{WEIGHTS}: keys of no TangoFlux module: {sorted(unknown)[:5]} ({len(unknown)} in all)")
    return parts


def published_state(transformer, text_encoder, conditioner: TangoFluxConditioner) -> dict[str, Tensor]:
    """The inverse of :func:`split_published_state`: one state dict in TangoFlux's key names (the tied T5
    embedding alias left out, as the published file does)."""
    to_published = {v: k for k, v in CONDITIONER_KEYS.items()}
    state = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items() if k != TIED_T5_KEY})
    state.update({to_published[k]: v for k, v in conditioner.state_dict().items()})
    return state


def _load(module: nn.Module, state: dict[str, Tensor], what: str, optional: set[str] = frozenset()) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - set(optional))
    if missing or result.unexpected_keys:
        raise ValueError(f"{what}: checkpoint does not match the config: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {sorted(result.unexpected_keys)[:5]} "
                         f"({len(result.unexpected_keys)})")


# ---------------------------------------------------------------------- folders with random weights

# shrunk sizes of the tiny folder: head width 128 = the sum of diffusers' rotary axes (16, 56, 56), one head
TINY = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128, "num_attention_heads": 1,
        "joint_attention_dim": 16, "in_channels": 8, "audio_seq_len": 64, "max_duration": 0.512}
TINY_VAE = {"encoder_hidden_size": 16, "downsampling_ratios": [4, 8], "channel_multiples": [1, 2],
            "decoder_channels": 8, "decoder_input_channels": 8, "audio_channels": 2, "sampling_rate": 4000}
TINY_TEXT_ENCODER = "flan-t5-tiny"


def build_checkpoint(path: str | Path, shrink: bool = True, seed: int = 0,
                     text_encoder: str | Path | None = None) -> Path:
    """Write a random-weight checkpoint folder in TangoFlux's published layout at ``path``.

    ``shrink=True``: every width cut down (``TINY``: 64 latent frames of 0.512 s at 4 kHz, a 16-wide T5 of one
    layer), with a tiny T5 tokenizer/config in ``<path>/flan-t5-tiny`` that ``config.json`` names (``text_encoder``
    overrides it with another folder holding a T5 config and tokenizer). ``shrink=False`` keeps the published
    config (FLAN-T5-large's config and tokenizer must then be in the Hugging Face cache: ~3.4 GB of weights)."""
    from transformers import T5Config

    from diffdpo.diffusion.hub import from_pretrained

    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads(PUBLISHED_CONFIG.read_text())
    vae_config = None
    if shrink:
        config.update(TINY)
        vae_config = dict(TINY_VAE)
        config[VAE_CONFIG_KEY] = vae_config
        if text_encoder is None:
            from diffdpo.diffusion.tiny import text_encoder_folder

            text_encoder = text_encoder_folder(path / TINY_TEXT_ENCODER)
            config["text_encoder_name"] = TINY_TEXT_ENCODER
        else:
            config["text_encoder_name"] = str(text_encoder)
    t5_config = from_pretrained(T5Config, str(text_encoder or config["text_encoder_name"]),
                                setting="the text encoder")
    torch.manual_seed(seed)
    text_encoder_model, transformer, vae, conditioner = TangoFluxPipeline.build_modules(config, t5_config, vae_config)
    from safetensors.torch import save_file

    state = published_state(transformer, text_encoder_model, conditioner)
    save_file({k: v.contiguous() for k, v in state.items()}, path / WEIGHTS)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path / VAE_WEIGHTS)
    (path / CONFIG).write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------- the trainer's family adapter


class TangoFluxBackbone(Backbone):
    """The ``tangoflux`` family for :mod:`diffdpo.diffusion.trainer`: latents ``[B, T, 64]``, conditions
    ``encoder_hidden_states`` / ``encoder_attention_mask`` / ``pooled_projections`` (cacheable per prompt),
    the transformer as the trained denoiser (``unet`` in the trainer). The T5 encoder, the VAE and the conditioner
    stay frozen (TangoFlux's DPO script also updates ``fc``, the pooled projection; here it is frozen and
    its output cached with the prompt).

    ``audio_seconds`` is the clip length: audio is cropped to it, zero-padded to ``max_duration`` (TangoFlux pads
    every clip to 30 s) and the duration token says ``audio_seconds``, for every clip (TangoFlux reads a per-pair
    ``duration`` field instead; its CRPO data are 10 s clips, ``duration`` 10.0)."""

    family, media = "tangoflux", "audio"

    def __init__(self, pipe: TangoFluxPipeline, resolution: int = 512, audio_seconds: float = 10.0):
        super().__init__(pipe, resolution, audio_seconds)
        if not 0 < audio_seconds <= pipe.max_duration:
            raise ValueError(f"model.audio_seconds: {audio_seconds} must lie in (0, max_duration = "
                             f"{pipe.max_duration}] for this TangoFlux model")

    @property
    def sample_rate(self) -> int:
        return self.pipe.sample_rate

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        cond = self.pipe.condition([prompt], self.audio_seconds)
        return {k: (v if v.dtype == torch.bool else v.float()) for k, v in cond.items()}

    def predict(self, unet, noisy, timesteps, cond):
        return TangoFluxPipeline.velocity(unet, noisy, timesteps, cond)

    def _load_audio(self, path) -> Tensor:
        """``[channels, window]``: resampled, mono duplicated to stereo (as TangoFlux reads it), cropped to
        ``audio_seconds`` and zero-padded to ``max_duration``."""
        import soundfile as sf
        import torchaudio.functional as AF

        data, sr = sf.read(_open(path), dtype="float32", always_2d=True)
        wave = torch.from_numpy(np.ascontiguousarray(data.T))
        if sr != self.sample_rate:
            wave = AF.resample(wave, sr, self.sample_rate)
        channels = int(self.vae.config.audio_channels)
        if wave.shape[0] != channels:
            if wave.shape[0] != 1:
                raise ValueError(f"{path}: {wave.shape[0]} channels; the VAE reads {channels} (or mono)")
            wave = wave.expand(channels, -1)
        wave = wave[:, :int(round(self.audio_seconds * self.sample_rate))]
        return torch.nn.functional.pad(wave, (0, self.pipe.window_samples - wave.shape[1]))

    @torch.no_grad()
    def media_to_latents(self, media: Tensor) -> Tensor:
        return self.pipe.encode_audio(media.float())

    @torch.no_grad()
    def sample(self, prompts, num_inference_steps, guidance_scale, seed):
        return self.pipe(list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         duration=self.audio_seconds, seed=seed)

    def save_lora(self, path, lora_state):
        """``pytorch_lora_weights.safetensors`` with ``transformer.`` keys, written as diffusers' Flux LoRA example
        writes them (``FluxPipeline.save_lora_weights``); :meth:`TangoFluxPipeline.load_lora_weights` loads it."""
        from diffusers import FluxPipeline

        FluxPipeline.save_lora_weights(path, transformer_lora_layers=lora_state, safe_serialization=True)


def load_tangoflux(name_or_path: str) -> TangoFluxPipeline:
    """A local folder, or a hub id already in the Hugging Face cache; offline otherwise, the download command."""
    from diffdpo.diffusion.hub import OfflineModelError

    if Path(name_or_path).is_dir():
        return TangoFluxPipeline.from_pretrained(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return TangoFluxPipeline.from_pretrained(snapshot_download(name_or_path, local_files_only=True))
    except Exception as err:  # not cached (LocalEntryNotFoundError), or not a TangoFlux folder
        name = name_or_path.split("/")[-1]
        raise OfflineModelError(
            f"model {name_or_path!r}: the tangoflux family loads TangoFlux's published folder (config.json, "
            f"tangoflux.safetensors, vae.safetensors); download it with\n"
            f"    hf download {name_or_path} --local-dir models/{name}\n"
            f"and point model.name_or_path at it (models/{name}); FLAN-T5's tokenizer and config come from the "
            f"Hugging Face cache (hf download google/flan-t5-large --include '*.json' --include 'spiece.model')"
        ) from err
