"""What the UNet reads, per pair: VAE latents of winner and loser, and the prompt's condition (per
unpaired sample: its one latent and its prompt's condition).

:class:`Encoded` either holds everything precomputed (``cache=True``: a pre-pass writes one
safetensors file per (model, data, settings) key and any later run over the same data loads it
instead of re-encoding), or encodes on demand each step (``cache=False``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from diffdpo.diffusion.data import Pair, Sample
from diffdpo.diffusion.models import Backbone


def stack_conditions(conds: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-prompt conditions ``[1, ...]`` into ``[B, ...]``, right-padding sequence
    dims with zeros (masks pad with 0, so padded positions are ignored)."""
    out = {}
    for key in conds[0]:
        items = [c[key] for c in conds]
        if items[0].ndim >= 2:
            longest = max(t.shape[1] for t in items)
            items = [torch.nn.functional.pad(t, [0, 0] * (t.ndim - 2) + [0, longest - t.shape[1]]) for t in items]
        out[key] = torch.cat(items)
    return out


def repeat_for_pair(cond: dict[str, Tensor]) -> dict[str, Tensor]:
    """The condition of winners then losers: the same rows twice."""
    return {k: torch.cat([v, v]) for k, v in cond.items()}


class Encoded:
    """Latents and prompt conditions of a pair set (or of unpaired samples), cached or computed on demand."""

    def __init__(self, backbone: Backbone, pairs: list[Pair] | list[Sample], cache_path: Path | None = None,
                 batch_size: int = 8, show_progress: bool = True):
        self.backbone, self.pairs = backbone, pairs
        self.prompts = sorted({p.prompt for p in pairs} | {""})
        self.prompt_index = {p: i for i, p in enumerate(self.prompts)}
        self.latents: Tensor | None = None
        self.conds: list[dict[str, Tensor]] | None = None
        if cache_path is not None:
            self._load_or_build(cache_path, batch_size, show_progress)

    # ---------------------------------------------------------------- cache
    def _load_or_build(self, path: Path, batch_size: int, show_progress: bool) -> None:
        if path.is_file():
            data = load_file(path)
            self.latents = data["latents"]
            if self.latents.shape[0] != len(self.pairs):
                raise ValueError(f"{path}: cache holds {self.latents.shape[0]} pairs, data has {len(self.pairs)}")
            keys = json.loads(path.with_suffix(".json").read_text())["cond_keys"]
            self.conds = [{k: data[f"cond/{i}/{k}"] for k in keys} for i in range(len(self.prompts))]
            return
        lat = []
        for s in tqdm(range(0, len(self.pairs), batch_size), desc="encoding latents", disable=not show_progress):
            lat.append(self.encode_latents(list(range(s, min(len(self.pairs), s + batch_size)))).cpu())
        self.latents = torch.cat(lat)
        self.conds = [{k: v.cpu() for k, v in self.backbone.encode_prompt(p).items()} for p in self.prompts]
        tensors = {"latents": self.latents.contiguous()}
        for i, c in enumerate(self.conds):
            tensors.update({f"cond/{i}/{k}": v.contiguous() for k, v in c.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp)
        path.with_suffix(".json").write_text(json.dumps({"cond_keys": list(self.conds[0]), "prompts": self.prompts}))
        tmp.replace(path)

    # ---------------------------------------------------------------- access
    @torch.no_grad()
    def encode_latents(self, indices: list[int]) -> Tensor:
        """``[b, 2, C, H, W]`` latents of (winner, loser), or ``[b, 1, C, H, W]`` of samples, encoded now."""
        media = [self.backbone.load_media(m) for i in indices for m in self.pairs[i].sides]
        device = self.backbone.vae.device
        lat = self.backbone.media_to_latents(torch.stack(media).to(device))
        return lat.view(len(indices), len(media) // len(indices), *lat.shape[1:])

    def pair_latents(self, indices: list[int]) -> tuple[Tensor, ...]:
        """``(winners, losers)`` of pairs, or ``(samples,)``: each ``[b, C, H, W]``."""
        lat = self.latents[indices] if self.latents is not None else self.encode_latents(indices)
        return lat.unbind(1)

    def condition(self, prompt: str) -> dict[str, Tensor]:
        if self.conds is not None:
            return self.conds[self.prompt_index[prompt]]
        return self.backbone.encode_prompt(prompt)

    def conditions(self, indices: list[int], drop: list[bool]) -> dict[str, Tensor]:
        """``[b, ...]`` conditions of pairs ``indices``; a dropped pair gets the empty prompt's."""
        return stack_conditions([self.condition("" if d else self.pairs[i].prompt) for i, d in zip(indices, drop)])
