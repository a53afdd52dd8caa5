"""Every family loads from its hub repository's exact layout (random weights, shrunk widths).

For each of the repositories users download (``PUBLISHED_REPOS``), ``build_from_published`` writes a
folder in the repository's layout; the tests check

(a) the folder's ``model_index.json`` equals the published one (nothing changed: the SD1.5 safety checker is
    kept, built shrunk) and each component config keeps every published key at its published value, except
    the width keys, which are shrunk:
      UNet: block_out_channels, layers_per_block, norm_num_groups, attention_head_dim,
            transformer_layers_per_block, cross_attention_dim, projection_class_embeddings_input_dim,
            addition_time_embed_dim;
      SD3 / Flux transformer: num_layers (Flux: and num_single_layers), num_attention_heads, joint_attention_dim,
            pooled_projection_dim (SD3: and attention_head_dim, caption_projection_dim; Flux keeps its head width
            128, the sum of its rotary axes);
      VAE: block_out_channels, layers_per_block, norm_num_groups;
      CLIP / CLAP text, T5, GPT-2: hidden sizes, intermediate sizes, heads, layers, projection dims, vocab_size
            (GPT-2 keeps its vocabulary);
      CLAP audio: patch_embeds_hidden_size, hidden_size, depths, num_attention_heads, projection_dim;
      HiFi-GAN vocoder: upsample_initial_channel;
      AudioLDM2 projection model: text_encoder_dim, text_encoder_1_dim, langauge_model_dim;
    tokenizer_config.json / special_tokens_map.json are the published files (the vocabulary is a small
    character vocabulary of the same tokenizer class);
(b) ``load_backbone(family, folder)`` loads it offline, encodes a prompt, turns a short clip / image into
    latents and runs one UNet prediction of the latents' shape;
(c) offline, a hub id missing from an empty cache fails at once with the download command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from diffdpo.diffusion.hub_layouts import (  # noqa: E402
    PUBLISHED_REPOS,
    build_from_published,
    published_files,
    published_model_index,
    shrunk_widths,
)
from diffdpo.diffusion.models import AudioLDM2Backbone, load_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPOS = list(PUBLISHED_REPOS)

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folders: dict[str, Path] = {}

    def get(repo: str) -> Path:
        if repo not in folders:
            folders[repo] = build_from_published(repo, tmp_path_factory.mktemp(repo.replace("/", "--")))
        return folders[repo]

    return get


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v and k not in ("id2label", "label2id", "task_specific_params"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _smaller(built, published) -> bool:
    if isinstance(published, (list, tuple)):
        return len(built) == len(published) and all(_smaller(b, p) for b, p in zip(built, published))
    if published is None:
        return built is None
    return built <= published


# ------------------------------------------------------------------ (a) layout and configs


@pytest.mark.parametrize("repo", REPOS)
def test_layout_and_configs_keep_published_values(repo, built):
    folder = built(repo)
    index = published_model_index(repo)
    assert json.loads((folder / "model_index.json").read_text()) == index
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    assert {p.name for p in folder.iterdir() if p.is_dir()} == components

    widths = shrunk_widths(repo)
    for rel, published in published_files(repo).items():
        if rel == "model_index.json":
            continue
        component = rel.split("/")[0]
        assert component in components, rel
        got, want = _flat(json.loads((folder / rel).read_text())), _flat(published)
        shrunk = widths.get(component, {})
        assert set(shrunk) <= set(want), f"{rel}: width keys not in the published file: {set(shrunk) - set(want)}"
        for key, value in want.items():
            assert key in got, f"{rel}: published key {key!r} missing"
            if key in shrunk:
                target = shrunk[key]
                assert (got[key] == target) if target is not None else _smaller(got[key], value), (rel, key)
                assert _smaller(got[key], value), f"{rel}: {key} {got[key]} is not a shrunk {value}"
            else:
                assert got[key] == value, f"{rel}: {key} = {got[key]!r}, published {value!r}"


def test_sd15_safety_checker_and_feature_extractor_load(built):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    folder = built("stable-diffusion-v1-5/stable-diffusion-v1-5")
    checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker")
    processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    pixels = processor(Image.new("RGB", (40, 30), (200, 10, 10)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    assert checker.vision_model(pixels).pooler_output.shape[-1] == checker.config.vision_config.hidden_size


# ------------------------------------------------------------------ (b) load_backbone and one UNet step


def _one_step(backbone, tmp_path: Path):
    cond = backbone.encode_prompt("a dog barks twice")
    if backbone.media == "audio":
        sf.write(tmp_path / "clip.wav", np.random.RandomState(0).randn(22050).astype("float32") * 0.1, 22050)
        media = backbone.load_media(tmp_path / "clip.wav")
    else:
        Image.fromarray((np.random.RandomState(0).rand(80, 96, 3) * 255).astype("uint8")).save(tmp_path / "im.png")
        media = backbone.load_media(tmp_path / "im.png")
    latents = backbone.media_to_latents(media.unsqueeze(0))
    packed = 4 if backbone.family == "flux" else 1  # Flux's transformer reads 2x2 patches packed into channels
    assert latents.shape[1] * packed == backbone.unet.config.in_channels and torch.isfinite(latents).all()
    pred = backbone.predict(backbone.unet, torch.randn_like(latents), torch.tensor([500]), cond)
    assert pred.shape == latents.shape and torch.isfinite(pred).all()
    return cond, latents


@pytest.mark.parametrize("repo", REPOS)
def test_load_backbone_encodes_and_predicts(repo, built, tmp_path):
    family = PUBLISHED_REPOS[repo]
    backbone = load_backbone(family, str(built(repo)), resolution=64, audio_seconds=0.32)
    cond, latents = _one_step(backbone, tmp_path)
    if family == "sdxl":
        assert cond["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]
    if backbone.media == "audio":  # 0.32 s at hop 160 -> 32 frames; mel bins and frames / 4 by the VAE
        assert latents.shape[2:] == (32 // 4, backbone.pipe.vocoder.config.model_in_dim // 4)


# ------------------------------------------------------------------ (c) offline, not cached: fails at once


def test_offline_hub_id_not_in_cache_fails_at_once_with_download_command(tmp_path):
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    code = (
        "import time\n"
        "from diffdpo.diffusion.models import OfflineModelError, load_backbone\n"
        "t = time.time()\n"
        "try:\n"
        f"    load_backbone('sd15', {repo!r})\n"
        "except OfflineModelError as err:\n"
        "    print('SECONDS', time.time() - t)\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert "SECONDS" in out.stdout, out.stdout + out.stderr
    assert float(out.stdout.split("SECONDS")[1].split()[0]) < 10
    assert f"hf download {repo} --local-dir models/stable-diffusion-v1-5" in out.stdout
    assert "point model.name_or_path at it (models/stable-diffusion-v1-5)" in out.stdout
    assert not any((tmp_path / "hf").rglob("*.json"))  # nothing was fetched
