"""The SoundWorld base model's components, built tiny from configs of the real classes.

Tokenizer: a word-level fast tokenizer (``tokenizers``) trained in-process on SoundWorld captions.
Text encoder: transformers ``T5EncoderModel`` (relative position buckets, so word order matters).
VAE: diffusers ``AutoencoderKL`` over ``[B, 1, n_mels, frames]`` log-mels, one 2x downsampling to
``[B, 4, n_mels/2, frames/2]`` latents. UNet: diffusers ``UNet2DConditionModel`` on those latents
plus one *time-ramp* channel (-1 at the clip start to +1 at its end): a convolutional UNet with
text cross-attention has no other way to know where "first" and "then" are in time. Cross- and
self-attention only at the two coarser resolutions (full-resolution attention costs 8x the step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TIME_RAMP_CHANNELS = 1


@dataclass
class GeneratorArch:
    """Sizes of the base model (defaults: what the shipped weights use)."""

    text_width: int = field(default=64, metadata={"help": "T5 d_model; also the UNet cross-attention width"})
    text_layers: int = field(default=2, metadata={"help": "T5 encoder layers"})
    text_heads: int = field(default=4, metadata={"help": "T5 attention heads"})
    vae_channels: tuple[int, ...] = field(default=(16, 32), metadata={"help": "AutoencoderKL block widths"})
    latent_channels: int = field(default=4, metadata={"help": "VAE latent channels"})
    unet_channels: tuple[int, ...] = field(default=(32, 64, 64), metadata={"help": "UNet block widths"})
    unet_layers_per_block: int = field(default=1, metadata={"help": "resnets per UNet block"})
    attention_head_dim: int = field(default=16, metadata={"help": "UNet attention head width"})
    query_time: float = field(default=0.0, metadata={
        "help": "strength of the fixed time feature on cross-attention queries (PositionalCrossAttnProcessor); "
                "0 with key_position 0 = plain cross-attention, or whatever a continued generator has"})
    key_position: float = field(default=0.0, metadata={
        "help": "strength of the fixed token-position feature on the text keys (PositionalCrossAttnProcessor)"})


def train_tokenizer(captions: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``captions`` (lower-cased, punctuation split,
    ``</s>`` appended, ``<pad>`` id 0) — small, exact, and saved as a standard tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=64)


def build_text_encoder(vocab_size: int, arch: GeneratorArch):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=arch.text_width, d_kv=arch.text_width // arch.text_heads,
                   d_ff=2 * arch.text_width, num_layers=arch.text_layers, num_heads=arch.text_heads,
                   relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def build_vae(n_mels: int, arch: GeneratorArch):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(arch.vae_channels),
                         layers_per_block=1, latent_channels=arch.latent_channels, norm_num_groups=8,
                         sample_size=n_mels, mid_block_add_attention=False, force_upcast=False)


def build_unet(latent_size: int, arch: GeneratorArch):
    from diffusers import UNet2DConditionModel

    n = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=arch.latent_channels + TIME_RAMP_CHANNELS,
        out_channels=arch.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=tuple(arch.unet_channels), layers_per_block=arch.unet_layers_per_block,
        cross_attention_dim=arch.text_width, attention_head_dim=arch.attention_head_dim, norm_num_groups=8)


def build_scheduler(prediction_type: str = "epsilon", timestep_spacing: str = "leading"):
    """DDPM training schedule (cosine: terminal SNR ~2e-9); the sampler (DDIM) reads its
    ``prediction_type`` and ``timestep_spacing`` from this config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                         timestep_spacing=timestep_spacing, clip_sample=False)


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
