"""SD3 and Flux (flow-matching transformers) under Diffusion-DPO, i.e. Flow-DPO, from tiny folders in the exact
layouts of stabilityai/stable-diffusion-3-medium-diffusers and black-forest-labs/FLUX.1-dev:

* the recipe trains a step and samples, fully fine-tuned and with LoRA, and the LoRA file loads into the
  diffusers pipeline (weights equal), sampling in between training steps (its own scheduler state);
* the toolkit's loss and gradients equal a re-derivation written here from the published formulas (the
  schedule's sigmas, x_t = (1 - sigma) x0 + sigma eps, target eps - x0, Flux's 2x2 packing and image ids, the
  -0.5 * beta DPO form of TangoFlux / flow_grpo plus TangoFlux's winner term);
* logit-normal timestep draws have the published density; the published-setting configs load.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusion_dpo  # noqa: E402

from diffdpo.config import load_config  # noqa: E402
from diffdpo.diffusion.api import diffusion_dpo_loss  # noqa: E402
from helpers.flow_dpo import assert_flow_dpo_is_the_rederivation  # noqa: E402
from diffdpo.diffusion.logratios import draw_pairs, pair_seed  # noqa: E402
from diffdpo.diffusion.models import load_backbone  # noqa: E402
from diffdpo.diffusion.tiny import build_tiny  # noqa: E402

FAMILIES = ["sd3", "flux"]
# LoRA on the joint attention's image and text projections (diffusers train_dreambooth_lora_sd3.py, flow_grpo)
TARGETS = "[attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, " \
          "attn.to_add_out]"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_models")
    return lambda family: str(build_tiny(family, root / family))


def run(model: str, out: Path, family: str, **extra) -> dict:
    args = {"model.family": family, "model.name_or_path": model, "model.resolution": 64, "data.source": "toy",
            "data.path": str(out.parent / f"toy_{family}"), "data.toy_pairs": 2, "train.output_dir": str(out),
            "train.report_to": "none", "train.per_device_batch": 1, "train.max_steps": 1, "train.lr": 1e-3,
            "train.proportion_empty_prompts": 0.5, "validation.prompts": "[a dog]", "validation.every": 1,
            "validation.num_inference_steps": 2, **extra}
    return diffusion_dpo.main([f"{k}={v}" for k, v in args.items()])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_trains_a_step_samples_and_saves_the_pipeline(models, tmp_path, family):
    from PIL import Image

    res = run(models(family), tmp_path / "run", family, **{"train.timestep_sampling": "logit_normal"})
    assert res["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at step 0
    with Image.open(tmp_path / "run" / "samples" / "step_1" / "0.png") as image:
        assert image.size == (64, 64)
    assert (tmp_path / "run" / "final" / "transformer").is_dir() and (tmp_path / "run" / "final" / "vae").is_dir()


@pytest.mark.parametrize("family,pipeline", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_lora_trains_around_sampling_and_loads_into_the_pipeline(models, tmp_path, family, pipeline):
    """Two steps with a validation sample after each: the second step draws from the 1000-step training
    schedule although sampling set the pipeline's scheduler to 2 steps."""
    import diffusers

    res = run(models(family), tmp_path / "lora", family, **{
        "train.max_steps": 2, "train.lr": 1e-2, "model.lora_rank": 4, "model.lora_targets": TARGETS,
        "reference": "lora_disabled"})
    assert len(list((tmp_path / "lora" / "samples").iterdir())) == 2
    trained = {k: v for k, v in res["trainable"].items() if "lora" in k}
    assert any("add_q_proj" in k for k in trained) and any(v.abs().sum() > 0 for k, v in trained.items()
                                                             if "lora_B" in k)
    pipe = getattr(diffusers, pipeline).from_pretrained(models(family))
    pipe.load_lora_weights(str(tmp_path / "lora" / "final"))
    loaded = {k.replace(".default_0", ".default"): v for k, v in pipe.transformer.state_dict().items() if "lora" in k}
    assert set(loaded) == set(trained)
    for k, v in trained.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)


# ---------------------------------------------------------------- Flow-DPO against a re-derivation


def _sigma_and_t(scheduler, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowMatchEulerDiscreteScheduler's training schedule from its config: t_i = N - i, s = t / N, shifted
    s' = shift s / (1 + (shift - 1) s) unless the shift is dynamic (Flux: resolution-dependent, applied only
    when sampling); the model reads t = s' N. In float32, as the scheduler computes it: a t off by 1e-4
    moves the timestep embedding enough for beta = 1000 to show it in the gradients."""
    n, cfg = scheduler.config.num_train_timesteps, scheduler.config
    s = (n - index).float() / n
    if not cfg.use_dynamic_shifting:
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    return s, s * n


def _by_hand(family: str, transformer, x_t, t, cond, guidance: float):
    """The transformer's velocity, called directly: Flux gets 2x2 patches packed into channels (row-major over
    the h/2 x w/2 grid), image ids (0, row, column), zero text ids, t / 1000 and the guidance value."""
    if family == "sd3":
        return transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                           pooled_projections=cond["pooled_projections"]).sample
    b, c, h, w = x_t.shape
    packed = x_t.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    states = cond["encoder_hidden_states"]
    out = transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full((b,), guidance),
                      pooled_projections=cond["pooled_projections"], encoder_hidden_states=states,
                      txt_ids=torch.zeros(states.shape[1], 3), img_ids=img_ids).sample
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])  # 1.0: TangoFlux's CRPO adds the winners' flow-matching loss
@pytest.mark.parametrize("family", FAMILIES)
def test_flow_dpo_loss_and_gradients_equal_a_rederivation(models, family, sft_weight):
    backbone = load_backbone(family, models(family), resolution=64, guidance=3.5)
    policy = backbone.unet
    reference = copy.deepcopy(policy).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy off the reference so the log-ratios are not zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    scheduler = type(backbone.pipe.scheduler).from_config(backbone.pipe.scheduler.config)
    cond = {k: torch.cat([backbone.encode_prompt(p)[k] for p in ("a dog barks", "rain")])
            for k in ("encoder_hidden_states", "pooled_projections")}
    winners, losers, noise = (torch.randn(2, 16, 8, 8, generator=g) for _ in range(3))
    index = torch.tensor([120, 730])
    beta = 2000.0  # TangoFlux: -logsigmoid(-0.5 * 2000 * (model_diff - ref_diff)) = the tango2 convention

    out = diffusion_dpo_loss(policy, reference, scheduler, winners, losers, cond, noise, index, beta=beta,
                             beta_convention="tango2", sft_weight=sft_weight, predict=backbone.predict)
    params = [p for p in policy.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad(out.loss, params)

    sigma, t = _sigma_and_t(scheduler, index)
    assert_flow_dpo_is_the_rederivation(out, got_grads, params, policy, reference,
                                        lambda m, x, tt, c: _by_hand(family, m, x, tt, c, 3.5),
                                        winners, losers, noise, sigma, t, cond, beta, sft_weight)


# ---------------------------------------------------------------- timesteps and configs


def test_logit_normal_draws_have_the_published_density():
    """index = floor(sigmoid(z) * N), z ~ N(mean, std): the logits of the drawn indices' centres recover mean and
    std; a restricted range maps the same u into that range."""
    seeds = [pair_seed(0, i, 0) for i in range(3000)]
    for mean, std in ((0.0, 1.0), (1.0, 0.5)):
        idx = draw_pairs(seeds, (1,), 1000, 0.0, sampling="logit_normal", logit_mean=mean, logit_std=std).step_index
        z = torch.logit((idx.double() + 0.5) / 1000)
        assert z.mean().item() == pytest.approx(mean, abs=0.06) and z.std().item() == pytest.approx(std, abs=0.06)
    half = draw_pairs(seeds, (1,), 1000, 0.0, step_range=(0.0, 0.5), sampling="logit_normal").step_index
    assert half.max() < 500 and torch.logit((half.double() + 0.5) / 500).mean().abs() < 0.06
    with pytest.raises(ValueError, match="timestep sampling"):
        draw_pairs(seeds[:1], (1,), 1000, 0.0, sampling="cosmap")


@pytest.mark.parametrize("name,family,beta,sampling", [("tiny_sd3", "sd3", 50.0, "logit_normal"),
                                                         ("tiny_flux", "flux", 50.0, "uniform"),
                                                         ("sd3_lora_dpo", "sd3", 50.0, "logit_normal")])
def test_flow_configs_load_with_their_settings(name, family, beta, sampling):
    path = ROOT / "recipes" / "configs" / f"{name}.yaml"
    cfg = load_config(diffusion_dpo.DiffusionDPOConfig, path)
    assert (cfg.model.family, cfg.loss.core_beta(), cfg.train.timestep_sampling) == (family, beta, sampling)
    assert "attn.add_q_proj" in cfg.model.lora_targets and cfg.reference == "lora_disabled"
    text = path.read_text()
    assert text.startswith("#") and "recipes/diffusion_dpo.py --config" in text
    with pytest.raises(ValueError, match="train.timestep_sampling"):
        load_config(diffusion_dpo.DiffusionDPOConfig, path, ["train.timestep_sampling=mode"])
