"""Tango's published checkpoint layout, read as it is, converted, and written back.

The fixture is a checkpoint folder in Tango's own layout (the six files, real key names and config
schemas, widths shrunk: ``diffdpo.diffusion.tiny.tango_checkpoint``). Each converted component is
checked against a module built straight from the checkpoint's tensors by an independent route:
the UNet and T5 from their own classes and the raw state dicts, the VAE through diffusers' own
LDM conversion (``convert_ldm_vae_checkpoint``), the mel front end from the stored STFT and mel
bases (convolution + matrix product, as the file's buffers define it), the vocoder from a
functional HiFi-GAN written here from the published architecture (HiFi-GAN, Kong et al. 2020).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffdpo.diffusion import tiny
from diffdpo.diffusion.tango import checkpoint
from diffdpo.diffusion.tango.pipeline import TangoPipeline

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("tango")
    t5 = tiny.text_encoder_folder(base / "flan-t5")
    src = tiny.tango_checkpoint(base / "tango2", text_encoder_name=str(t5))
    return {"base": base, "t5": t5, "src": src}


@pytest.fixture(scope="module")
def pipe(folders):
    return TangoPipeline.from_pretrained(folders["src"])


def _bin(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"pytorch_model_{name}.bin", map_location="cpu", weights_only=True)


def _strip(state, prefix):
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def test_published_facts_match_the_anchors():
    """The carried UNet config builds Tango's 866M-parameter UNet; the scheduler is SD-2.1's v-prediction."""
    from diffusers import UNet2DConditionModel

    config = json.loads((checkpoint.PUBLISHED / "tango_unet_config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert abs(sum(p.numel() for p in unet.parameters()) / 1e6 - 866) < 1
    assert (config["in_channels"], config["cross_attention_dim"], config["attention_head_dim"]) == (8, 1024, [5, 10, 20, 20])
    sched = checkpoint.load_scheduler({"scheduler_name": checkpoint.SD21})
    assert sched.config.prediction_type == "v_prediction" and sched.config.steps_offset == 1
    assert (sched.config.beta_start, sched.config.beta_end, sched.config.beta_schedule) == (0.00085, 0.012, "scaled_linear")


def test_unet_and_text_encoder_equal_modules_built_from_the_tensors(folders, pipe):
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    main = _bin(folders["src"], "main")
    ref_unet = UNet2DConditionModel.from_config(json.loads(
        (folders["src"] / "configs" / "diffusion_model_config.json").read_text()))
    ref_unet.load_state_dict(_strip(main, "unet"))
    ref_t5 = T5EncoderModel(T5Config.from_pretrained(folders["t5"]))
    ref_t5.load_state_dict(_strip(main, "text_encoder"))
    states, mask = pipe.encode_text(["a dog barks then a bell rings"])
    ids = pipe.tokenizer(["a dog barks then a bell rings"], return_tensors="pt")
    assert torch.equal(states, ref_t5.eval()(**ids).last_hidden_state)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, *pipe.latent_shape, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        ours = pipe.unet_forward(latents, t, states, mask)
        ref = ref_unet.eval()(latents, t, encoder_hidden_states=states, encoder_attention_mask=mask.bool()).sample
    assert ours.shape == (1, 8, 512, 8) and torch.equal(ours, ref)


def test_vae_equals_diffusers_own_ldm_conversion(folders, pipe):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = {k: v for k, v in _bin(folders["src"], "vae").items() if not k.startswith("vocoder.")}
    config = checkpoint.vae_config(json.loads((folders["src"] / "vae_config.json").read_text()), folders["src"])
    ref = AutoencoderKL(**config)
    ref.load_state_dict(convert_ldm_vae_checkpoint(ldm, config))
    mel = torch.randn(2, 1, 1024, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(pipe.vae.encode(mel).latent_dist.mean, ref.eval().encode(mel).latent_dist.mean)
        z = torch.randn(2, 8, 512, 8)
        assert torch.equal(pipe.vae.decode(z).sample, ref.decode(z).sample)
    assert pipe.vae.config.scaling_factor == 0.9


def _tango_mel_from_buffers(wave: torch.Tensor, stft: dict, cfg: dict) -> torch.Tensor:
    """Tango's front end from the stored buffers: normalise, pad to 1024 hops, reflect pad, STFT as a
    convolution with ``forward_basis``, magnitude, ``mel_basis`` product, log(clamp(., 1e-5)), 1024 frames."""
    hop, n = cfg["hop_length"], cfg["filter_length"]
    wave = wave - wave.mean()
    wave = 0.5 * wave / (wave.abs().max() + 1e-8)
    wave = F.pad(wave, (0, 1024 * hop - wave.numel()))
    wave = 0.5 * wave / wave.abs().max()
    x = F.pad(wave[None, None], (n // 2, n // 2), mode="reflect")[:, 0][:, None]
    spec = F.conv1d(x, stft["stft_fn.forward_basis"], stride=hop)
    cut = n // 2 + 1
    mag = torch.sqrt(spec[:, :cut] ** 2 + spec[:, cut:] ** 2)
    return torch.log(torch.clamp(stft["mel_basis"] @ mag, min=1e-5))[0, :, :1024]


def test_mel_front_end_equals_the_stored_bases(folders, pipe):
    from diffdpo.diffusion.tango.audio import log_mel

    g = torch.Generator().manual_seed(2)
    t = torch.arange(150_000) / 16_000
    wave = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.05 * torch.randn(150_000, generator=g)
    ref = _tango_mel_from_buffers(wave, _bin(folders["src"], "stft"), json.loads((folders["src"] / "stft_config.json").read_text()))
    ours = log_mel(wave, pipe.audio_config)
    assert ours.shape == ref.shape == (16, 1024)
    assert torch.allclose(ours, ref, atol=2e-4), (ours - ref).abs().max()


def _hifigan(state: dict, x: torch.Tensor, rates, dilations) -> torch.Tensor:
    """HiFi-GAN V1 generator (resblock type 1) from raw tensors: [B, n_mels, frames] -> [B, samples]."""
    def conv(h, name, dilation=1):
        w = state[f"{name}.weight"]
        return F.conv1d(h, w, state[f"{name}.bias"], dilation=dilation, padding=(w.shape[2] * dilation - dilation) // 2)

    h = conv(x, "conv_pre")
    kernels = len([k for k in state if k.startswith("resblocks.") and k.endswith("convs1.0.weight")]) // len(rates)
    for i, u in enumerate(rates):
        w = state[f"ups.{i}.weight"]
        h = F.conv_transpose1d(F.leaky_relu(h, 0.1), w, state[f"ups.{i}.bias"], stride=u, padding=(w.shape[2] - u) // 2)
        total = 0
        for j in range(i * kernels, (i + 1) * kernels):
            r = h
            for m, d in enumerate(dilations[j % kernels]):
                t = conv(F.leaky_relu(r, 0.1), f"resblocks.{j}.convs1.{m}", d)
                r = r + conv(F.leaky_relu(t, 0.1), f"resblocks.{j}.convs2.{m}")
            total = total + r
        h = total / kernels
    return torch.tanh(conv(F.leaky_relu(h), "conv_post"))[:, 0]


def test_vocoder_equals_a_hifigan_built_from_the_tensors(folders, pipe):
    published = json.loads((checkpoint.PUBLISHED / "tango_hifigan_config.json").read_text())
    state = _strip(_bin(folders["src"], "vae"), "vocoder")
    mel = torch.randn(1, 16, 40, generator=torch.Generator().manual_seed(3)) - 4
    with torch.no_grad():
        ours = pipe.mel_to_audio(mel)
        ref = _hifigan(state, mel, published["upsample_rates"], published["resblock_dilation_sizes"])
    assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-6)


def test_round_trip_tango_ours_tango_is_bit_identical(folders, pipe, tmp_path):
    from diffdpo.diffusion.models import load_backbone

    ours = checkpoint.convert_tango(folders["src"], tmp_path / "ours")
    index = json.loads((ours / "model_index.json").read_text())
    assert index["vocoder"] == ["transformers", "SpeechT5HifiGan"] and index["converted_from"]["layout"] == "tango"
    backbone = load_backbone("tango", str(ours))  # the converted folder is an ordinary tango-family model
    assert backbone.sample_rate == 16_000 and backbone.audio_seconds == pytest.approx(10.24)
    back = checkpoint.export_tango(ours, tmp_path / "back")
    for name in ("main_config", "vae_config", "stft_config"):
        assert json.loads((back / f"{name}.json").read_text()) == json.loads((folders["src"] / f"{name}.json").read_text())
    for name in ("main", "vae", "stft"):
        a, b = _bin(folders["src"], name), _bin(back, name)
        assert list(a) == list(b) if name != "vae" else sorted(a) == sorted(b)
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), name


def test_load_backbone_reads_the_published_folder_as_it_is(folders):
    from diffdpo.diffusion.models import load_backbone

    backbone = load_backbone("tango", str(folders["src"]))
    cond = backbone.encode_prompt("rain falls")
    lat = backbone.media_to_latents(torch.randn(2, 163_840) * 0.1)
    assert lat.shape == (2, 8, 512, 8)
    pred = backbone.predict(backbone.unet, lat, torch.tensor([10, 900]), {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()})
    assert pred.shape == lat.shape


def test_bad_checkpoints_are_named(folders, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folders["src"], bad)
    (bad / "pytorch_model_stft.bin").unlink()
    with pytest.raises(checkpoint.TangoCheckpointError, match="missing \\['pytorch_model_stft.bin'\\]"):
        TangoPipeline.from_pretrained(bad)
    shutil.copy(folders["src"] / "pytorch_model_stft.bin", bad)
    main = _bin(bad, "main")
    main["unet.conv_in.weightx"] = main.pop("unet.conv_in.weight")
    torch.save(main, bad / "pytorch_model_main.bin")
    with pytest.raises(checkpoint.TangoCheckpointError, match="conv_in.weight"):
        TangoPipeline.from_pretrained(bad)
    stft = _bin(folders["src"], "stft")
    stft["mel_basis"] = stft["mel_basis"] * 1.01
    torch.save(stft, bad / "pytorch_model_stft.bin")
    with pytest.raises(checkpoint.TangoCheckpointError, match="mel_basis"):
        TangoPipeline.from_pretrained(bad)
    shutil.copy(folders["src"] / "pytorch_model_stft.bin", bad)
    (bad / "pytorch_model_main.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.TangoCheckpointError, match="weights_only"):
        TangoPipeline.from_pretrained(bad)
    soundworld_like = TangoPipeline.from_pretrained(tiny.build_tiny("tango", tmp_path / "sw"))
    with pytest.raises(checkpoint.TangoCheckpointError, match="only a model converted from Tango"):
        checkpoint.save_tango_checkpoint(soundworld_like, tmp_path / "nope")


def test_convert_command_and_tango2_recipe_on_the_published_layout(folders, tmp_path):
    """``diffdpo convert tango`` and the Tango 2 recipe pointed at the checkpoint folder as
    downloaded, its main_config naming the real ``google/flan-t5-large`` (found in a Hugging Face
    cache that holds the tiny T5's config and tokenizer under that id)."""
    from helpers.hub_cache import hub_cache_with

    src = tiny.tango_checkpoint(tmp_path / "tango2")  # names google/flan-t5-large
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache_with(
        tmp_path / "hub", "google/flan-t5-large", folders["t5"]))}
    help_text = subprocess.run([sys.executable, "-m", "diffdpo", "convert", "tango", "--help"], env=env,
                               capture_output=True, text=True, check=True).stdout
    assert "--text-encoder" in help_text
    offline = subprocess.run([sys.executable, "-m", "diffdpo", "convert", "tango", str(src), str(tmp_path / "x")],
                             env={**env, "HF_HUB_CACHE": str(tmp_path / "empty_hub")}, capture_output=True, text=True)
    assert offline.returncode == 2 and len(offline.stderr.strip().splitlines()) == 1, offline.stderr
    assert "hf download google/flan-t5-large" in offline.stderr
    subprocess.run([sys.executable, "-m", "diffdpo", "convert", "tango", str(src), str(tmp_path / "conv")], env=env,
                   check=True, capture_output=True)
    assert (tmp_path / "conv" / "vocoder" / "config.json").is_file()
    run = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "diffusion_dpo.py"), "--config",
         str(ROOT / "recipes" / "configs" / "tango2_dpo.yaml"), f"model.name_or_path={src}", "data.source=toy",
         f"data.path={tmp_path / 'toy'}", "data.toy_pairs=2", f"train.output_dir={tmp_path / 'run'}",
         "train.per_device_batch=1", "train.grad_accum=1", "train.max_steps=2", "train.warmup_steps=0",
         "train.report_to=none", "train.save_every=0", "validation.every=0", "loss.sft_epochs=0"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    final = tmp_path / "run" / "final"
    back = checkpoint.export_tango(final, tmp_path / "tango_again")
    trained = _bin(back, "main")
    before = _bin(src, "main")
    assert any(not torch.equal(trained[k], before[k]) for k in before if k.startswith("unet."))
    assert all(torch.equal(trained[k], before[k]) for k in before if k.startswith("text_encoder."))
