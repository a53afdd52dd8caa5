"""The ``tangoflux`` family (diffdpo.diffusion.tangoflux) from tiny folders in TangoFlux's own published layout:

* a checkpoint written here key by key in the published names (``transformer.*``, ``text_encoder.*`` without the
  tied embedding alias, ``fc.0.*``, ``duration_emebdder.time_positional_embedding.*``) loads, every tensor lands
  where TangoFlux puts it, the conditioning equals TangoFlux's formulas written out here, and saving writes the
  same keys back; unknown or missing keys are refused;
* the regular recipe trains a Diffusion-DPO step on an audio preference set (full fine-tuning: the saved folder
  reloads; LoRA through ``diffdpo train``: the LoRA file loads into the pipeline), sampling writes stereo audio;
* the toolkit's Flow-DPO loss (TangoFlux's CRPO form, with and without the winner term) and its gradients equal a
  re-derivation on one batch; padded prompts in a batch predict as they do alone;
* the published-settings configs load with TangoFlux's numbers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusion_dpo  # noqa: E402

from diffdpo.config import load_config  # noqa: E402
from diffdpo.diffusion import tangoflux as tf  # noqa: E402
from diffdpo.diffusion.api import diffusion_dpo_loss  # noqa: E402
from helpers.flow_dpo import assert_flow_dpo_is_the_rederivation  # noqa: E402
from diffdpo.diffusion.encode import stack_conditions  # noqa: E402
from diffdpo.diffusion.hub import OfflineModelError  # noqa: E402
from diffdpo.diffusion.models import load_backbone  # noqa: E402

SECONDS = 0.4  # clip length of the tiny model (its window, max_duration, is 0.512 s)
TARGETS = "[attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, " \
          "attn.to_add_out]"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(tf.build_checkpoint(tmp_path_factory.mktemp("tangoflux") / "tiny"))


# ---------------------------------------------------------------- the published layout


def _published_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """A tiny checkpoint written key by key as TangoFlux's nn.Module names its state (not through
    ``published_state``), with the tiny T5 tokenizer/config folder ``config.json`` names."""
    from diffusers import AutoencoderOobleck, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from diffdpo.diffusion.tiny import text_encoder_folder

    folder.mkdir(parents=True)
    t5_dir = text_encoder_folder(folder / "t5")
    config = {**json.loads(tf.PUBLISHED_CONFIG.read_text()), **tf.TINY, "text_encoder_name": "t5",
              tf.VAE_CONFIG_KEY: tf.TINY_VAE}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config.from_pretrained(t5_dir))
    d = t5.config.d_model
    transformer = FluxTransformer2DModel(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                         num_attention_heads=1, joint_attention_dim=d, pooled_projection_dim=d,
                                         guidance_embeds=False)
    state = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
    state.update({"fc.0.weight": torch.randn(d, d) * 0.3, "fc.0.bias": torch.randn(d) * 0.3,
                  "duration_emebdder.time_positional_embedding.0.weights": torch.randn(128),
                  "duration_emebdder.time_positional_embedding.1.weight": torch.randn(d, 257) * 0.1,
                  "duration_emebdder.time_positional_embedding.1.bias": torch.randn(d) * 0.1})
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "tangoflux.safetensors")
    save_file(AutoencoderOobleck(**tf.TINY_VAE).state_dict(), folder / "vae.safetensors")
    return state


def test_a_checkpoint_in_the_published_key_layout_loads_and_saves_back(tmp_path):
    from safetensors.torch import load_file

    state = _published_checkpoint(tmp_path / "published")
    pipe = tf.TangoFluxPipeline.from_pretrained(tmp_path / "published")

    # every published tensor is where TangoFlux puts it; the T5 embedding is the tied shared weight
    for key, value in state.items():
        module, name = key.split(".", 1)
        if module in ("transformer", "text_encoder"):
            got = getattr(pipe, module).state_dict()[name]
        else:
            got = pipe.conditioner.state_dict()[tf.CONDITIONER_KEYS[key]]
        torch.testing.assert_close(got, value, rtol=0, atol=0)
    assert pipe.text_encoder.encoder.embed_tokens.weight is pipe.text_encoder.shared.weight

    # the conditioning as TangoFlux computes it, written out: T5 states of the prompt, then the duration token
    # W [u, sin(2 pi u w), cos(2 pi u w)] + b, u = seconds / max_duration; pooled = ReLU(fc(mean over tokens))
    cond = pipe.condition(["a dog barks"], 0.3)
    ids = pipe.tokenizer(["a dog barks"], return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(input_ids=ids)[0]
    u = torch.tensor([[0.3 / tf.TINY["max_duration"]]])
    w = state["duration_emebdder.time_positional_embedding.0.weights"]
    features = torch.cat([u, torch.sin(2 * math.pi * u * w), torch.cos(2 * math.pi * u * w)], dim=-1)
    token = features @ state["duration_emebdder.time_positional_embedding.1.weight"].T \
        + state["duration_emebdder.time_positional_embedding.1.bias"]
    pooled = torch.relu(states.mean(1) @ state["fc.0.weight"].T + state["fc.0.bias"])
    torch.testing.assert_close(cond["encoder_hidden_states"], torch.cat([states, token[:, None]], 1))
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    assert cond["encoder_attention_mask"].all() and cond["encoder_hidden_states"].shape[1] == ids.shape[1] + 1
    with pytest.raises(AssertionError):  # the duration token reads the duration
        torch.testing.assert_close(pipe.condition(["a dog barks"], 0.1)["encoder_hidden_states"],
                                   cond["encoder_hidden_states"])

    # saving writes the published keys back, tensors unchanged, and the same config (tokenizer folder copied)
    pipe.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "tangoflux.safetensors")
    assert set(saved) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == \
        json.loads((tmp_path / "published" / "config.json").read_text())
    assert (tmp_path / "saved" / "t5" / "config.json").is_file()
    tf.TangoFluxPipeline.from_pretrained(tmp_path / "saved")

    # keys of no module, or a missing one, are refused
    from safetensors.torch import save_file

    save_file({**state, "ref_transformer.x": torch.zeros(1)}, tmp_path / "published" / "tangoflux.safetensors")
    with pytest.raises(ValueError, match="ref_transformer.x"):
        tf.TangoFluxPipeline.from_pretrained(tmp_path / "published")
    save_file({k: v for k, v in state.items() if k != "fc.0.bias"}, tmp_path / "published" / "tangoflux.safetensors")
    with pytest.raises(ValueError, match="pooled_proj.bias"):
        tf.TangoFluxPipeline.from_pretrained(tmp_path / "published")


def test_the_tiny_folder_keeps_every_published_config_key():
    published = json.loads(tf.PUBLISHED_CONFIG.read_text())
    assert published == {"num_layers": 6, "num_single_layers": 18, "in_channels": 64, "attention_head_dim": 128,
                         "joint_attention_dim": 1024, "num_attention_heads": 8, "audio_seq_len": 645,
                         "max_duration": 30, "uncondition": False, "text_encoder_name": "google/flan-t5-large"}
    vae = json.loads(tf.SAO_VAE_CONFIG.read_text())
    import inspect

    from diffusers import AutoencoderOobleck

    # TangoFlux builds AutoencoderOobleck() at its defaults: they are Stable Audio Open's VAE config
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderOobleck.__init__).parameters.items()
                if k != "self"}
    assert {k: v for k, v in vae.items() if not k.startswith("_")} == {k: list(v) if isinstance(v, tuple) else v
                                                                       for k, v in defaults.items()}
    assert int(np.prod(vae["downsampling_ratios"])) * published["audio_seq_len"] <= 30 * vae["sampling_rate"]


def test_offline_hub_id_not_in_cache_fails_with_the_download_command():
    with pytest.raises(OfflineModelError, match="hf download declare-lab/TangoFlux --local-dir models/TangoFlux"):
        load_backbone("tangoflux", "declare-lab/TangoFlux")


# ---------------------------------------------------------------- the recipe


def _run(model: str, out: Path, **extra) -> dict:
    args = {"model.family": "tangoflux", "model.name_or_path": model, "model.audio_seconds": SECONDS,
            "data.source": "toy", "data.path": str(out.parent / "toy"), "data.toy_pairs": 2,
            "train.output_dir": str(out), "train.report_to": "none", "train.per_device_batch": 2,
            "train.max_steps": 1, "train.lr": 1e-3, "train.timestep_sampling": "logit_normal",
            "loss.beta": 2000, "loss.beta_convention": "tangoflux", "loss.sft_weight": 1.0,
            "validation.prompts": "[a dog barks]", "validation.every": 1, "validation.num_inference_steps": 2,
            "validation.guidance_scale": 4.5, **extra}
    return diffusion_dpo.main([f"{k}={v}" for k, v in args.items()])


def test_full_fine_tuning_trains_a_step_samples_audio_and_saves_the_checkpoint(model, tmp_path):
    res = _run(model, tmp_path / "run")
    step = res["history"][0]
    # policy = reference at step 0: the DPO term is log 2, plus the winners' velocity MSE (CRPO's winner term)
    assert step["loss"] == pytest.approx(math.log(2) + step["mse/policy_chosen"], abs=1e-4)
    wave, sr = sf.read(tmp_path / "run" / "samples" / "step_1" / "0.wav", always_2d=True)
    assert sr == tf.TINY_VAE["sampling_rate"] and wave.shape == (round(SECONDS * sr), 2) and np.isfinite(wave).all()
    final = tf.TangoFluxPipeline.from_pretrained(tmp_path / "run" / "final")
    for name, value in res["trainable"].items():
        torch.testing.assert_close(final.transformer.state_dict()[name], value, rtol=0, atol=0)
    base = tf.TangoFluxPipeline.from_pretrained(model)
    assert any(not torch.equal(base.transformer.state_dict()[k], v) for k, v in res["trainable"].items())


def test_lora_through_diffdpo_train_loads_into_the_pipeline(model, tmp_path):
    from safetensors.torch import load_file

    from diffdpo.cli import main

    out = tmp_path / "lora"
    args = {"model.family": "tangoflux", "model.name_or_path": model, "model.audio_seconds": SECONDS,
            "model.lora_rank": 4, "model.lora_targets": TARGETS, "reference": "lora_disabled",
            "data.source": "toy", "data.path": str(tmp_path / "toy"), "data.toy_pairs": 2,
            "train.output_dir": str(out), "train.report_to": "none", "train.per_device_batch": 2,
            "train.grad_accum": 1, "train.max_steps": 1, "train.lr": 1e-2, "train.save_every": 1, "loss.beta": 2000,
            "loss.beta_convention": "tangoflux", "loss.sft_weight": 1.0}
    assert main(["train", "--config", str(ROOT / "recipes" / "configs" / "tiny_tangoflux.yaml")]
                + [f"{k}={v}" for k, v in args.items()]) == 0
    trained = load_file(out / "checkpoints" / "step_1" / "trainable.safetensors")
    assert any("add_q_proj" in k for k in trained) and any(v.abs().sum() > 0 for k, v in trained.items()
                                                             if "lora_B" in k)
    pipe = tf.TangoFluxPipeline.from_pretrained(model)
    before = pipe(["a dog barks"], num_inference_steps=2, duration=SECONDS, seed=0)[0]
    pipe.load_lora_weights(out / "final")
    loaded = {k.replace(".default_0", ".default"): v for k, v in pipe.transformer.state_dict().items() if "lora" in k}
    assert set(loaded) == set(trained)
    for k, v in trained.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    after = pipe(["a dog barks"], num_inference_steps=2, duration=SECONDS, seed=0)[0]
    assert after.shape == before.shape == (2, round(SECONDS * tf.TINY_VAE["sampling_rate"]))
    assert not np.allclose(after, before)


# ---------------------------------------------------------------- Flow-DPO against a re-derivation


def _by_hand(transformer, x_t, t, cond):
    """The transformer called directly as TangoFlux calls it: sequence latents, t / 1000, rotary ids = the frame
    index on all three axes, zero text ids, no guidance embedding."""
    frames = x_t.shape[1]
    states = cond["encoder_hidden_states"]
    return transformer(hidden_states=x_t, timestep=t / 1000, guidance=None,
                       pooled_projections=cond["pooled_projections"], encoder_hidden_states=states,
                       txt_ids=torch.zeros(states.shape[1], 3),
                       img_ids=torch.arange(frames).float()[:, None].repeat(1, 3)).sample


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])  # 1.0: TangoFlux's CRPO adds the winners' flow-matching loss
def test_flow_dpo_loss_and_gradients_equal_a_rederivation(model, sft_weight):
    backbone = load_backbone("tangoflux", model, audio_seconds=SECONDS)
    policy = backbone.unet
    reference = copy.deepcopy(policy).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy off the reference so the log-ratios are not zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    scheduler = type(backbone.pipe.scheduler).from_config(backbone.pipe.scheduler.config)
    prompts = ("a dog barks", "a cat meows")  # the same token count: no padding in the batch
    cond = stack_conditions([backbone.encode_prompt(p) for p in prompts])
    assert cond["encoder_attention_mask"].all()
    winners, losers, noise = (torch.randn(2, 64, 8, generator=g) for _ in range(3))
    index = torch.tensor([120, 730])
    beta = 2000.0  # TangoFlux: -logsigmoid(-0.5 * 2000 * (model_diff - ref_diff)) + mse_w

    out = diffusion_dpo_loss(policy, reference, scheduler, winners, losers, cond, noise, index, beta=beta,
                             beta_convention="tangoflux", sft_weight=sft_weight, predict=backbone.predict)
    params = [p for p in policy.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad(out.loss, params)

    # TangoFlux's schedule: FlowMatchEulerDiscreteScheduler(1000), shift 1: index i -> sigma (1000 - i) / 1000
    sigma = (1000 - index).float() / 1000
    assert_flow_dpo_is_the_rederivation(out, got_grads, params, policy, reference,
                                        lambda m, x, tt, c: _by_hand(m, x, tt, c),
                                        winners, losers, noise, sigma, sigma * 1000, cond, beta, sft_weight)


def test_padded_prompts_in_a_batch_predict_as_they_do_alone(model):
    backbone = load_backbone("tangoflux", model, audio_seconds=SECONDS)
    short, long = backbone.encode_prompt("rain"), backbone.encode_prompt("a dog barks twice far away")
    batch = stack_conditions([short, long])
    assert not batch["encoder_attention_mask"][0].all()
    x, t = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([700.0, 200.0])
    with torch.no_grad():
        both = backbone.predict(backbone.unet, x, t, batch)
        alone = [backbone.predict(backbone.unet, x[i:i + 1], t[i:i + 1], c) for i, c in enumerate((short, long))]
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name,core_beta,lr", [("tiny_tangoflux", 50.0, 1e-3), ("tangoflux_crpo", 1000.0, 5e-4)])
def test_tangoflux_configs_load_with_their_settings(name, core_beta, lr):
    path = ROOT / "recipes" / "configs" / f"{name}.yaml"
    cfg = load_config(diffusion_dpo.DiffusionDPOConfig, path)
    assert (cfg.model.family, cfg.loss.core_beta(), cfg.loss.beta_convention, cfg.loss.sft_weight) == \
        ("tangoflux", core_beta, "tangoflux", 1.0)
    assert (cfg.train.timestep_sampling, cfg.train.logit_mean, cfg.train.logit_std, cfg.train.lr) == \
        ("logit_normal", 0.0, 1.0, lr)
    text = path.read_text()
    assert text.startswith("#") and "recipes/diffusion_dpo.py --config" in text


def test_the_full_size_bench_entry_is_the_published_transformer():
    """bench/bench_full_size.py's tangoflux entry builds the transformer TangoFlux's config.json gives with a
    1024-wide T5 (FLAN-T5-large): 516,695,616 parameters, which with FLAN-T5-large's encoder (341,231,104), fc and
    the duration embedding (1,313,920) is 859,240,640 float32 values = 3,436,962,560 bytes, 89,400 bytes (the
    safetensors header) short of the published tangoflux.safetensors (3,437,051,960 bytes). Counted on the meta
    device, nothing is allocated; the bench itself is not run here."""
    from transformers import T5Config

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_full_size as bfs

    assert bfs.count_params("tangoflux")["params"] == 516_695_616
    with torch.device("meta"):
        _, transformer, _, _ = tf.TangoFluxPipeline.build_modules(
            json.loads(tf.PUBLISHED_CONFIG.read_text()),
            T5Config(d_model=1024, d_ff=2816, num_layers=24, num_heads=16, d_kv=64, feed_forward_proj="gated-gelu",
                     vocab_size=32128))
    derived = {k: v for k, v in json.loads((tf.PUBLISHED / "transformer_config.json").read_text()).items()
               if not k.startswith("_")}
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer.config.items() if k in derived} \
        == derived
