"""What the builder generates with and scores with, behind two small protocols.

A *generator* has ``id`` (dict recorded in the manifest), ``media`` ("audio" or "image"),
``sample_rate`` (audio) and ``generate(prompts, seeds) -> list`` returning one float32 waveform
or PIL image per prompt, where sample ``i`` depends only on ``(prompts[i], seeds[i])`` — batch
composition never changes a sample, which is what makes a resumed build equal an uninterrupted one.

A *scorer* has ``id`` and ``score(texts, media, sample_rate) -> np.ndarray`` of per-item scores
(higher = better match of ``media[i]`` to ``texts[i]``).

Built in: generators ``soundworld`` / ``tango`` (the Tango-shaped layout of docs/model_layout.md),
``audioldm``, ``audioldm2``, ``sd15``, ``sdxl`` (diffusers pipelines through
:func:`diffdpo.diffusion.models.load_backbone`); scorers ``clap:<backend>`` (any CLAP backend of
:mod:`diffdpo.metrics.clap`) and ``clip`` (CLIP score). Either may also be ``"module:attr"``, a
factory called with the config section.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Generator(Protocol):
    """Prompts + seeds -> media, batched; sample ``i`` depends only on ``(prompts[i], seeds[i])``."""

    id: dict
    media: str  # "audio" or "image"
    sample_rate: int | None

    def generate(self, prompts: list[str], seeds: list[int]) -> list: ...


@runtime_checkable
class Scorer(Protocol):
    """Texts + media -> one score per item (higher = ``media[i]`` matches ``texts[i]`` better)."""

    id: dict

    def score(self, texts: list[str], media: list, sample_rate: int | None) -> np.ndarray: ...


def _import(path: str):
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"{path!r}: expected 'module:attr'")
    return getattr(importlib.import_module(module), attr)


class TangoLayoutGenerator:
    """A Tango / Tango 2 checkpoint folder as published, or any folder in docs/model_layout.md's layout."""

    media = "audio"

    def __init__(self, path: str | None, num_inference_steps: int, guidance_scale: float, batch_size: int):
        from diffdpo.diffusion.tango.pipeline import TangoPipeline
        from diffdpo.metrics.fingerprint import sha256_dir

        if not path:
            raise ValueError("generator.path: the tango generator needs a local model folder")
        self.pipe = TangoPipeline.from_pretrained(path)
        self.steps, self.guidance, self.batch_size = num_inference_steps, guidance_scale, batch_size
        self.sample_rate = int(self.pipe.audio_config.sample_rate)
        self.id = {"kind": "tango-layout", "path": path, "hash": sha256_dir(path)}

    def generate(self, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        return self.pipe(list(prompts), num_inference_steps=self.steps, guidance_scale=self.guidance,
                         seed=list(seeds), batch_size=self.batch_size, output="audio")


class DiffusersGenerator:
    """A diffusers pipeline of a family the trainer loads; one torch.Generator per sample."""

    def __init__(self, family: str, path: str, num_inference_steps: int, guidance_scale: float,
                 audio_seconds: float = 10.0):
        import torch

        from diffdpo.diffusion.models import load_backbone

        self.backbone = load_backbone(family, path, audio_seconds=audio_seconds)
        self.media = self.backbone.media
        self.sample_rate = self.backbone.sample_rate if self.media == "audio" else None
        self.steps, self.guidance, self.audio_seconds = num_inference_steps, guidance_scale, audio_seconds
        self._torch = torch
        self.id = {"kind": family, "path": path}
        if Path(path).is_dir():
            from diffdpo.metrics.fingerprint import sha256_dir

            self.id["hash"] = sha256_dir(path)

    def generate(self, prompts: list[str], seeds: list[int]) -> list:
        generators = [self._torch.Generator().manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = {"num_inference_steps": self.steps, "guidance_scale": self.guidance,
                                  "generator": generators}
        if self.media == "audio":
            kwargs.update(audio_length_in_s=self.audio_seconds, output_type="np")
            return [np.asarray(a, dtype=np.float32).reshape(-1) for a in self.backbone.pipe(list(prompts), **kwargs).audios]
        return list(self.backbone.pipe(list(prompts), **kwargs).images)


class ClapScorer:
    def __init__(self, backend: str, ckpt: str | None = None, batch_size: int = 32):
        from diffdpo.metrics.clap import get_clap_backend

        self.embedder = get_clap_backend(backend, ckpt) if ckpt else get_clap_backend(backend)
        self.batch_size = batch_size
        self.id = {"kind": "clap", **self.embedder.describe()}

    def score(self, texts: list[str], media: list, sample_rate: int) -> np.ndarray:
        from diffdpo.metrics.clap import clap_cosines

        return clap_cosines(self.embedder, texts, media, sample_rate, batch_size=self.batch_size)


class ClipScorer:
    def __init__(self, ckpt: str, batch_size: int = 32):
        from diffdpo.metrics.image import ClipEmbedder

        self.embedder = ClipEmbedder(ckpt)
        self.batch_size = batch_size
        self.id = {"kind": "clip", **self.embedder.describe()}

    def score(self, texts: list[str], media: list, sample_rate=None) -> np.ndarray:
        from diffdpo.metrics.image import clip_cosines

        out = []
        for s in range(0, len(texts), self.batch_size):
            t = self.embedder.embed_text(texts[s:s + self.batch_size])
            i = self.embedder.embed_images(media[s:s + self.batch_size])
            out.append(clip_cosines(t, i))
        return np.concatenate(out)


# Generators of the worlds built on this layer, named lazily so that nothing here imports them.
WORLD_GENERATORS = {"soundworld": "diffdpo.worlds.soundworld:base_generator"}


def make_generator(config) -> Any:
    kind = config.kind
    if ":" in kind:
        return _import(kind)(config)
    if kind in WORLD_GENERATORS:
        return _import(WORLD_GENERATORS[kind])(config)
    if kind == "tango":
        return TangoLayoutGenerator(config.path, config.num_inference_steps, config.guidance_scale, config.batch_size)
    if kind in ("audioldm", "audioldm2", "sd15", "sdxl"):
        if not config.path:
            raise ValueError(f"generator.path: the {kind} generator needs a hub id or local directory")
        return DiffusersGenerator(kind, config.path, config.num_inference_steps, config.guidance_scale,
                                  config.audio_seconds)
    raise ValueError(f"generator.kind: unknown {kind!r}; valid: soundworld, tango, audioldm, audioldm2, sd15, "
                     "sdxl or 'module:attr'")


def make_scorer(config) -> Any:
    kind = config.kind
    if kind.startswith("clap:"):
        return ClapScorer(kind.split(":", 1)[1], config.ckpt, config.batch_size)
    if kind == "clip":
        if not config.ckpt:
            raise ValueError("scorer.ckpt: the clip scorer needs a local CLIP model directory")
        return ClipScorer(config.ckpt, config.batch_size)
    if ":" in kind:
        return _import(kind)(config)
    raise ValueError(f"scorer.kind: unknown {kind!r}; valid: clap:<backend>, clip or 'module:attr'")


def describe(obj) -> dict:
    return dict(obj.id) if isinstance(getattr(obj, "id", None), dict) else {"repr": repr(obj)}


