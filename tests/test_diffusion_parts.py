"""Diffusion-DPO pieces: reference modes, data readers (ties, bad records, Pick-a-Pic / Audio-Alpaca
layouts), published configs and the offline fail-fast message."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffdpo.config import load_config  # noqa: E402
from diffdpo.diffusion.data import micro_batch, read_pairs  # noqa: E402
from diffdpo.diffusion.logratios import draw_pairs, pair_seed  # noqa: E402
from diffdpo.diffusion.models import OfflineModelError, load_audio, load_backbone, load_image  # noqa: E402
from diffdpo.diffusion.objective import diffusion_dpo_step  # noqa: E402
from diffdpo.diffusion.reference import FrozenCopyReference, LoraDisabledReference  # noqa: E402
from test_diffusion_logratios import B, batch, predict, tiny_unet  # noqa: E402


def test_lora_disabled_reference_equals_frozen_copy_and_stays_fixed():
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet = tiny_unet()
    frozen = FrozenCopyReference(unet)
    before = copy.deepcopy(frozen.unet.state_dict())
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_ref = LoraDisabledReference(unet)
    w, l, cond = batch()
    idx = list(range(B))
    opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-2)

    def step(reference, epoch):
        draws = draw_pairs([pair_seed(0, i, epoch) for i in idx], (4, 8, 8), 1000, 0.0)
        return diffusion_dpo_step(predict, unet, reference, scheduler, w, l, cond, draws, idx, beta=2500.0)

    a, b = step(frozen, 0), step(lora_ref, 0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    for epoch in range(3):
        opt.zero_grad()
        step(lora_ref, epoch).loss.backward()
        opt.step()
    after_policy = step(lora_ref, 9)
    assert not torch.equal(after_policy.policy_errors[0], after_policy.reference_errors[0])  # the policy moved
    for k, v in frozen.unet.state_dict().items():
        assert torch.equal(v, before[k])
    torch.testing.assert_close(step(frozen, 9).reference_errors[0], after_policy.reference_errors[0],
                               rtol=1e-6, atol=1e-7)


def test_lora_disabled_needs_lora():
    with pytest.raises(ValueError, match="LoRA"):
        LoraDisabledReference(tiny_unet())


# ---------------------------------------------------------------- data


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path: Path, rows: list[dict]) -> Path:
    """Rows as Parquet; audio cells typed as the hub's ``datasets`` Audio struct."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [(k, audio if k in ("chosen", "rejected") else pa.Table.from_pylist([{k: r[k]} for r in rows]).schema[0].type)
              for k in rows[0]]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return path


def test_pickapic_reader_orders_by_label_and_drops_ties(tmp_path):
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    file = _parquet(tmp_path / "train.parquet", [
        {"caption": "red wins", "jpg_0": red, "jpg_1": blue, "label_0": 1.0},
        {"caption": "red wins again", "jpg_0": blue, "jpg_1": red, "label_0": 0.0},
        {"caption": "a tie", "jpg_0": red, "jpg_1": blue, "label_0": 0.5},
    ])
    load = lambda m: load_image(m, 8)  # noqa: E731
    got = read_pairs("pickapic", file, "image", load)
    assert got.dropped_ties == 1 and len(got.pairs) == 2
    for pair in got.pairs:  # chosen is the red one whichever column it was in
        assert load(pair.chosen)[0].mean() > 0.9 and load(pair.rejected)[2].mean() > 0.9
        assert load(pair.chosen).shape == (3, 8, 8)  # any size is resized and centre-cropped
    with pytest.raises(ValueError, match="pair train-2: tie"):
        read_pairs("pickapic", file, "image", load, ties="error")


def test_bad_records_raise_naming_the_record_or_are_skipped_and_counted(tmp_path, caplog):
    good = _png((0, 255, 0))
    file = _parquet(tmp_path / "p.parquet", [
        {"caption": "fine", "jpg_0": good, "jpg_1": good, "label_0": 1.0},
        {"caption": "", "jpg_0": good, "jpg_1": good, "label_0": 1.0},
        {"caption": "broken image", "jpg_0": b"not an image", "jpg_1": good, "label_0": 1.0},
    ])
    load = lambda m: load_image(m, 8)  # noqa: E731
    with pytest.raises(ValueError, match=r"row 1: column 'caption' is empty"):
        read_pairs("pickapic", file, "image", load)
    with caplog.at_level(logging.WARNING):
        got = read_pairs("pickapic", file, "image", load, on_bad_record="skip")
    assert len(got.pairs) == 1 and got.skipped == 2
    assert "pair p-2: chosen media unreadable" in caplog.text


def test_audio_alpaca_reader_resamples_stereo_to_mono(tmp_path):
    sr, n = 44100, 4410
    t = np.arange(n) / sr
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], 1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, stereo, sr, format="WAV")
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "b.wav", stereo[:, 0] * 0.1, sr)
    file = _parquet(tmp_path / "a.parquet", [{"prompt": "a tone", "chosen": {"bytes": buf.getvalue(), "path": None},
                                              "rejected": {"bytes": None, "path": "clips/b.wav"}, "strategy": "x"}])
    load = lambda m: load_audio(m, 16000, 1600)  # noqa: E731
    pair = read_pairs("audio_alpaca", file, "audio", load).pairs[0]
    wave = load(pair.chosen)
    assert wave.shape == (1600,) and abs(wave.abs().max().item() - 1.0) < 0.05
    assert load(pair.rejected).abs().max().item() < 0.15
    missing = _parquet(tmp_path / "m.parquet", [{"prompt": "x", "chosen": {"bytes": None, "path": "nope.wav"},
                                                 "rejected": {"bytes": None, "path": "clips/b.wav"}}])
    with pytest.raises(ValueError, match="row 0 chosen: audio file not found"):
        read_pairs("audio_alpaca", missing, "audio", load)


def test_micro_batches_partition_each_epoch_identically_across_world_sizes():
    n, seed = 10, 3
    one = [micro_batch(n, seed, m, 4, 1, 0) for m in range(4)]
    two = [[micro_batch(n, seed, m, 2, 2, p) for p in range(2)] for m in range(4)]
    for (e1, i1), halves in zip(one, two):
        assert all(e == e1 for e, _ in halves) and halves[0][1] + halves[1][1] == i1
    assert one[0][0] == 0 and one[2][0] == 1  # 10 // 4 = 2 micro-batches per epoch
    assert len(set(one[0][1] + one[1][1])) == 8


# ---------------------------------------------------------------- configs and loading


@pytest.mark.parametrize("name,beta", [("tango2_dpo", 1000.0), ("audioldm_dpo", 1000.0), ("audioldm2_dpo", 1000.0),
                                       ("sd15_dpo", 2500.0), ("sdxl_lora_dpo", 2500.0)])
def test_published_configs_load_with_their_betas(name, beta):
    import diffusion_dpo

    cfg = load_config(diffusion_dpo.DiffusionDPOConfig, ROOT / "recipes" / "configs" / f"{name}.yaml")
    assert cfg.loss.core_beta() == beta
    text = (ROOT / "recipes" / "configs" / f"{name}.yaml").read_text()
    assert text.startswith("#") and "recipes/diffusion_dpo.py --config" in text


def test_tango2_config_has_the_published_schedule():
    import diffusion_dpo

    cfg = load_config(diffusion_dpo.DiffusionDPOConfig, ROOT / "recipes" / "configs" / "tango2_dpo.yaml")
    t = cfg.train
    assert (t.lr, t.per_device_batch, t.grad_accum, t.warmup_steps, t.epochs, cfg.loss.sft_epochs) == \
        (9.6e-7, 4, 4, 200, 5, 1)


def test_offline_hub_id_fails_fast_with_download_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.time()
    with pytest.raises(OfflineModelError, match="hf download stabilityai/stable-diffusion-xl-base-1.0"):
        load_backbone("sdxl", "stabilityai/stable-diffusion-xl-base-1.0")
    assert time.time() - start < 30
    with pytest.raises(OfflineModelError, match="docs/model_layout.md"):
        load_backbone("tango", "declare-lab/tango2")


def test_config_rejects_a_non_positive_guidance_scale():
    import diffusion_dpo

    with pytest.raises(ValueError, match="loss.guidance_scale"):
        load_config(diffusion_dpo.DiffusionDPOConfig, None, ["model.name_or_path=x", "loss.guidance_scale=0"])


def test_config_rejects_inconsistent_reference():
    import diffusion_dpo

    with pytest.raises(ValueError, match="lora_rank"):
        load_config(diffusion_dpo.DiffusionDPOConfig, None, ["model.name_or_path=x", "reference=lora_disabled"])
    cfg = load_config(diffusion_dpo.DiffusionDPOConfig, None, ["model.name_or_path=x", "reference=cached"])
    assert cfg.train.fixed_draws


@pytest.mark.parametrize("span", ["[0.5]", "[0.6, 0.4]", "[-0.1, 1.0]", "[0.0, 1.5]"])
def test_config_rejects_a_bad_timestep_range(span):
    """Caught when the config is read, before any model or latent is loaded."""
    import diffusion_dpo

    with pytest.raises(ValueError, match="train.timestep_range"):
        load_config(diffusion_dpo.DiffusionDPOConfig, None, ["model.name_or_path=x", f"train.timestep_range={span}"])
    assert load_config(diffusion_dpo.DiffusionDPOConfig, None,
                       ["model.name_or_path=x", "train.timestep_range=[0.5, 1.0]"]).train.timestep_range == [0.5, 1.0]


@pytest.mark.parametrize("family,guidance", [("sd15", 1.0), ("tango", 3.0)])
def test_cached_reference_matches_frozen_copy_in_the_recipe(tmp_path, family, guidance):
    """Also under ``loss.guidance_scale`` (tango: the empty prompt's shorter, masked condition is
    padded beside the prompts'); cached errors are keyed by the guidance and timestep range."""
    import diffusion_dpo
    from diffdpo.diffusion.tiny import build_tiny
    from test_diffusion_recipe import overrides

    model = str(build_tiny(family, tmp_path / "m"))
    common = {"train.fixed_draws": "true", "train.max_steps": 2, "loss.guidance_scale": guidance}
    copy_run = diffusion_dpo.main(overrides(model, tmp_path / "copy", family, **common, reference="copy"))
    cached = diffusion_dpo.main(overrides(model, tmp_path / "cached", family, **common, reference="cached"))
    diffusion_dpo.main(overrides(model, tmp_path / "cached", family, **common, reference="cached",
                                 **{"train.timestep_range": "[0.5, 1.0]"}))
    assert len(list((tmp_path / "cached" / "cache").glob("reference_*.safetensors"))) == 2
    for a, b in zip(copy_run["history"], cached["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["mse/ref_chosen"] == pytest.approx(b["mse/ref_chosen"], rel=1e-5)
    json.dumps(cached["history"])  # metrics are plain floats
