"""The SoundWorld base model's components, built tiny from configs of the real classes.

Tokenizer: a word-level fast tokenizer (``tokenizers``) trained in-process on SoundWorld captions.
Text encoder: transformers ``T5EncoderModel`` (relative position buckets, so word order matters).
VAE: diffusers ``AutoencoderKL`` over ``[B, 1, n_mels, frames]`` log-mels, one 2x downsampling to
``[B, 4, n_mels/2, frames/2]`` latents. UNet: diffusers ``UNet2DConditionModel`` on those latents
plus one *time-ramp* channel (:mod:`diffdpo.diffusion.tango.position`). Cross- and self-attention
only at the two coarser resolutions (full-resolution attention costs 8x the step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffdpo.diffusion.tango.position import TIME_RAMP_CHANNELS


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
    """The training schedule, saved with the model; the sampler reads its config.

    ``epsilon`` / ``v_prediction``: DDPM (cosine: terminal SNR ~2e-9), sampled with DDIM at
    ``timestep_spacing``. ``flow_matching``: rectified flow (``x_t = (1 - s) x0 + s eps``, target
    ``eps - x0``) in diffusers' FlowMatchEulerDiscreteScheduler with shift 1 (SD3 shifts to 3 for
    1024 px images; these latents are 64 x 32), sampled with its Euler steps; spacing does not apply.
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if prediction_type == "flow_matching":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                         timestep_spacing=timestep_spacing, clip_sample=False)
