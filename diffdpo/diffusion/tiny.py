"""Tiny random models of each family's real classes, saved as ordinary local model folders.

Model hubs are out of reach on development machines, so tests, tiny recipe configs and the bench
build these (seconds on a CPU) and then load them through the same code path as a real checkpoint:
``load_backbone(family, folder)``. Widths follow diffusers' own pipeline tests. Tokenizers are real
tokenizer classes over a character-level vocabulary written here.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

TINY_FAMILIES = ("tango", "audioldm", "sd15", "sdxl", "audioldm2", "sd3", "flux", "tangoflux")
# families whose tiny folder is their published repository's layout, shrunk (diffdpo.diffusion.hub_layouts)
_FROM_HUB_LAYOUT = {"sd3": "stabilityai/stable-diffusion-3-medium-diffusers", "flux": "black-forest-labs/FLUX.1-dev"}


def build_tiny(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``family`` model folder at ``path`` (skipped when it already exists)."""
    path = Path(path)
    if family == "tangoflux":  # TangoFlux's own published layout, shrunk (no model_index.json)
        from diffdpo.diffusion.tangoflux import build_checkpoint

        return build_checkpoint(path, seed=seed)
    if (path / "model_index.json").is_file():
        return path
    if family in _FROM_HUB_LAYOUT:
        from diffdpo.diffusion.hub_layouts import build_from_published

        return build_from_published(_FROM_HUB_LAYOUT[family], path, seed=seed)
    builders = {"tango": _tango, "audioldm": _audioldm, "audioldm2": _audioldm2, "sd15": _sd15, "sdxl": _sdxl}
    if family not in builders:
        raise ValueError(f"no tiny builder for family {family!r}; valid: {list(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    builders[family](path)
    return path


def _clip_tokenizer(max_length: int = 32):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length)


def _roberta_tokenizer(max_length: int = 32):
    from transformers import RobertaTokenizer

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "\u0120"])}
    for c in string.ascii_lowercase + string.digits:
        vocab[c] = len(vocab)
        vocab["\u0120" + c] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int = 32):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
                          num_attention_heads=2, num_hidden_layers=2, vocab_size=100, max_position_embeddings=32,
                          **kw)


def _image_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=4, sample_size=16)


def _ddpm(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def _sd15(path: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=_image_vae(), text_encoder=CLIPTextModel(_clip_text_config()),
                                   tokenizer=_clip_tokenizer(), unet=unet, scheduler=_ddpm(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)


def _sdxl(path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=4, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=6 * 4 + 16, cross_attention_dim=32,
                                norm_num_groups=4)
    pipe = StableDiffusionXLPipeline(
        vae=_image_vae(), text_encoder=CLIPTextModel(_clip_text_config()), tokenizer=_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(projection_dim=16)),
        tokenizer_2=_clip_tokenizer(), unet=unet, scheduler=_ddpm())
    pipe.save_pretrained(path)


def _audio_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=1, out_channels=1,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=4)


def _vocoder(n_mels: int = 8):
    """HiFi-GAN with a total upsampling of 160 = the mel hop, as in AudioLDM."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    return SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=n_mels, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[16, 10],
        upsample_kernel_sizes=[16, 10], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False))


def _audioldm(path: Path) -> None:
    from diffusers import AudioLDMPipeline, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                                in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(8, 16),
                                class_embed_type="simple_projection", projection_class_embeddings_input_dim=8,
                                class_embeddings_concat=True, attention_head_dim=4)
    text = ClapTextModelWithProjection(ClapTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=8, intermediate_size=16, num_attention_heads=1,
        num_hidden_layers=1, vocab_size=100, projection_dim=8, max_position_embeddings=40))
    pipe = AudioLDMPipeline(vae=_audio_vae(), text_encoder=text, tokenizer=_roberta_tokenizer(), unet=unet,
                            scheduler=_ddpm(), vocoder=_vocoder())
    pipe.save_pretrained(path)


def _audioldm2(path: Path) -> None:
    from diffusers import AudioLDM2Pipeline
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
    from transformers import (ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig, GPT2Config,
                              GPT2LMHeadModel, T5Config, T5EncoderModel)

    unet = AudioLDM2UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=([None, 16, 8], [None, 16, 8]),
        attention_head_dim=4)
    clap = ClapModel(ClapConfig(
        text_config=ClapTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=8, intermediate_size=16,
                                   num_attention_heads=1, num_hidden_layers=1, vocab_size=100,
                                   max_position_embeddings=40),
        audio_config=ClapAudioConfig(spec_size=32, window_size=4, num_mel_bins=32, intermediate_size=16,
                                     layer_norm_eps=1e-5, num_hidden_layers=1, num_attention_heads=[1, 1],
                                     depths=[1, 1], patch_stride=2, patch_embeds_hidden_size=8, hidden_size=16,
                                     enable_fusion=False), projection_dim=8))
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    gpt = GPT2LMHeadModel(GPT2Config(n_embd=16, n_head=2, n_layer=1, vocab_size=100, n_positions=64))
    gpt.config.max_new_tokens = 4
    projection = AudioLDM2ProjectionModel(text_encoder_dim=8, text_encoder_1_dim=8, langauge_model_dim=16)
    pipe = AudioLDM2Pipeline(vae=_audio_vae(), text_encoder=clap, text_encoder_2=t5, projection_model=projection,
                             language_model=gpt, tokenizer=_roberta_tokenizer(), tokenizer_2=_t5_tokenizer(),
                             feature_extractor=ClapFeatureExtractor(feature_size=32, hop_length=16,
                                                                    sampling_rate=16000),
                             unet=unet, scheduler=_ddpm(), vocoder=_vocoder())
    pipe.save_pretrained(path)


def _tango(path: Path) -> None:
    """A SoundWorld-shaped folder of docs/model_layout.md: Griffin-Lim, VAE reading mels mel-first,
    a UNet with the time-ramp channel."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffdpo.diffusion.tango.audio import AudioConfig
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    audio = AudioConfig(sample_rate=8000, n_fft=256, hop_length=250, win_length=256, n_mels=16, f_max=4000.0,
                        clip_seconds=0.5, griffin_lim_iters=4)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16, mid_block_add_attention=False, force_upcast=False)
    unet = UNet2DConditionModel(sample_size=8, in_channels=5, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    TangoPipeline(_t5_tokenizer(), _t5_encoder(), vae, unet, _ddpm(), audio).save_pretrained(path)


def _t5_encoder(width: int = 16):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, d_model=width, d_ff=2 * width, d_kv=8, num_layers=1, num_heads=2,
                                   feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


TINY_TANGO_STFT = {"filter_length": 256, "hop_length": 160, "win_length": 256, "n_mel_channels": 16,
                   "sampling_rate": 16000, "mel_fmin": 0, "mel_fmax": 8000}
TINY_TANGO_VAE = {"image_key": "fbank", "subband": 1, "embed_dim": 8, "time_shuffle": 1, "scale_factor": 0.9,
                  "ddconfig": {"double_z": True, "z_channels": 8, "resolution": 256, "downsample_time": False,
                               "in_channels": 1, "out_ch": 1, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2,
                               "attn_resolutions": [], "dropout": 0.0}}


def text_encoder_folder(path: str | Path) -> Path:
    """What a text-encoder hub folder gives a Tango checkpoint (config + tokenizer, no weights: those
    are in ``pytorch_model_main.bin``), for the tiny T5 :func:`tango_checkpoint` holds."""
    path = Path(path)
    _t5_encoder().config.save_pretrained(path)
    _t5_tokenizer().save_pretrained(path)
    return path


def tango_checkpoint(path: str | Path, text_encoder_name: str = "google/flan-t5-large", seed: int = 0) -> Path:
    """A checkpoint folder in Tango's own published layout (the six files with their real key names
    and config schemas, every width shrunk; ``configs/diffusion_model_config.json`` beside them, as
    the published UNet config is full size): what ``declare-lab/tango2`` looks like, in a few MB.

    ``main_config.json`` names ``text_encoder_name`` for the tokenizer and T5 config (by default
    the real FLAN-T5 id: tests put :func:`text_encoder_folder` in a Hugging Face cache under it)."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from diffdpo.diffusion.tango import checkpoint
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    path = Path(path)
    torch.manual_seed(seed)
    main = {"text_encoder_name": text_encoder_name, "scheduler_name": checkpoint.SD21, "unet_model_name": None,
            "unet_model_config_path": checkpoint.TANGO_UNET_CONFIG_PATH, "snr_gamma": 5.0}
    published = json.loads((checkpoint.PUBLISHED / "tango_unet_config.json").read_text())
    unet_config = {**published, "block_out_channels": [32, 64], "attention_head_dim": [4, 8], "layers_per_block": 1,
                   "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
                   "norm_num_groups": 8}
    hifigan = json.loads((checkpoint.PUBLISHED / "tango_hifigan_config.json").read_text())
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**{**hifigan, "model_in_dim": TINY_TANGO_STFT["n_mel_channels"],
                                                       "upsample_initial_channel": 32}))
    for module in vocoder.modules():  # HiFi-GAN's own N(0, 0.01) init is silent (~1e-10) untrained: audible instead
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            torch.nn.init.kaiming_normal_(module.weight, a=0.1,
                                          mode="fan_out" if isinstance(module, torch.nn.ConvTranspose1d) else "fan_in")
    pipe = TangoPipeline(_t5_tokenizer(), _t5_encoder(),
                         AutoencoderKL(**checkpoint.vae_config(TINY_TANGO_VAE, path)),
                         UNet2DConditionModel.from_config(unet_config), checkpoint.load_scheduler(main),
                         checkpoint.audio_config(TINY_TANGO_STFT, path), vocoder.eval(),
                         {"layout": "tango", "main_config": main, "vae_config": TINY_TANGO_VAE,
                          "stft_config": TINY_TANGO_STFT})
    checkpoint.save_tango_checkpoint(pipe, path)
    (path / "configs").mkdir()
    (path / checkpoint.TANGO_UNET_CONFIG_PATH).write_text(json.dumps(unet_config, indent=2))
    return path
