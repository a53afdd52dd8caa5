"""CRPO on SoundWorld (recipes/soundworld_crpo.py, diffdpo/diffusion/online.py) at test sizes: two rounds
of generate -> CLAP-rank -> DPO + winner loss on the shipped weak base, the rounds written as
preference sets, the model moved, a resume after losing the last round reproducing it exactly, the
loss against a hand computation of TangoFlux's formula; and the policy on a diffusers family (tiny SD 1.5)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.chromium import browser, page_problems  # noqa: F401  (browser is a fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "soundworld_crpo_tiny.yaml"


def _recipe():
    sys.path.insert(0, str(ROOT / "recipes"))
    import soundworld_crpo

    return soundworld_crpo


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two rounds, every checkpoint kept (a run killed after round 2 was saved keeps the one before)."""
    import diffdpo.online.loop as loop

    out = tmp_path_factory.mktemp("crpo") / "run"
    save = loop.save_checkpoint
    loop.save_checkpoint = lambda *a, **k: save(*a, **{**k, "keep_last": None})
    try:
        results = _recipe().main(["--config", str(TINY), f"out={out}", "threads=1"])
    finally:
        loop.save_checkpoint = save
    return out, results


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rounds_are_preference_sets_of_ranked_samples(run):
    out, results = run
    rounds = sorted((out / "rounds").glob("round_*.jsonl"))
    assert [p.name for p in rounds] == ["round_0000.jsonl", "round_0001.jsonl"]
    for k, path in enumerate(rounds):
        rows = _rows(path)
        assert rows and all(r["round"] == k for r in rows)
        for r in rows:  # best vs worst of each caption's clips, the clips on disk beside the round file
            assert r["chosen_win_prob"] > r["rejected_win_prob"]
            assert (out / "rounds" / r["chosen"]).is_file() and (out / "rounds" / r["rejected"]).is_file()
            assert r["chosen"].startswith(f"round_{k:04d}/")
    history = results["rounds"]
    assert [h["calls"] for h in history] == [4, 8]  # 2 captions x 2 clips per round, one CLAP call each
    assert all(h["steps"] == 2 and "rewards/accuracies" in h for h in history)
    table = {row["key"]: row for row in results["table"]}
    assert set(table["satisfied"]["models"]) == {"base", "round 1", "round 2"}
    assert set(table["satisfied"]["deltas"]) == {"round 1 - base", "round 2 - base"}
    for k in range(3):  # the table's means are the oracle's per-caption rows
        rows = json.loads((out / "eval_validation" / f"round_{k}" / "rows.json").read_text())["rows"]
        name = "base" if k == 0 else f"round {k}"
        assert table["satisfied"]["models"][name]["mean"] == pytest.approx(np.mean([r["satisfied"] for r in rows]))
        assert table["clap"]["models"][name]["mean"] == pytest.approx(np.mean([r["clap"] for r in rows]))
    assert (out / "report.html").stat().st_size > 0 and (out / "results.md").is_file()
    assert len(results["curves"]["crpo"]) == 4 and results["curves"]["crpo"][-1]["step"] == 4
    for a in results["pair_audit"]:  # the oracle's view of each round's pairs
        assert a["pairs"] == 2 and a["winner_only"] + a["loser_only"] + a["tie"] == pytest.approx(1.0)
    assert [a["round"] for a in results["pair_audit"]] == [1, 2]


def test_report_loads_in_a_browser(run, browser):
    """report.html renders its table and per-round chart, and every example's audio and spectrogram loads."""
    out, results = run
    found = browser.check_page(out / "report.html")
    assert page_problems(found) == []
    assert results["table"][0]["metric"] in found["text"]
    n = len(results["examples"]) * 3  # base, round 1, round 2
    assert len(found["audios"]) == n and len(found["images"]) == n and n > 0


def test_the_policy_moved(run):
    from safetensors.torch import load_file

    from diffdpo.worlds.soundworld import BASES

    out, _ = run
    base = load_file(BASES["weak"] / "generator" / "unet" / "diffusion_pytorch_model.safetensors")
    final = load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == final.keys()
    assert any(not torch.equal(base[k], final[k]) for k in base)


def test_resume_after_losing_the_last_round_is_identical(run, tmp_path, capsys):
    out, results = run
    again = tmp_path / "run"
    shutil.copytree(out, again)
    for lost in ("rounds/round_0001.jsonl", "rounds/round_0001", "checkpoints/step_2", "eval_validation/round_2",
                 "final", "results.json", "history.json"):
        path = again / lost
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = _recipe().main(["--config", str(TINY), f"out={again}", "threads=1"])
    assert f"resumed from {again / 'checkpoints' / 'step_1'}" in capsys.readouterr().out
    assert (again / "rounds/round_0001.jsonl").read_text() == (out / "rounds/round_0001.jsonl").read_text()
    assert resumed["rounds"] == results["rounds"]
    assert resumed["table"] == results["table"]
    assert resumed["curves"] == results["curves"]
    from safetensors.torch import load_file

    a = load_file(out / "final/unet/diffusion_pytorch_model.safetensors")
    b = load_file(again / "final/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="other settings"):  # a rerun with other settings is refused
        _recipe().main(["--config", str(TINY), f"out={again}", "loss.beta=1000"])


@pytest.fixture(scope="module")
def weak_backbone():
    """A fresh copy of the shipped weak base per use (tests move its UNet in place); one thread, as the
    recipe runs here (two threads beside other jobs on a 2-core machine mostly wait on each other)."""
    import copy

    from diffdpo.diffusion.models import load_backbone
    from diffdpo.worlds.soundworld import BASES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backbone = load_backbone("tango", str(BASES["weak"] / "generator"))
    yield lambda: copy.deepcopy(backbone)
    torch.set_num_threads(threads)


def test_reference_sampler_draws_from_the_round_0_model(weak_backbone, tmp_path):
    """``sampler: reference`` samples the model as it was before training (one offline round), with the
    same per-sample seeds; ``current`` samples the moved model; ``mixture`` is refused."""
    from diffdpo.diffusion.online import DiffusionOnlinePolicy, OnlineDiffusionTrain
    from diffdpo.diffusion.trainer import LossConfig

    loss = LossConfig(type="sigmoid", beta=2000, beta_convention="tangoflux", sft_weight=1.0)
    policy = DiffusionOnlinePolicy(weak_backbone(), loss, OnlineDiffusionTrain(num_inference_steps=2), tmp_path,
                                   reference="previous_round", sampler="reference")
    before = policy.sample(["Rain falls"], 2, "current", 0.0, 5)[0]
    with torch.no_grad():
        for p in policy.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.reset_reference()  # previous_round: the reference follows the policy, the round-0 model stays
    ref = policy.sample(["Rain falls"], 2, "reference", 0.0, 5)[0]
    now = policy.sample(["Rain falls"], 2, "current", 0.0, 5)[0]
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(before, ref))
    assert not torch.equal(before[0].latents, now[0].latents)
    assert not torch.equal(before[0].latents, before[1].latents)  # each sample its own seed
    assert [s.path for s in now] == ["round_0002/p0000_s0.wav", "round_0002/p0000_s1.wav"]
    assert policy.media_of(now[1].path) is now[1].media and (tmp_path / now[1].path).is_file()
    with pytest.raises(ValueError, match="mixture"):
        policy.sample(["Rain falls"], 2, "mixture", 0.5, 5)


def test_loss_is_dpo_plus_the_winner_loss_by_hand(weak_backbone, tmp_path):
    """TangoFlux's CRPO loss on one batch, computed here from the UNet's outputs:
    mean over pairs of -logsigmoid(-0.5 * 2000 * ((pw - pl) - (rw - rl))) + pw, with v-prediction targets."""
    import torch.nn.functional as F

    from diffdpo.diffusion.encode import stack_conditions
    from diffdpo.diffusion.online import DiffusionOnlinePolicy, OnlineDiffusionTrain
    from diffdpo.diffusion.trainer import LossConfig

    torch.manual_seed(0)
    backbone = weak_backbone()
    loss = LossConfig(type="sigmoid", beta=2000, beta_convention="tangoflux", sft_weight=1.0)
    policy = DiffusionOnlinePolicy(backbone, loss, OnlineDiffusionTrain(per_device_batch=3), tmp_path,
                                   reference="initial")
    with torch.no_grad():  # move the policy off its reference so both log-ratios are non-zero
        for p in policy.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    shape = backbone.pipe.latent_shape
    chosen, rejected = torch.randn(3, *shape), torch.randn(3, *shape)
    prompts = ["A dog barks then a bell rings", "Rain falls", "A siren wails as a clock ticks"]
    draws = policy.draws([11, 12, 13], shape)
    with torch.no_grad():
        out = policy.pair_loss(chosen, rejected, prompts, draws)

        ab = policy.scheduler.alphas_cumprod[draws.step_index.long()].view(-1, 1, 1, 1)
        cond = stack_conditions([policy.condition(p) for p in prompts])  # T5 states + mask, right-padded
        assert not draws.drop_prompt.any()

        def errors(unet, x0):
            noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * draws.noise
            v = ab.sqrt() * draws.noise - (1 - ab).sqrt() * x0
            pred = backbone.predict(unet, noisy, draws.step_index.long(), cond)
            return ((pred - v) ** 2).flatten(1).mean(1)

        pw, pl = errors(policy.unet, chosen), errors(policy.unet, rejected)
        rw, rl = errors(policy.reference.unet, chosen), errors(policy.reference.unet, rejected)
        dpo = -F.logsigmoid(-0.5 * 2000 * ((pw - pl) - (rw - rl)))
    assert not torch.allclose(pw, rw)
    assert out.loss.item() == pytest.approx((dpo + pw).mean().item(), rel=1e-4)
    assert out.loss.item() - dpo.mean().item() == pytest.approx(pw.mean().item(), rel=1e-3)  # the winner term


def test_user_mistakes_are_config_errors():
    from diffdpo.errors import ConfigError

    crpo = _recipe()
    with pytest.raises(ConfigError, match="validation captions only"):
        crpo.main(["--config", str(TINY), "evaluate.split=test"])
    with pytest.raises(ConfigError, match="mixture"):
        crpo.main(["--config", str(TINY), "online.sampler=mixture"])
    with pytest.raises(ConfigError, match="unpaired"):
        crpo.main(["--config", str(TINY), "loss.type=kto", "loss.beta_convention=core"])


def test_a_diffusers_family_samples_encodes_and_trains(tmp_path):
    """The policy is general: a diffusers pipeline (tiny SD 1.5) that hands back images is sampled, its
    images written, encoded by the VAE as offline training reads them, and trained on."""
    from diffdpo.diffusion.models import load_backbone
    from diffdpo.diffusion.online import DiffusionOnlinePolicy, OnlineDiffusionTrain
    from diffdpo.diffusion.tiny import build_tiny
    from diffdpo.diffusion.trainer import LossConfig

    build_tiny("sd15", tmp_path / "sd15")
    backbone = load_backbone("sd15", str(tmp_path / "sd15"), resolution=16)
    loss = LossConfig(type="sigmoid", beta=5000, beta_convention="salesforce")
    policy = DiffusionOnlinePolicy(backbone, loss, OnlineDiffusionTrain(num_inference_steps=2, per_device_batch=2),
                                   tmp_path / "rounds", reference="initial")
    outs = policy.sample(["a red square", "a blue circle"], 2, "current", 0.0, 1)
    assert [s.path for s in outs[1]] == ["round_0000/p0001_s0.png", "round_0000/p0001_s1.png"]
    with torch.no_grad():
        again = backbone.media_to_latents(backbone.load_media(tmp_path / "rounds" / outs[0][1].path)[None])
    assert torch.allclose(outs[0][1].latents, again[0])
    before = {k: v.clone() for k, v in policy.unet.state_dict().items()}
    records = [{"prompt": o[0].prompt, "chosen_output": o[0], "rejected_output": o[1], "round": 0} for o in outs]
    metrics = policy.train_round(records, 2, seed=3)
    assert np.isfinite(metrics["loss"]) and policy.steps_done == 2
    assert any(not torch.equal(before[k], v) for k, v in policy.unet.state_dict().items())
