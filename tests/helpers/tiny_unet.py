"""The tiny SD-shaped UNet the diffusion loss tests run on, and a reference that differs from it."""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4,
                                block_out_channels=(8, 16), cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()


def perturbed(unet: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A reference that differs from the policy, so the loss is not log 2."""
    other = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other
