"""Diffusion-KTO, MaPO and TangoFlux's CRPO loss against their published forms, written here from the
authors' code and nothing of diffdpo:

* Diffusion-KTO (jacklishufan/diffusion-kto ``train_kto_sd_v1.5.py``): ``g = -mse_policy + mse_ref``,
  ``kl = max(0, mean g)`` (detached), ``h = sigmoid(sign * beta * (g - kl))`` with sign +1 for a
  desirable sample and -1 for an undesirable one, loss = mean of ``lambda_y (1 - h)``;
* MaPO (mapo-t2i/mapo ``utils.py`` ``compute_loss``): ``score(e) = c e / (exp(c e) - 1)``, loss =
  ``mean(e_w) - beta * mean(logsigmoid(T * (score(e_w) - score(e_l))))``;
* TangoFlux CRPO (declare-lab/TangoFlux ``tangoflux/model.py``): ``-logsigmoid(-0.5 * 2000 *
  (model_diff - ref_diff)).mean() + mse_w.mean()`` on flow-matching velocity errors.

Each is checked on random per-sample errors (values and gradients) and end to end on a tiny diffusers
UNet (noised inputs and targets computed here by hand), then the data side of Diffusion-KTO (samples
from pairs, feedback records) and the published configs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffdpo.diffusion.api import diffusion_dpo_loss
from diffdpo.diffusion.data import Pair, desirable_weights, epoch_order, read_samples
from diffdpo.diffusion.logratios import PairDraws
from diffdpo.diffusion.objective import diffusion_dpo_step, diffusion_kto_step
from diffdpo.diffusion.reference import FrozenCopyReference
from diffdpo.losses import diffusion_beta, preference_loss
from helpers.tiny_unet import perturbed, tiny_unet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


# ------------------------------------------------------------ the published forms, from per-sample errors


def kto_published(mse_policy, mse_ref, desirable, beta, lambda_d=1.0, lambda_u=1.0):
    g = -mse_policy - (-mse_ref)
    kl = g.mean().detach().clamp(min=0)
    sign = 2 * desirable.double() - 1
    h = torch.sigmoid(sign * beta * (g - kl))
    return (torch.where(desirable, lambda_d, lambda_u) * (1 - h)).mean()


def mapo_published(e_w, e_l, beta=0.1, c=0.5, T=1000):
    score = lambda e: c * e / (torch.exp(c * e) - 1)  # noqa: E731
    return e_w.mean() - (beta * F.logsigmoid(T * (score(e_w) - score(e_l)))).mean()


def crpo_published(mw, ml, rw, rl, beta=2000.0):
    return -F.logsigmoid(-0.5 * beta * ((mw - ml) - (rw - rl))).mean() + mw.mean()


def errors(n, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64) * scale + 0.05


def test_kto_core_is_diffusion_kto_on_random_errors():
    n = 12
    policy, ref = errors(n, 0).requires_grad_(True), errors(n, 1)
    policy_hand = policy.detach().clone().requires_grad_(True)
    desirable = torch.rand(n, generator=torch.Generator().manual_seed(2)) < 0.6
    ratio = -(policy - ref)
    ours = preference_loss("kto", ratio[desirable], ratio[~desirable], beta=1000.0, undesirable_weight=1.5)
    ours.losses.mean().backward()
    hand = kto_published(policy_hand, ref, desirable, 1000.0, lambda_u=1.5)
    hand.backward()
    assert 0 < desirable.sum() < n and 0 < hand.item() < 1.5
    torch.testing.assert_close(ours.losses.mean(), hand, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(policy.grad, policy_hand.grad, rtol=1e-10, atol=1e-14)
    assert policy.grad.abs().sum() > 0


def test_kto_reference_point_is_clamped_at_zero():
    """A batch whose mean log-ratio is negative gets z0 = 0, as Diffusion-KTO's clamp does."""
    policy, ref = errors(6, 3) + 0.5, errors(6, 4)  # policy worse than reference: g < 0
    desirable = torch.tensor([True, False] * 3)
    ratio = -(policy - ref)
    assert ratio.mean() < 0
    ours = preference_loss("kto", ratio[desirable], ratio[~desirable], beta=7.0).losses.mean()
    torch.testing.assert_close(ours, kto_published(policy, ref, desirable, 7.0), rtol=1e-12, atol=1e-14)


def test_mapo_core_is_the_published_loss_on_random_errors():
    e_w, e_l = errors(10, 5, scale=0.02).requires_grad_(True), errors(10, 6, scale=0.02).requires_grad_(True)
    hand_w, hand_l = (t.detach().clone().requires_grad_(True) for t in (e_w, e_l))
    ours = preference_loss("mapo", beta=0.1, chosen_errors=e_w, rejected_errors=e_l).losses.mean()
    ours.backward()
    hand = mapo_published(hand_w, hand_l)
    hand.backward()
    # the errors differ by about 0.01, so T = 1000 puts the sigmoid's argument at a few units: both sides matter
    assert 0.1 * 0.05 < (hand - hand_w.mean()).item()
    torch.testing.assert_close(ours, hand, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(e_w.grad, hand_w.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(e_l.grad, hand_l.grad, rtol=1e-10, atol=1e-14)
    assert (e_l.grad < 0).all()  # raising the loser's error lowers the loss


def test_tangoflux_setting_is_sigmoid_plus_the_winners_mse_on_random_errors():
    mw, ml = errors(8, 7).requires_grad_(True), errors(8, 8).requires_grad_(True)
    rw, rl = errors(8, 9), errors(8, 10)
    hw, hl = (t.detach().clone().requires_grad_(True) for t in (mw, ml))
    ours = preference_loss("sigmoid", -(mw - rw), -(ml - rl), beta=diffusion_beta(2000, "tangoflux"),
                           sft_weight=1.0, chosen_nll=mw).losses.mean()
    ours.backward()
    hand = crpo_published(hw, hl, rw, rl)
    hand.backward()
    torch.testing.assert_close(ours, hand, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mw.grad, hw.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ml.grad, hl.grad, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------ end to end on a tiny UNet

B = 4


def predict(unet, noisy, t, cond):
    return unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, x1, noise = (torch.randn(B, 4, 8, 8, generator=g) for _ in range(3))
    hidden = torch.randn(B, 5, 16, generator=g)
    return x0, x1, noise, hidden, torch.tensor([3, 250, 600, 990])


def ddpm_noised(x0, noise, steps):
    a = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod[steps].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def mse(unet, noisy, t, hidden, target):
    return ((unet(noisy, t, encoder_hidden_states=hidden).sample - target) ** 2).mean(dim=[1, 2, 3])


def grads(unet):
    return [p.grad.clone() for p in unet.parameters()]


def assert_same_grads(ours, unet):
    """Float32 sums in a different order: agreement to 1e-4 of the largest gradient entry."""
    scale = max(p.grad.abs().max().item() for p in unet.parameters())
    assert scale > 0
    for p, g in zip(unet.parameters(), ours):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4 * scale)


def test_diffusion_kto_step_on_a_tiny_unet_is_the_published_loss():
    policy = tiny_unet()
    reference = perturbed(policy)
    x0, _, noise, hidden, steps = inputs()
    desirable = torch.tensor([True, False, True, False])
    draws = PairDraws(noise, steps, torch.zeros(B, dtype=torch.bool))
    out = diffusion_kto_step(predict, policy, FrozenCopyReference(reference), DDPMScheduler(num_train_timesteps=1000),
                             x0, desirable, {"encoder_hidden_states": hidden}, draws, list(range(B)), beta=1000.0)
    out.loss.backward()
    ours = grads(policy)
    policy.zero_grad(set_to_none=True)

    noisy = ddpm_noised(x0, noise, steps)  # each sample its own noise and timestep; epsilon target
    with torch.no_grad():
        ref = mse(reference, noisy, steps, hidden, noise)
    hand = kto_published(mse(policy, noisy, steps, hidden, noise), ref, desirable, 1000.0)
    hand.backward()
    assert abs(hand.item() - 0.5) > 1e-3  # the perturbed reference moves the loss off its starting value
    torch.testing.assert_close(out.loss, hand.float(), rtol=1e-5, atol=1e-6)
    assert_same_grads(ours, policy)
    assert out.reference_point.item() == pytest.approx(max(0.0, (ref - out.policy_errors).mean().item()), abs=1e-7)


def test_mapo_step_on_a_tiny_unet_is_the_published_loss_without_a_reference():
    policy = tiny_unet()
    w, l, noise, hidden, steps = inputs(1)
    draws = PairDraws(noise, steps, torch.zeros(B, dtype=torch.bool))
    out = diffusion_dpo_step(predict, policy, None, DDPMScheduler(num_train_timesteps=1000), w, l,
                             {"encoder_hidden_states": hidden}, draws, list(range(B)), loss_type="mapo", beta=0.1)
    out.loss.backward()
    ours = grads(policy)
    policy.zero_grad(set_to_none=True)

    both = torch.cat([steps, steps])  # winner and loser share the noise and the timestep
    noisy = ddpm_noised(torch.cat([w, l]), torch.cat([noise, noise]), both)
    e_w, e_l = mse(policy, noisy, both, torch.cat([hidden, hidden]), torch.cat([noise, noise])).chunk(2)
    hand = mapo_published(e_w, e_l)
    hand.backward()
    assert out.reference_errors is None
    torch.testing.assert_close(out.loss, hand, rtol=1e-5, atol=1e-6)
    assert_same_grads(ours, policy)


def test_tangoflux_crpo_on_flow_matching_is_the_published_loss():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    policy = tiny_unet()
    reference = perturbed(policy)
    w, l, noise, hidden, steps = inputs(2)
    out = diffusion_dpo_loss(policy, reference, scheduler, w, l, hidden, noise, steps, beta=2000,
                             beta_convention="tangoflux", sft_weight=1.0)
    out.loss.backward()
    ours = grads(policy)
    policy.zero_grad(set_to_none=True)

    both = torch.cat([steps, steps])
    sigma = scheduler.sigmas[both].view(-1, 1, 1, 1)
    x0, eps = torch.cat([w, l]), torch.cat([noise, noise])
    noisy, target, t = (1 - sigma) * x0 + sigma * eps, eps - x0, scheduler.timesteps[both]
    cond = torch.cat([hidden, hidden])
    mw, ml = mse(policy, noisy, t, cond, target).chunk(2)
    with torch.no_grad():
        rw, rl = mse(reference, noisy, t, cond, target).chunk(2)
    hand = crpo_published(mw, ml, rw, rl)
    hand.backward()
    torch.testing.assert_close(out.loss, hand, rtol=1e-5, atol=1e-6)
    assert_same_grads(ours, policy)


# ------------------------------------------------------------ Diffusion-KTO's data


def pairs_with_a_shared_image(tmp_path):
    """a beats b, b beats c (b won and lost), d beats e; same files reused across pairs."""
    files = {}
    for name in "abcde":
        files[name] = tmp_path / f"{name}.png"
        files[name].write_bytes(b"x")
    return [Pair("p0", "cat", files["a"], files["b"]), Pair("p1", "cat", files["b"], files["c"]),
            Pair("p2", "dog", files["d"], files["e"])]


@pytest.mark.parametrize("policy, expected", [
    ("desirable", {"a": True, "b": True, "c": False, "d": True, "e": False}),
    ("undesirable", {"a": True, "b": False, "c": False, "d": True, "e": False}),
    ("drop", {"a": True, "c": False, "d": True, "e": False}),
])
def test_samples_from_pairs_follow_the_won_and_lost_policy(tmp_path, monkeypatch, policy, expected):
    import diffdpo.diffusion.data as data

    pairs = pairs_with_a_shared_image(tmp_path)
    monkeypatch.setattr(data, "read_pairs", lambda *a, **k: data.PairSet(pairs, dropped_ties=1))
    out = read_samples("jsonl", tmp_path, "image", lambda m: None, won_and_lost=policy)
    assert {Path(s.media).stem: s.desirable for s in out.samples} == expected
    assert out.won_and_lost == 1 and out.dropped_ties == 1
    assert [s.id for s in out.samples][:2] == ["p0/chosen", "p0/rejected" if policy != "drop" else "p1/rejected"]


def write_feedback(root: Path, rows: list) -> Path:
    (root / "media").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (root / "media" / f"{i}.png").write_bytes(b"img")
    (root / "feedback.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return root


def row(i, label=True, **change):
    return {"id": f"s{i}", "prompt": "a cat", "media": f"media/{i}.png", "label": label, **change}


def test_feedback_records_are_read_with_their_labels(tmp_path):
    root = write_feedback(tmp_path, [row(0), row(1, False), row(2, True, meta={"user": 3})])
    out = read_samples("feedback", root, "image", lambda m: None)
    assert [(s.id, s.desirable, s.media) for s in out.samples] == \
        [("s0", True, root / "media" / "0.png"), ("s1", False, root / "media" / "1.png"),
         ("s2", True, root / "media" / "2.png")]


@pytest.mark.parametrize("bad, message", [
    ({"id": "s9", "prompt": "a cat", "media": "media/0.png"}, r"feedback.jsonl:2: record 's9': missing field\(s\) "
                                                               r"\['label'\]"),
    (row(9, label="yes"), r"feedback.jsonl:2: record 's9': label must be true \(desirable\) or false"),
    (row(9, label=1), r"record 's9': label must be true"),
    (row(9, prompt=" "), r"record 's9': empty prompt"),
    (row(9, media="../outside.png"), r"record 's9' media '../outside.png' escapes the dataset root"),
    (row(9, media="media/missing.png"), r"record 's9': media file not found"),
    ("{not json", r"feedback.jsonl:2: invalid JSON"),
])
def test_a_bad_feedback_record_is_one_line_naming_file_and_record(tmp_path, bad, message):
    root = write_feedback(tmp_path, [row(0), bad, row(1, False)])
    with pytest.raises(ValueError, match=message) as err:
        read_samples("feedback", root, "image", lambda m: None)
    assert "\n" not in str(err.value)
    kept = read_samples("feedback", root, "image", lambda m: None, on_bad_record="skip")
    assert [s.id for s in kept.samples] == ["s0", "s1"] and kept.skipped == 1


def test_desirable_fraction_draws_the_published_share():
    labels = [True] * 10 + [False] * 30
    samples = [type("S", (), {"desirable": d})() for d in labels]
    weights = desirable_weights(samples, 0.8)
    drawn = [i for epoch in range(50) for i in epoch_order(len(labels), 0, epoch, weights)]
    share = sum(labels[i] for i in drawn) / len(drawn)
    assert share == pytest.approx(0.8, abs=0.02)
    assert epoch_order(40, 0, 3, weights) == epoch_order(40, 0, 3, weights)  # the same on every process
    with pytest.raises(ValueError, match="both labels"):
        desirable_weights(samples[:10], 0.8)


# ------------------------------------------------------------ configs


def test_published_configs_load_with_their_settings():
    import diffusion_dpo
    from diffdpo.config import load_config

    kto = load_config(diffusion_dpo.DiffusionDPOConfig, ROOT / "recipes" / "configs" / "sd15_kto.yaml")
    assert (kto.loss.type, kto.loss.core_beta(), kto.data.desirable_fraction, kto.data.won_and_lost) == \
        ("kto", 1000.0, 0.8, "desirable")
    assert (kto.train.lr, kto.train.per_device_batch, kto.train.warmup_steps, kto.train.max_steps) == \
        (1e-7, 2, 200, 20000)
    mapo = load_config(diffusion_dpo.DiffusionDPOConfig, ROOT / "recipes" / "configs" / "sdxl_mapo.yaml")
    assert (mapo.loss.type, mapo.loss.core_beta(), mapo.loss.options) == \
        ("mapo", 0.1, {"mapo_snr": 0.5, "mapo_timesteps": 1000})
    assert (mapo.train.lr, mapo.train.per_device_batch, mapo.train.grad_accum, mapo.train.max_steps) == \
        (1e-5, 8, 2, 2000)
    for name in ("sd15_kto", "sdxl_mapo"):
        text = (ROOT / "recipes" / "configs" / f"{name}.yaml").read_text()
        assert text.startswith("#") and "recipes/diffusion_dpo.py --config" in text and "github.com" in text


def test_the_documented_loss_blocks_load(tmp_path):
    """docs/diffusion_dpo.md's YAML for Diffusion-KTO, MaPO and TangoFlux is a valid config each."""
    import yaml

    import diffusion_dpo
    from diffdpo.config import load_config

    doc = (ROOT / "docs" / "diffusion_dpo.md").read_text().split("## Diffusion-KTO, MaPO and TangoFlux", 1)[1]
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    loaded = []
    for i, part in enumerate(yaml.safe_load_all(block)):
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump({**part, "model": {"name_or_path": "m"}}))
        loaded.append(load_config(diffusion_dpo.DiffusionDPOConfig, path))
    assert [(c.loss.type, c.loss.core_beta(), c.loss.sft_weight) for c in loaded] == \
        [("kto", 1000.0, 0.0), ("mapo", 0.1, 0.0), ("sigmoid", 1000.0, 1.0)]
