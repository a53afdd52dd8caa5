"""recipes/soundworld_pretrain.py's generator stage, tiny: from scratch it writes a loadable
pipeline and a manifest entry; continued from a saved generator it keeps that generator's
tokenizer and VAE exactly, starts UNet and text encoder from its weights, and records where it
started. The evaluate stage judges a generator with the oracle and records its caption sensitivity."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["stages=[generator]", "threads=1", "data.generator_clips=12", "data.validation_clips=4",
        "vae.steps=2", "vae.batch_size=4", "generator.batch_size=4", "generator.snapshot_every=0"]


@pytest.fixture(scope="module")
def recipe():
    sys.path.insert(0, str(ROOT / "recipes"))
    import soundworld_pretrain

    return soundworld_pretrain


@pytest.fixture(scope="module")
def pretrain(recipe):
    def run(out: Path, *overrides: str) -> dict:
        recipe.main(["--config", str(ROOT / "recipes/configs/soundworld_pretrain.yaml"), *TINY,
                     f"output_dir={out}", f"work_dir={out.parent / (out.name + '_work')}", *overrides])
        return json.loads((out / "MANIFEST.json").read_text())["generator"]

    return run


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_generator_from_scratch_then_continued(pretrain, tmp_path):
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    first = pretrain(tmp_path / "first", "generator.steps=2")
    assert first["metrics"]["generator"]["steps"] == 2 and "continued_from" not in first["metrics"]
    base = TangoPipeline.from_pretrained(tmp_path / "first" / "generator")

    # zero further steps: the EMA copy that ships is the starting point itself
    kept = pretrain(tmp_path / "kept", f"generator_init={tmp_path / 'first' / 'generator'}", "generator.steps=0")
    assert kept["metrics"]["continued_from"] == first
    assert kept["metrics"]["vae"]["kept_from"] == str(tmp_path / "first" / "generator")
    again = TangoPipeline.from_pretrained(tmp_path / "kept" / "generator")
    for name in ("vae", "unet", "text_encoder"):
        assert _same(getattr(base, name), getattr(again, name)), name
    assert again.tokenizer.get_vocab() == base.tokenizer.get_vocab()

    # two further steps: the VAE and tokenizer are still the starting point's, the UNet moved
    pretrain(tmp_path / "more", f"generator_init={tmp_path / 'first' / 'generator'}", "generator.steps=2")
    more = TangoPipeline.from_pretrained(tmp_path / "more" / "generator")
    assert _same(base.vae, more.vae)
    assert more.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    assert not _same(base.unet, more.unet)


def test_vae_init_reuses_the_vae_and_trains_the_rest_anew(pretrain, recipe, tmp_path):
    """Two bases that differ only in their captions: the weak one reuses the other's VAE exactly
    (weights, latent shift and scale) and learns its own tokenizer, text encoder and UNet."""
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    pretrain(tmp_path / "clean", "generator.steps=1")
    clean = TangoPipeline.from_pretrained(tmp_path / "clean" / "generator")
    weak = pretrain(tmp_path / "weak", f"vae_init={tmp_path / 'clean' / 'generator'}", "generator.steps=1",
                    "weak_captions.omit_rate=0.5", "weak_captions.order_drop_rate=1.0")
    assert weak["metrics"]["vae"]["kept_from"] == str(tmp_path / "clean" / "generator")
    made_by = json.loads((tmp_path / "clean" / "MANIFEST.json").read_text())["generator"]["command"]
    assert weak["metrics"]["vae_from"] == {"generator": made_by, "decoder": None}
    assert weak["metrics"]["weak_captions"]["enabled"] and "continued_from" not in weak["metrics"]
    made = TangoPipeline.from_pretrained(tmp_path / "weak" / "generator")
    assert _same(clean.vae, made.vae)
    for key in ("shift_factor", "scaling_factor"):
        assert made.vae.config[key] == clean.vae.config[key]
    assert not _same(clean.unet, made.unet)
    assert made.tokenizer.get_vocab() != clean.tokenizer.get_vocab()  # the weak captions' words joined
    with pytest.raises(ValueError, match="generator_init and vae_init"):
        recipe.main(["stages=[generator]", "generator_init=a", "vae_init=b", f"output_dir={tmp_path / 'x'}"])


def test_position_features_installed_by_the_recipe_and_kept_when_continued(pretrain, tmp_path):
    from diffdpo.diffusion.tango.position import position_features
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    pretrain(tmp_path / "plain", "generator.steps=0")
    plain = TangoPipeline.from_pretrained(tmp_path / "plain" / "generator")
    assert position_features(plain.unet) is None

    pretrain(tmp_path / "featured", f"generator_init={tmp_path / 'plain' / 'generator'}", "generator.steps=0",
             "arch.query_time=4", "arch.key_position=2")
    featured = TangoPipeline.from_pretrained(tmp_path / "featured" / "generator")
    assert position_features(featured.unet) == {"query_time": 4.0, "key_position": 2.0}
    assert _same(plain.unet, featured.unet)  # the features are fixed: no weights added

    # continued without naming them, a featured generator keeps its features
    pretrain(tmp_path / "kept", f"generator_init={tmp_path / 'featured' / 'generator'}", "generator.steps=0")
    kept = TangoPipeline.from_pretrained(tmp_path / "kept" / "generator")
    assert position_features(kept.unet) == {"query_time": 4.0, "key_position": 2.0}


def test_evaluate_stage_records_the_verdict_and_caption_sensitivity(recipe, tmp_path):
    import shutil

    from diffdpo.worlds.soundworld import WEIGHTS_DIR

    out = tmp_path / "weights"
    for name in ("generator", "oracle"):
        shutil.copytree(WEIGHTS_DIR / name, out / name)
    recipe.main(["--config", str(ROOT / "recipes/configs/soundworld_pretrain.yaml"), "stages=[evaluate]", "threads=1",
                 f"output_dir={out}", f"work_dir={tmp_path / 'work'}", "evaluate.captions=3", "evaluate.steps=2",
                 "evaluate.sensitivity_clips=12"])
    entry = json.loads((out / "MANIFEST.json").read_text())["evaluate"]
    assert entry["metrics"]["settings"]["captions"] == 3
    rows = entry["metrics"]["caption_sensitivity"]
    assert {r["variant"] for r in rows} == {"reversed", "replaced"} and len(rows) == 12
    assert all(0 <= r["true_better"] <= 1 for r in rows)


class _ZeroUNet(torch.nn.Module):
    """Predicts zeros, so the training loss is the mean square of the target itself."""

    def __init__(self, in_channels: int):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(in_channels=in_channels)
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.weight * x[:, : x.shape[1] - 1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_generator_trains_toward_the_schedulers_target(prediction_type):
    """The loss of one step equals the mean square of the hand-derived target for the draws the
    step made: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (latents far from zero, so the
    two differ)."""
    from diffdpo.worlds.soundworld.components import GeneratorArch, build_scheduler, build_text_encoder, train_tokenizer
    from diffdpo.worlds.soundworld.train import GeneratorConfig, train_generator

    captions = ["a dog barks", "a bell rings", "rain falls", "a siren wails"]
    tokenizer = train_tokenizer(captions)
    scheduler = build_scheduler(prediction_type, "trailing")
    drawn = []
    add_noise = scheduler.add_noise
    scheduler.add_noise = lambda x0, noise, t: drawn.append((x0, noise, t)) or add_noise(x0, noise, t)
    latents = 3.0 + torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = GeneratorConfig(steps=1, batch_size=4, cfg_dropout=0.0, snapshot_every=0, prediction_type=prediction_type)
    metrics, _, _ = train_generator(_ZeroUNet(5), build_text_encoder(len(tokenizer), GeneratorArch()), tokenizer,
                                    scheduler, latents, captions, cfg)

    (x0, noise, t), = drawn
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert metrics["final_loss_ema"] == pytest.approx(target.pow(2).mean().item(), rel=1e-5)
    assert scheduler.config.timestep_spacing == "trailing"


def test_flow_generator_trains_toward_the_velocity_at_logit_normal_times(monkeypatch):
    """Rectified flow: x_t = (1 - s) x0 + s eps with s = t / 1000, target eps - x0 (hand-derived, not
    the scheduler's), and one step's loss is its mean square; the timesteps follow SD3's logit-normal
    density, so they gather in the middle (|s - 0.5| averages ~0.18 against uniform's 0.25)."""
    from diffdpo.diffusion import logratios
    from diffdpo.worlds.soundworld.components import GeneratorArch, build_scheduler, build_text_encoder, train_tokenizer
    from diffdpo.worlds.soundworld.train import GeneratorConfig, train_generator

    captions = ["a dog barks", "a bell rings", "rain falls", "a siren wails"]
    tokenizer = train_tokenizer(captions)
    scheduler = build_scheduler("flow_matching")
    drawn, noisy = [], logratios.noisy_and_target
    monkeypatch.setattr(logratios, "noisy_and_target",
                        lambda sch, x0, eps, idx: drawn.append((x0, eps, idx)) or noisy(sch, x0, eps, idx))
    latents = 3.0 + torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = GeneratorConfig(steps=1, batch_size=4, cfg_dropout=0.0, snapshot_every=0, prediction_type="flow_matching",
                          timestep_sampling="logit_normal")
    encoder = build_text_encoder(len(tokenizer), GeneratorArch())
    metrics, _, _ = train_generator(_ZeroUNet(5), encoder, tokenizer, scheduler, latents, captions, cfg)
    (x0, eps, idx), = drawn
    assert metrics["final_loss_ema"] == pytest.approx((eps - x0).pow(2).mean().item(), rel=1e-5)
    s = (1000 - idx).float() / 1000  # index 0 is t = 1000, pure noise
    xt, t, _ = noisy(scheduler, x0, eps, idx)
    assert torch.allclose(t, 1000 * s) and torch.allclose(xt, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps)

    drawn.clear()
    train_generator(_ZeroUNet(5), encoder, tokenizer, scheduler, latents, captions,
                    dataclasses.replace(cfg, steps=100))
    s = torch.cat([(1000 - idx).float() / 1000 for _, _, idx in drawn])
    assert len(s) == 400 and 0.15 < (s - 0.5).abs().mean().item() < 0.21


def test_flow_base_saves_loads_and_samples_with_euler_steps(tmp_path):
    """A Tango-layout folder whose scheduler is rectified flow loads as one and samples with Euler steps:
    x <- x + (s_next - s) v(x, 1000 s), s from 1 to 1/1000 evenly, then 0 (hand-written loop)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.diffusion.tiny import build_tiny
    from diffdpo.worlds.soundworld.components import build_scheduler

    folder = build_tiny("tango", tmp_path / "tiny")
    pipe = TangoPipeline.from_pretrained(folder)
    pipe.scheduler = build_scheduler("flow_matching")
    pipe.save_pretrained(tmp_path / "flow")
    flow = TangoPipeline.from_pretrained(tmp_path / "flow")
    assert isinstance(flow.scheduler, FlowMatchEulerDiscreteScheduler)
    assert json.loads((tmp_path / "flow" / "model_index.json").read_text())["scheduler"][1] == type(flow.scheduler).__name__

    got = flow.sample_latents(["a dog barks", "rain"], num_inference_steps=3, guidance_scale=2.0, seed=7)
    x = torch.stack([torch.randn(flow.latent_shape, generator=torch.Generator().manual_seed(7 + i)) for i in range(2)])
    states, mask = flow.encode_text(["a dog barks", "rain", "", ""])
    sigmas = [*torch.linspace(1.0, 1 / 1000, 3).tolist(), 0.0]
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            cond, uncond = flow.unet_forward(torch.cat([x, x]), torch.full((4,), 1000 * s), states, mask).chunk(2)
            x = x + (s_next - s) * (uncond + 2.0 * (cond - uncond))
    assert torch.allclose(got, x, atol=1e-5)


def test_decoder_stage_trains_the_decoder_only(pretrain, recipe, tmp_path):
    """The decoder stage changes the decoder and nothing else: encoder, latent statistics, UNet,
    text encoder and the generator's manifest entry are exactly as the generator stage left them,
    and the held-out reconstruction it records got better."""
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    out = tmp_path / "weights"
    generator_entry = pretrain(out, "generator.steps=1")
    base = TangoPipeline.from_pretrained(out / "generator")
    recipe.main(["--config", str(ROOT / "recipes/configs/soundworld_pretrain.yaml"), "stages=[decoder]", "threads=1",
                 f"output_dir={out}", f"work_dir={tmp_path / 'work'}", "data.decoder_clips=12",
                 "data.validation_clips=4", "decoder.steps=10", "decoder.batch_size=4", "decoder.lr=3e-3",
                 "decoder.warmup=1"])
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["generator"] == generator_entry
    metrics = manifest["decoder"]["metrics"]
    assert metrics["steps"] == 10 and metrics["stopped_by"] == "steps"
    assert metrics["validation_logmel_l1"] < metrics["validation_logmel_l1_before"]

    tuned = TangoPipeline.from_pretrained(out / "generator")
    before, after = base.vae.state_dict(), tuned.vae.state_dict()
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder and sorted(encoder + decoder) == sorted(before)
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    for key in ("shift_factor", "scaling_factor"):
        assert tuned.vae.config[key] == base.vae.config[key]
    assert _same(base.unet, tuned.unet) and _same(base.text_encoder, tuned.text_encoder)
    assert "_name_or_path" not in json.loads((out / "generator" / "vae" / "config.json").read_text())
