"""recipes/diffusion_dpo.py end to end on tiny models of the real classes (CPU, seconds each):
one step + one sampling call per family, kill -9 and resume bit-identically, LoRA output loadable
by ``pipe.load_lora_weights``, gradient accumulation and two processes equal one big batch,
and a separable toy set learned to > 0.9 implicit accuracy."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusion_dpo  # noqa: E402

from diffdpo.diffusion.tiny import build_tiny  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return lambda family: str(build_tiny(family, root / family))


def overrides(model_dir: str, out: Path, family: str = "sd15", **extra) -> list[str]:
    media = {"model.resolution": 16} if family in ("sd15", "sdxl") else {"model.audio_seconds": 0.32}
    base = {"model.family": family, "model.name_or_path": model_dir, "data.source": "toy",
            "data.path": str(out.parent / f"toy_{family}"), "data.toy_pairs": 8, "train.output_dir": str(out),
            "train.report_to": "none", "train.per_device_batch": 2, "train.max_steps": 2, "train.lr": 1e-3,
            "train.proportion_empty_prompts": 0.25, **media, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def run(args: list[str]) -> dict:
    return diffusion_dpo.main(args)


@pytest.mark.parametrize("family", ["tango", "audioldm", "audioldm2", "sd15", "sdxl"])
def test_each_family_trains_one_step_and_samples(models, tmp_path, family):
    res = run(overrides(models(family), tmp_path / "run", family, **{
        "train.max_steps": 1, "data.toy_pairs": 2, "train.per_device_batch": 1, "validation.prompts": "[a dog]",
        "validation.every": 1, "validation.num_inference_steps": 2}))
    assert res["steps"] == 1 and res["history"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at init
    samples = list((tmp_path / "run" / "samples" / "step_1").iterdir())
    assert [p.suffix for p in samples] == [".png" if family in ("sd15", "sdxl") else ".wav"]
    assert (tmp_path / "run" / "final" / "unet").is_dir()


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next((folder / "unet").glob("*.safetensors")))


def test_resume_continues_bit_identically(models, tmp_path):
    """In-process: stop after 2 steps (checkpoint), resume to 4, compare with 4 straight steps."""
    straight = run(overrides(models("sd15"), tmp_path / "a", **{"train.max_steps": 4}))
    run(overrides(models("sd15"), tmp_path / "b", **{"train.max_steps": 2, "train.save_every": 2}))
    resumed = run([*overrides(models("sd15"), tmp_path / "b", **{"train.max_steps": 4}), "--resume"])
    assert resumed["steps"] == 4 and len(resumed["history"]) == 2
    assert resumed["history"][-1]["loss"] == straight["history"][-1]["loss"]
    for name, value in straight["trainable"].items():
        assert torch.equal(resumed["trainable"][name], value), name


@pytest.mark.slow  # three fresh interpreters; test_resume_continues_bit_identically covers the same path fast
def test_kill9_and_resume_is_bit_identical(models, tmp_path):
    args = overrides(models("sd15"), tmp_path / "a", **{"train.max_steps": 8, "train.save_every": 2})
    straight = run(args)
    b_args = [a.replace(str(tmp_path / "a"), str(tmp_path / "b")) for a in args]
    cmd = [sys.executable, str(ROOT / "recipes" / "diffusion_dpo.py"), *b_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "b" / "checkpoints" / "step_2"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "b" / "final").exists(), "the run was not killed mid-training"
    subprocess.run([*cmd, "--resume"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = _unet_weights(tmp_path / "b" / "final")
    for name, value in straight["trainable"].items():
        assert torch.equal(resumed[name], value), name


def test_lora_output_loads_with_pipe_load_lora_weights(models, tmp_path):
    from diffusers import StableDiffusionPipeline

    res = run(overrides(models("sd15"), tmp_path / "lora", **{"model.lora_rank": 4, "reference": "lora_disabled"}))
    trained = {k: v for k, v in res["trainable"].items() if "lora" in k}
    assert trained and any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    pipe = StableDiffusionPipeline.from_pretrained(models("sd15"), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "lora" / "final"))
    loaded = {k.replace(".default_0", ".default"): v for k, v in pipe.unet.state_dict().items() if "lora" in k}
    assert set(loaded) == set(trained)
    for k, v in trained.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)


# Plain SGD: Adam would hide a wrong loss scale (its update is scale-invariant).
SGD = {"train.optimizer": "sgd", "train.lr": 1e-3, "train.weight_decay": 0.0}


def assert_same_update(base, expected, got):
    """Updates (trained - initial) agree to 1e-4 of the largest one; a wrong scale would be off 2x."""
    scale = max((expected[k] - base[k]).abs().max().item() for k in base)
    assert scale > 1e-4  # the weights did move
    for k in base:
        torch.testing.assert_close(got[k] - base[k], expected[k] - base[k], rtol=0, atol=1e-4 * scale)


def test_grad_accumulation_equals_one_big_batch(models, tmp_path):
    one = run(overrides(models("sd15"), tmp_path / "big", **{"train.per_device_batch": 4, **SGD}))
    acc = run(overrides(models("sd15"), tmp_path / "acc", **{"train.per_device_batch": 2, "train.grad_accum": 2,
                                                              **SGD}))
    # step 2's loss is beta (2500) times differences of float32 MSEs: summation order (batch 4 vs
    # 2 x 2, thread count) moved it by 1.2e-4 relative in a fresh-clone CI run; the update is the check
    assert one["history"][1]["loss"] == pytest.approx(acc["history"][1]["loss"], rel=1e-3)
    assert_same_update(_unet_weights(Path(models("sd15"))), one["trainable"], acc["trainable"])


def test_two_processes_equal_one_process_with_double_batch(models, tmp_path):
    one = run(overrides(models("sd15"), tmp_path / "one", **{"train.per_device_batch": 4, **SGD}))
    args = overrides(models("sd15"), tmp_path / "two", **{"train.per_device_batch": 2, **SGD})
    # torchrun + ACCELERATE_USE_CPU is how accelerate runs multi-CPU (gloo) on one machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(ROOT / "recipes" / "diffusion_dpo.py"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "2 processes" in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_update(_unet_weights(Path(models("sd15"))), one["trainable"], _unet_weights(tmp_path / "two" / "final"))


def test_separable_toy_pairs_reach_high_implicit_accuracy(models, tmp_path):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffdpo.diffusion.encode import Encoded
    from diffdpo.diffusion.logratios import draw_pairs, pair_seed
    from diffdpo.diffusion.models import load_backbone
    from diffdpo.diffusion.objective import diffusion_dpo_step
    from diffdpo.diffusion.reference import FrozenCopyReference
    from diffdpo.diffusion.data import read_pairs

    run(overrides(models("sd15"), tmp_path / "toy", **{
        "train.per_device_batch": 4, "train.max_steps": 40, "train.lr": 2e-3, "train.proportion_empty_prompts": 0.0,
        "loss.beta": 100, "loss.beta_convention": "core"}))
    base = load_backbone("sd15", models("sd15"), resolution=16)
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "toy" / "final" / "unet")
    pairs = read_pairs("toy", tmp_path / f"toy_sd15", "image", base.load_media).pairs
    enc = Encoded(base, pairs)
    idx = list(range(len(pairs)))
    w, l = enc.pair_latents(idx)
    cond = enc.conditions(idx, [False] * len(idx))
    scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
    correct = []
    for epoch in range(100, 116):  # held-out noise draws
        draws = draw_pairs([pair_seed(0, i, epoch) for i in idx], tuple(w.shape[1:]), 1000, 0.0)
        with torch.no_grad():
            out = diffusion_dpo_step(base.predict, tuned, FrozenCopyReference(base.unet), scheduler, w, l, cond,
                                     draws, idx, beta=2500.0)
        correct.append(out.core.chosen_rewards > out.core.rejected_rewards)
    assert torch.cat(correct).float().mean().item() > 0.9


# ---------------------------------------------------------------- Diffusion-KTO and MaPO through the recipe

KTO = {"loss.type": "kto", "loss.beta": 1000, "loss.beta_convention": "core"}
MAPO = {"loss.type": "mapo", "loss.beta": 0.1, "loss.beta_convention": "core"}


@pytest.mark.parametrize("loss, extra", [
    (KTO, {}),                                                    # pairs read as winners / losers
    (KTO, {"reference": "cached", "data.desirable_fraction": 0.5}),  # [n, 1] reference table, weighted draws
    (MAPO, {}),
])
def test_kto_and_mapo_train_a_step(models, tmp_path, loss, extra):
    res = run(overrides(models("sd15"), tmp_path / "run", **{**loss, **extra}))
    weights = _unet_weights(Path(models("sd15")))
    assert res["steps"] == 2 and all(math.isfinite(h["loss"]) for h in res["history"])
    assert any(not torch.equal(weights[k], v) for k, v in res["trainable"].items())
    first = res["history"][0]
    if loss is KTO:
        assert res["pairs"] == 16  # 8 pairs -> 8 desirable + 8 undesirable samples
        assert first["loss"] == pytest.approx(0.5, abs=1e-3)  # 1 - sigmoid(0) at init, reference point 0
        assert first["kto/reference_point"] == 0.0 and "rewards/margins" not in first
    else:
        assert "mse/ref_chosen" not in first  # no reference model ran
        assert first["rewards/chosen"] == pytest.approx(-0.1 * first["mse/policy_chosen"])


def test_kto_trains_on_thumbs_up_down_feedback(models, tmp_path):
    from PIL import Image

    root = tmp_path / "feedback"
    (root / "media").mkdir(parents=True)
    rows = []
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(root / "media" / f"{i}.png")
        rows.append(json.dumps({"id": f"s{i}", "prompt": "a red square", "media": f"media/{i}.png",
                                "label": i % 2 == 0}))
    (root / "feedback.jsonl").write_text("\n".join(rows) + "\n")
    res = run(overrides(models("sd15"), tmp_path / "run", **{**KTO, "data.source": "feedback",
                                                             "data.path": str(root)}))
    assert res["pairs"] == 4 and res["steps"] == 2


@pytest.mark.parametrize("change, message", [
    ({**KTO, "loss.beta_convention": "salesforce"}, "loss.beta_convention: 'kto' takes its own beta"),
    ({**MAPO, "loss.beta_convention": "tango2"}, "loss.beta_convention: 'mapo' takes its own beta"),
    ({"loss.type": "simpo", "loss.beta_convention": "core"}, r"loss.type: 'simpo' reads \['chosen_logps'"),
    ({"loss.type": "ipo"}, r"reads \['chosen_lengths', 'rejected_lengths'\].*length_normalize=false"),
    ({"data.source": "feedback"}, r"data.source=feedback: unpaired samples need an unpaired loss \(kto\)"),
    ({**KTO, "loss.sft_weight": 1.0}, "loss.sft_weight / loss.sft_epochs: the winners' loss needs pairs"),
    ({**KTO, "data.won_and_lost": "maybe"}, "data.won_and_lost: must be one of"),
    ({**KTO, "data.desirable_fraction": 1.0}, r"data.desirable_fraction: must lie in \(0, 1\)"),
])
def test_loss_and_data_mismatches_fail_before_loading(tmp_path, change, message):
    from diffdpo.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(diffusion_dpo.DiffusionDPOConfig, None,
                    overrides(str(tmp_path / "no_model"), tmp_path / "run", **change))


def test_kto_two_processes_equal_one_process_with_double_batch(models, tmp_path):
    """The reference point is the batch mean over processes (Diffusion-KTO's accelerator.reduce), so
    2 x 2 samples make the same update as 1 x 4."""
    one = run(overrides(models("sd15"), tmp_path / "one", **{**KTO, "train.per_device_batch": 4, **SGD}))
    args = overrides(models("sd15"), tmp_path / "two", **{**KTO, "train.per_device_batch": 2, **SGD})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "recipes" / "diffusion_dpo.py"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr, done.stderr[-3000:]
    assert_same_update(_unet_weights(Path(models("sd15"))), one["trainable"], _unet_weights(tmp_path / "two" / "final"))
