"""Where in time a latent audio UNet is: a time-ramp input channel and position features on
cross-attention.

A convolutional UNet with text cross-attention has no way to know where "first" and "then" are in
time, and "A then B" meets cross-attention as the same set of keys as "B then A". Two fixed,
parameter-free signals fix that (docs/soundworld.md, "The order saddle"): an extra UNet input
channel holding a ramp along time (a UNet with ``in_channels`` one more than the latents), and
position terms added to cross-attention queries and keys (:class:`PositionalCrossAttnProcessor`,
recorded in ``model_index.json`` as ``position_features``). A plain latent UNet (Tango's) has
neither and passes through untouched. Time is the last latent axis (the ``mel_first`` layout).
"""

from __future__ import annotations

import torch

TIME_RAMP_CHANNELS = 1


def with_time_ramp(latents: torch.Tensor, unet_in_channels: int) -> torch.Tensor:
    """The UNet's input: ``latents`` plus the time-ramp channel when the UNet has one.

    The number of extra channels is ``unet.config.in_channels - vae latent channels``: 0 (a plain
    latent UNet, e.g. Tango) or 1 (SoundWorld's ramp along the last, time, axis).
    """
    extra = unet_in_channels - latents.shape[1]
    if extra == 0:
        return latents
    if extra != TIME_RAMP_CHANNELS:
        raise ValueError(f"UNet expects {unet_in_channels} input channels, latents have {latents.shape[1]}: "
                         f"only 0 or {TIME_RAMP_CHANNELS} (time ramp) extra channels are understood")
    b, _, h, w = latents.shape
    ramp = torch.linspace(-1.0, 1.0, w, dtype=latents.dtype, device=latents.device)
    return torch.cat([latents, ramp.expand(b, 1, h, w)], dim=1)


class PositionalCrossAttnProcessor:
    """Cross-attention that hands position to both sides: each query token gets ``query_time *
    tau * u`` (tau from -1 at the clip start to +1 at its end, on the square latent grid, time the
    fast axis) and each text state ``key_position * (j / 8 - 1) * u`` (j its token index), ``u``
    the unit all-ones direction; then diffusers' ``AttnProcessor2_0``.

    Why: with neither side carrying position, "A then B" and "B then A" meet cross-attention as
    the same set of keys seen from the same queries, and training leaves that symmetric start far
    too slowly for order to be learned (docs/soundworld.md, "The order saddle")."""

    def __init__(self, query_time: float, key_position: float):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.query_time, self.key_position = float(query_time), float(key_position)
        self._attend = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            tokens, width = hidden_states.shape[1], hidden_states.shape[-1]
            side = round(tokens ** 0.5)
            if side * side != tokens:
                raise ValueError(f"PositionalCrossAttnProcessor needs a square latent grid, got {tokens} tokens")
            tau = torch.linspace(-1.0, 1.0, side, dtype=hidden_states.dtype, device=hidden_states.device).repeat(side)
            hidden_states = hidden_states + self.query_time * tau[None, :, None] / width ** 0.5
            n, dim = encoder_hidden_states.shape[1], encoder_hidden_states.shape[-1]
            pos = torch.arange(n, dtype=encoder_hidden_states.dtype, device=encoder_hidden_states.device) / 8.0 - 1.0
            encoder_hidden_states = encoder_hidden_states + self.key_position * pos[None, :, None] / dim ** 0.5
        return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def set_position_features(unet, query_time: float, key_position: float) -> int:
    """Install :class:`PositionalCrossAttnProcessor` on every cross-attention of ``unet``
    (0 and 0 restores the default processor); returns how many were set."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    n = 0
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.set_processor(PositionalCrossAttnProcessor(query_time, key_position)
                                 if query_time or key_position else AttnProcessor2_0())
            n += 1
    return n


def position_features(unet) -> dict[str, float] | None:
    """``{"query_time", "key_position"}`` of the processor :func:`set_position_features`
    installed, or None for a plain UNet."""
    for processor in unet.attn_processors.values():
        if isinstance(processor, PositionalCrossAttnProcessor):
            return {"query_time": processor.query_time, "key_position": processor.key_position}
    return None
