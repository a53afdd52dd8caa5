"""Tango's own checkpoint layout, read as it is and written back.

What ``declare-lab/tango``, ``tango-full-ft-audiocaps``, ``tango2`` and ``tango2-full`` publish (the
model cards on the Hugging Face hub; the formats learnt from the checkpoints' key names and Tango's
public description, none of its code used)::

    main_config.json        {"text_encoder_name", "scheduler_name", "unet_model_name",
                             "unet_model_config_path", "snr_gamma"}
    pytorch_model_main.bin  unet.*          a diffusers UNet2DConditionModel state dict
                            text_encoder.*  the whole T5EncoderModel (FLAN-T5-large; tied keys included)
    vae_config.json         {"embed_dim", "scale_factor", "ddconfig": {"ch", "ch_mult", "num_res_blocks",
                             "z_channels", "double_z", "in_channels", "out_ch", ...}, ...}
    pytorch_model_vae.bin   an LDM-style (AudioLDM) autoencoder, plus the HiFi-GAN under vocoder.*
    stft_config.json        {"filter_length", "hop_length", "win_length", "n_mel_channels",
                             "sampling_rate", "mel_fmin", "mel_fmax"}
    pytorch_model_stft.bin  the mel front end's buffers (Tacotron-style STFT bases, librosa mel basis)

Two facts are not in the folder, and are carried here (``published/``, sources in its README):
the UNet config (``main_config.json`` names ``configs/diffusion_model_config.json``, a path inside
Tango's GitHub repository) and the scheduler (named by the hub id ``stabilityai/stable-diffusion-2-1``:
its ``scheduler/scheduler_config.json``, v-prediction). The HiFi-GAN's config is in no JSON either:
its widths and kernel sizes are read off its tensors, its strides and dilations are the published
16 kHz / 64-mel constants (``published/tango_hifigan_config.json``).

:func:`load_tango_checkpoint` builds a :class:`~diffdpo.diffusion.tango.pipeline.TangoPipeline` of
diffusers / transformers classes from those files (the VAE mapped to ``AutoencoderKL``, the
vocoder to ``SpeechT5HifiGan``, as diffusers' AudioLDM conversion does); :func:`save_tango_checkpoint`
writes a pipeline back into the six files, so Tango's own inference code loads a model trained here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from diffdpo.errors import UserError

PUBLISHED = Path(__file__).parent / "published"
TANGO_FILES = ("main_config.json", "pytorch_model_main.bin", "vae_config.json", "pytorch_model_vae.bin",
               "stft_config.json", "pytorch_model_stft.bin")
TANGO_UNET_CONFIG_PATH = "configs/diffusion_model_config.json"  # relative to Tango's GitHub repository
SD21 = "stabilityai/stable-diffusion-2-1"
MEL_FRAMES = 1024  # Tango pads or crops every clip's mel to 1024 frames (10.24 s at hop 160)


class TangoCheckpointError(UserError, ValueError):
    """A file of a Tango checkpoint folder is missing or is not what the layout says."""


def is_tango_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "main_config.json").is_file() and (Path(path) / "pytorch_model_main.bin").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TangoCheckpointError(f"{path}: cannot read it as JSON ({err})") from err


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save``, loaded without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise TangoCheckpointError(f"{path}: not a state dict torch.load(weights_only=True) can read ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TangoCheckpointError(f"{path}: expected a state dict of tensors")
    return state


def _split(state: dict[str, torch.Tensor], prefixes: tuple[str, ...], where: Path) -> dict[str, dict]:
    parts: dict[str, dict] = {p: {} for p in prefixes}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None:
            raise TangoCheckpointError(f"{where}: unexpected key {key!r} (expected only {[p + '.*' for p in prefixes]})")
        parts[prefix][key[len(prefix) + 1:]] = value
    return parts


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise TangoCheckpointError(
            f"{where}: does not match {type(module).__name__} built from its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {[(k, tuple(state[k].shape)) for k in wrong[:5]]}")
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------ UNet, scheduler, text encoder


def unet_config(main_config: dict, folder: Path) -> dict:
    """The UNet config ``main_config.json`` names: the file if the checkpoint folder has it, else
    Tango's published ``configs/diffusion_model_config.json`` (carried here)."""
    if main_config.get("unet_model_name"):
        raise TangoCheckpointError(
            f"{folder}/main_config.json: unet_model_name={main_config['unet_model_name']!r} (a UNet initialised from "
            "Stable Diffusion with Tango's extra group_in/group_out layers) is not supported; the published Tango "
            "checkpoints name unet_model_config_path instead")
    rel = main_config.get("unet_model_config_path")
    if not rel:
        raise TangoCheckpointError(f"{folder}/main_config.json: names neither unet_model_name nor unet_model_config_path")
    local = folder / rel
    if local.is_file():
        return _read_json(local)
    if rel == TANGO_UNET_CONFIG_PATH:
        return _read_json(PUBLISHED / "tango_unet_config.json")
    raise TangoCheckpointError(f"{folder}/main_config.json: unet_model_config_path {rel!r} is neither inside the "
                               f"checkpoint folder nor Tango's published {TANGO_UNET_CONFIG_PATH!r}")


def load_scheduler(main_config: dict):
    """The training scheduler: SD-2.1's (carried) for Tango's checkpoints, else from the hub or cache."""
    from diffusers import DDPMScheduler

    from diffdpo.diffusion.hub import from_pretrained

    name = main_config.get("scheduler_name", "")
    if name == SD21:
        return DDPMScheduler.from_config(_read_json(PUBLISHED / "sd21_scheduler_config.json"))
    return from_pretrained(DDPMScheduler, name, setting="main_config.json's scheduler_name", subfolder="scheduler")


def load_text_encoder(name_or_path: str, state: dict[str, torch.Tensor], where: Path):
    """FLAN-T5's tokenizer and config (from the hub cache or a local folder), the weights from the
    checkpoint's ``text_encoder.*`` keys."""
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

    from diffdpo.diffusion.hub import from_pretrained

    setting = "main_config.json's text_encoder_name (or diffdpo convert tango --text-encoder)"
    tokenizer = from_pretrained(AutoTokenizer, name_or_path, setting=setting)
    if len(tokenizer) < 16:  # transformers can return a near-empty tokenizer offline instead of raising
        raise TangoCheckpointError(f"tokenizer {name_or_path!r} loaded with only {len(tokenizer)} tokens")
    encoder = T5EncoderModel(from_pretrained(AutoConfig, name_or_path, setting=setting))
    _load_strict(encoder, state, f"{where} text_encoder.*")
    return tokenizer, encoder.eval()


# ------------------------------------------------------------------ VAE (LDM autoencoder <-> AutoencoderKL)


def vae_config(vae_json: dict, where: Path) -> dict:
    """diffusers ``AutoencoderKL`` config of Tango's (AudioLDM's) autoencoder."""
    dd = vae_json.get("ddconfig") or {}
    need = ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch")
    if any(k not in dd for k in need) or "embed_dim" not in vae_json:
        raise TangoCheckpointError(f"{where}: expected embed_dim and ddconfig with {list(need)}")
    if dd["z_channels"] != vae_json["embed_dim"] or not dd.get("double_z", True) or dd.get("attn_resolutions"):
        raise TangoCheckpointError(f"{where}: only z_channels == embed_dim, double_z and no attn_resolutions map to "
                                   "diffusers' AutoencoderKL")
    if int(vae_json.get("subband", 1)) != 1:
        raise TangoCheckpointError(f"{where}: subband {vae_json['subband']} is not supported (Tango uses 1)")
    n = len(dd["ch_mult"])
    return {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "latent_channels": vae_json["embed_dim"],
            "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]], "layers_per_block": dd["num_res_blocks"],
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "norm_num_groups": 32, "scaling_factor": float(vae_json.get("scale_factor", 1.0)),
            "sample_size": dd.get("resolution", 256), "force_upcast": False}


_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RESNET = {"conv_shortcut": "nin_shortcut"}


def ldm_vae_key(key: str, levels: int) -> str:
    """The LDM (AudioLDM / Tango) name of a diffusers ``AutoencoderKL`` state-dict key.

    LDM keeps the decoder's levels highest resolution first (``up.0`` is diffusers' last
    ``up_blocks``), calls the shortcut ``nin_shortcut`` and the mid attention's parts q/k/v/proj_out."""
    side, rest = key.split(".", 1)
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)\.|downsamplers\.0\.|upsamplers\.0\.)(.+)", rest)
    if m:
        kind, level, inner, block, tail = m.groups()
        level = int(level) if kind == "down" else levels - 1 - int(level)
        if inner.startswith("resnets"):
            head, _, param = tail.rpartition(".")
            return f"{side}.{kind}.{level}.block.{block}.{_RESNET.get(head, head)}.{param}"
        return f"{side}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{tail}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest)
    if m:
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", rest)
    if m:
        return f"{side}.mid.attn_1.{_ATTENTION[m.group(1)]}.{m.group(2)}"
    head, _, param = rest.partition(".")
    return f"{side}.{'norm_out' if head == 'conv_norm_out' else head}.{param}"


def vae_from_ldm(state: dict[str, torch.Tensor], config: dict, where: str):
    """An ``AutoencoderKL`` holding the LDM autoencoder ``state`` (its 1x1-conv attention as linears)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**config)
    levels = len(config["block_out_channels"])
    names = {k: ldm_vae_key(k, levels) for k in vae.state_dict()}
    extra = sorted(set(state) - set(names.values()))
    missing = sorted(v for v in names.values() if v not in state)
    if extra or missing:
        raise TangoCheckpointError(f"{where}: not the autoencoder vae_config.json describes: missing {missing[:5]}, "
                                   f"unexpected {extra[:5]}")
    target = vae.state_dict()
    _load_strict(vae, {k: state[ldm].reshape(target[k].shape) for k, ldm in names.items()}, where)
    return vae.eval()


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """The inverse of :func:`vae_from_ldm`: LDM names, attention weights as 1x1 convs."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        ldm = ldm_vae_key(key, levels)
        is_attn_weight = ".mid.attn_1." in ldm and ldm.endswith("weight") and not ldm.endswith("norm.weight")
        out[ldm] = value.reshape(*value.shape, 1, 1) if is_attn_weight else value
    return out


# ------------------------------------------------------------------ HiFi-GAN vocoder


def vocoder_from_state(state: dict[str, torch.Tensor], sampling_rate: int, where: str):
    """A transformers ``SpeechT5HifiGan`` holding Tango's HiFi-GAN (``ups.i`` = ``upsampler.i``).

    Widths and kernel sizes come from the tensors, strides and dilations from the published
    constants (they shape no tensor)."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    if any(k.endswith(("weight_g", "weight_v")) for k in state):
        raise TangoCheckpointError(f"{where}: weight-normalised HiFi-GAN (weight_g/weight_v); remove weight norm first")
    published = _read_json(PUBLISHED / "tango_hifigan_config.json")
    ups = sorted({int(k.split(".")[1]) for k in state if k.startswith("ups.")})
    n_res = len({int(k.split(".")[1]) for k in state if k.startswith("resblocks.")})
    if not ups or len(ups) != len(published["upsample_rates"]) or n_res != len(ups) * len(published["resblock_kernel_sizes"]):
        raise TangoCheckpointError(f"{where}: {len(ups)} upsampling layers and {n_res} residual blocks, expected "
                                   f"{len(published['upsample_rates'])} and "
                                   f"{len(published['upsample_rates']) * len(published['resblock_kernel_sizes'])}")
    kernels = len(published["resblock_kernel_sizes"])
    config = SpeechT5HifiGanConfig(
        model_in_dim=state["conv_pre.weight"].shape[1], sampling_rate=sampling_rate,
        upsample_initial_channel=state["conv_pre.weight"].shape[0], upsample_rates=published["upsample_rates"],
        upsample_kernel_sizes=[state[f"ups.{i}.weight"].shape[2] for i in ups],
        resblock_kernel_sizes=[state[f"resblocks.{j}.convs1.0.weight"].shape[2] for j in range(kernels)],
        resblock_dilation_sizes=published["resblock_dilation_sizes"],
        leaky_relu_slope=published["leaky_relu_slope"], normalize_before=False)
    vocoder = SpeechT5HifiGan(config)
    mapped = {re.sub(r"^ups\.", "upsampler.", k): v for k, v in state.items()}
    mapped["mean"], mapped["scale"] = torch.zeros(config.model_in_dim), torch.ones(config.model_in_dim)
    _load_strict(vocoder, mapped, where)
    return vocoder.eval()


def vocoder_to_state(vocoder) -> dict[str, torch.Tensor]:
    """The inverse of :func:`vocoder_from_state` (normalisation buffers dropped: Tango has none)."""
    if vocoder.config.normalize_before:
        raise TangoCheckpointError("a vocoder that normalises its input has no place in Tango's layout")
    return {re.sub(r"^upsampler\.", "ups.", k): v for k, v in vocoder.state_dict().items() if k not in ("mean", "scale")}


# ------------------------------------------------------------------ mel front end


def audio_config(stft: dict, where: Path):
    """The :class:`AudioConfig` of Tango's front end: ``stft_config.json``'s STFT and mel settings,
    log(clamp(mel, 1e-5)), peak-normalised input, 1024 frames, VAE reading mels time first."""
    from diffdpo.diffusion.tango.audio import AudioConfig

    try:
        sr, hop = int(stft["sampling_rate"]), int(stft["hop_length"])
        return AudioConfig(sample_rate=sr, n_fft=int(stft["filter_length"]), hop_length=hop,
                           win_length=int(stft["win_length"]), n_mels=int(stft["n_mel_channels"]),
                           f_min=float(stft["mel_fmin"]), f_max=float(stft["mel_fmax"]), mel_scale="slaney",
                           log_offset=1e-5, clip_seconds=MEL_FRAMES * hop / sr, vocoder="hifigan", log_mode="clamp",
                           normalize_waveform=True, mel_layout="time_first")
    except KeyError as err:
        raise TangoCheckpointError(f"{where}: missing {err}") from err


def stft_buffers(cfg) -> dict[str, torch.Tensor]:
    """The buffers of ``pytorch_model_stft.bin`` for an :class:`AudioConfig`: Tacotron-style STFT
    bases (the DFT's real and imaginary rows, Hann-windowed, and their pseudo-inverse) and
    librosa's Slaney mel basis, computed in float64 and stored as float32."""
    import librosa
    import numpy as np
    from scipy.signal import get_window

    n, hop, cut = cfg.n_fft, cfg.hop_length, cfg.n_fft // 2 + 1
    dft = np.fft.fft(np.eye(n))
    basis = np.vstack([np.real(dft[:cut]), np.imag(dft[:cut])])
    window = librosa.util.pad_center(get_window("hann", cfg.win_length, fftbins=True), size=n)
    forward = torch.FloatTensor(basis[:, None, :]) * torch.from_numpy(window).float()
    inverse = torch.FloatTensor(np.linalg.pinv(n / hop * basis).T[:, None, :]) * torch.from_numpy(window).float()
    mel = librosa.filters.mel(sr=cfg.sample_rate, n_fft=n, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max)
    return {"mel_basis": torch.from_numpy(mel).float(), "stft_fn.forward_basis": forward.float(),
            "stft_fn.inverse_basis": inverse.float()}


def check_stft(state: dict[str, torch.Tensor], cfg, where: Path) -> None:
    """Refuse a front end whose mel basis is not the one ``stft_config.json`` describes (diffdpo
    computes mels from the config, so a checkpoint that disagreed would be fed other features)."""
    expected = stft_buffers(cfg)
    for key in ("mel_basis", "stft_fn.forward_basis"):
        if key not in state or state[key].shape != expected[key].shape or not torch.allclose(
                state[key].float(), expected[key], atol=1e-6, rtol=1e-4):
            raise TangoCheckpointError(f"{where}: {key} is not the one stft_config.json describes")


# ------------------------------------------------------------------ the whole folder


def load_tango_checkpoint(path: str | Path, text_encoder: str | None = None):
    """A :class:`TangoPipeline` from a checkpoint folder in Tango's layout, read as it is."""
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    path = Path(path)
    missing = [f for f in TANGO_FILES if not (path / f).is_file()]
    if missing:
        raise TangoCheckpointError(f"{path}: a Tango checkpoint folder needs {list(TANGO_FILES)}; missing {missing}")
    main, vae_json, stft = (_read_json(path / f) for f in ("main_config.json", "vae_config.json", "stft_config.json"))
    cfg = audio_config(stft, path / "stft_config.json")
    check_stft(_read_bin(path / "pytorch_model_stft.bin"), cfg, path / "pytorch_model_stft.bin")

    from diffusers import UNet2DConditionModel

    parts = _split(_read_bin(path / "pytorch_model_main.bin"), ("unet", "text_encoder"), path / "pytorch_model_main.bin")
    unet = UNet2DConditionModel.from_config(unet_config(main, path))
    _load_strict(unet, parts["unet"], f"{path / 'pytorch_model_main.bin'} unet.*")
    tokenizer, encoder = load_text_encoder(text_encoder or main["text_encoder_name"], parts["text_encoder"],
                                           path / "pytorch_model_main.bin")

    vae_parts = _split(_read_bin(path / "pytorch_model_vae.bin"), ("encoder", "decoder", "quant_conv",
                                                                   "post_quant_conv", "vocoder"),
                       path / "pytorch_model_vae.bin")
    vocoder_state = vae_parts.pop("vocoder")
    vae_state = {f"{p}.{k}": v for p, part in vae_parts.items() for k, v in part.items()}
    vae = vae_from_ldm(vae_state, vae_config(vae_json, path / "vae_config.json"), f"{path / 'pytorch_model_vae.bin'}")
    vocoder = vocoder_from_state(vocoder_state, cfg.sample_rate, f"{path / 'pytorch_model_vae.bin'} vocoder.*")
    converted_from = {"layout": "tango", "main_config": main, "vae_config": vae_json, "stft_config": stft}
    return TangoPipeline(tokenizer, encoder, vae, unet.eval(), load_scheduler(main), cfg, vocoder, converted_from)


def save_tango_checkpoint(pipe, path: str | Path) -> Path:
    """Write ``pipe`` as Tango's six files (atomically: a temporary sibling, then a rename)."""
    source = pipe.converted_from or {}
    if source.get("layout") != "tango":
        raise TangoCheckpointError("only a model converted from Tango's layout can be written back to it (its "
                                   "model_index.json has no converted_from.layout = 'tango')")
    if pipe.vocoder is None or pipe.audio_config.mel_layout != "time_first" or pipe.unet.config.in_channels != \
            pipe.vae.config.latent_channels:
        raise TangoCheckpointError("Tango's layout holds a HiFi-GAN vocoder, a time-first VAE and a plain latent UNet")
    path = Path(path)
    tmp = path.parent / f".tmp_{path.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("main_config", "vae_config", "stft_config"):
        (tmp / f"{name}.json").write_text(json.dumps(source[name]))
    main = {**{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
            **{f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}
    torch.save(_contiguous(main), tmp / "pytorch_model_main.bin")
    vae = {**vae_to_ldm(pipe.vae), **{f"vocoder.{k}": v for k, v in vocoder_to_state(pipe.vocoder).items()}}
    torch.save(_contiguous(vae), tmp / "pytorch_model_vae.bin")
    torch.save(stft_buffers(pipe.audio_config), tmp / "pytorch_model_stft.bin")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def convert_tango(src: str | Path, out: str | Path, text_encoder: str | None = None) -> Path:
    """Tango's layout -> docs/model_layout.md's (diffusers / transformers classes)."""
    return load_tango_checkpoint(src, text_encoder=text_encoder).save_pretrained(out)


def export_tango(src: str | Path, out: str | Path) -> Path:
    """A folder in docs/model_layout.md's layout (converted from Tango, then trained) -> Tango's layout."""
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    return save_tango_checkpoint(TangoPipeline.from_pretrained(src), out)
