"""The frozen reference model of Diffusion-DPO, in three modes (``reference.mode``):

* ``copy``          — a deep copy of the initial UNet, frozen (Salesforce DiffusionDPO, Tango 2).
* ``lora_disabled`` — the policy itself with its LoRA adapters switched off under ``no_grad``
  (the diffusers example): no second UNet in memory. Needs LoRA.
* ``cached``        — reference errors computed once, before training, with each pair's draws fixed
  across epochs (``pair_seed(seed, index, epoch=None)``); training then runs no reference forward.
  The price: a pair sees the same noise and timestep every epoch.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

REFERENCE_MODES = ("copy", "lora_disabled", "cached")


@contextmanager
def adapters_disabled(unet: nn.Module):
    """The LoRA-free base model for the duration of the block (peft via diffusers' adapter mixin)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class FrozenCopyReference:
    """A frozen deep copy of the UNet as it is now (call before any training step)."""

    def __init__(self, unet: nn.Module, dtype: torch.dtype | None = None):
        self.unet = copy.deepcopy(unet).requires_grad_(False).eval()
        if dtype is not None and dtype != torch.float32:
            self.unet.to(dtype)

    @torch.no_grad()
    def errors(self, run: Callable[[nn.Module], tuple[Tensor, Tensor]], indices: list[int]) -> tuple[Tensor, Tensor]:
        return run(self.unet)


class LoraDisabledReference:
    """The policy's base weights: the same module with its adapters disabled."""

    def __init__(self, unet: nn.Module):
        if not getattr(unet, "_hf_peft_config_loaded", False):
            raise ValueError("reference.mode=lora_disabled needs a LoRA policy (set model.lora_rank > 0)")
        self.unet = unet

    @torch.no_grad()
    def errors(self, run, indices):
        with adapters_disabled(self.unet):
            return run(self.unet)


class CachedReference:
    """Reference errors looked up by pair (or sample) index; :func:`compute_reference_errors` fills the table."""

    def __init__(self, table: Tensor):
        self.table = table  # [N, 2]: (chosen, rejected), or [N, 1] for unpaired samples

    def errors(self, run, indices):
        return self.table[torch.as_tensor(indices)].unbind(1)


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def compute_reference_errors(path: Path, n: int, batch_size: int,
                             errors_of: Callable[[list[int]], tuple[Tensor, ...]], sides: int = 2) -> Tensor:
    """``[n, sides]`` reference errors (2: a pair's winner and loser, 1: an unpaired sample), loaded
    from ``path`` when present, else computed and written atomically. ``errors_of(indices)`` must use
    the items' fixed draws."""
    if path.is_file():
        table = load_file(path)["errors"]
        if table.shape != (n, sides):
            raise ValueError(f"{path}: cached reference errors have shape {tuple(table.shape)}, "
                             f"expected ({n}, {sides})")
        return table
    rows = []
    for start in range(0, n, batch_size):
        rows.append(torch.stack(errors_of(list(range(start, min(n, start + batch_size)))), 1).float().cpu())
    table = torch.cat(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"errors": table}, tmp)
    tmp.replace(path)
    return table
