"""The loss core against independent references: hand-computed values, a plain-Python
re-derivation of every formula, autograd gradchecks, limits, and input validation."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdpo.losses import LOSS_TYPES, RunningRewardMean, diffusion_beta, preference_loss

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ independent re-derivation (plain Python)

def l(z):  # -log sigmoid(z), written the textbook way (fine for the moderate inputs used here)
    return math.log1p(math.exp(-z)) if z > -30 else -z


def s(z):
    return 1 / (1 + math.exp(-z))


def reference(name, rw, rl, beta, pw=None, pl=None, nw=None, nl=None, Pw=None, Pl=None, ew=None, el=None,
              **o):
    """One pair's loss, re-derived from the papers' formulas (each loss's docstring in diffdpo/losses.py names its paper)."""
    h = rw - rl
    eps = o.get("label_smoothing", 1e-3 if name == "exo_pair" else 0.0)
    if name == "sigmoid":
        return (1 - eps) * l(beta * h) + eps * l(-beta * h)
    if name == "robust":
        return ((1 - eps) * l(beta * h) - eps * l(-beta * h)) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    if name == "ipo":
        return (rw / nw - rl / nl - 1 / (2 * beta)) ** 2 if o.get("length_normalize", True) else (h - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        q = s(beta * h)
        return q * (math.log(q) - math.log(1 - eps)) + (1 - q) * (math.log(1 - q) - math.log(eps))
    if name == "nca_pair":
        return l(beta * rw) + 0.5 * l(-beta * rw) + 0.5 * l(-beta * rl)
    if name == "bco_pair":
        d = o.get("reward_shift", 0.0)
        return l(beta * rw - d) + l(-(beta * rl - d))
    if name == "sppo_hard":
        return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if name == "sppo":
        return 0.5 * ((rw - (Pw - 0.5) / beta) ** 2 + (rl - (Pl - 0.5) / beta) ** 2)
    if name == "apo_zero":
        return (1 - s(beta * rw)) + s(beta * rl)
    if name == "apo_down":
        return s(beta * rw) + (1 - s(beta * h))
    if name == "discopop":
        m = s(beta * h / o.get("discopop_tau", 0.05))
        return (1 - m) * l(beta * h) + m * math.exp(-beta * h)
    if name == "simpo":
        z = beta * (pw / nw - pl / nl) - o.get("simpo_gamma", 0.5)
        return (1 - eps) * l(z) + eps * l(-z)
    if name == "cpo":
        return l(beta * (pw - pl)) + o.get("cpo_alpha", 1.0) * (-pw / nw)
    if name == "orpo":
        aw, al = pw / nw, pl / nl
        odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
        return -aw + beta * l(odds(aw) - odds(al))
    if name == "asft":
        return -pw / nw - math.log(1 - math.exp(pl / nl))
    if name == "mapo":  # mapo-t2i/mapo utils.py compute_loss, one pair: the score is c e / (exp(c e) - 1)
        c, T = o.get("mapo_snr", 0.5), o.get("mapo_timesteps", 1000)
        score = lambda e: c * e / (math.exp(c * e) - 1)  # noqa: E731
        return ew - beta * -l(T * (score(ew) - score(el)))
    raise KeyError(name)


PAIRWISE = ["sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "sppo", "apo_zero",
            "apo_down", "discopop", "simpo", "cpo", "orpo", "asft", "mapo"]
OPTIONS = {"sigmoid": {"label_smoothing": 0.1}, "robust": {"label_smoothing": 0.2}, "exo_pair": {"label_smoothing": 0.05},
           "bco_pair": {"reward_shift": 0.3}, "discopop": {"discopop_tau": 0.1}, "simpo": {"simpo_gamma": 0.7},
           "cpo": {"cpo_alpha": 0.5}, "ipo": {"length_normalize": True},
           "mapo": {"mapo_snr": 0.7, "mapo_timesteps": 40}}


def batch(dtype=torch.float64, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda scale=1.0: (torch.randn(n, generator=g, dtype=dtype) * scale)  # noqa: E731
    return dict(
        chosen_logratios=r(), rejected_logratios=r(),
        chosen_logps=-torch.rand(n, generator=g, dtype=dtype) * 20 - 0.5,
        rejected_logps=-torch.rand(n, generator=g, dtype=dtype) * 20 - 0.5,
        chosen_lengths=torch.randint(2, 12, (n,), generator=g).to(dtype),
        rejected_lengths=torch.randint(2, 12, (n,), generator=g).to(dtype),
        chosen_win_probs=torch.rand(n, generator=g, dtype=dtype),
        rejected_win_probs=torch.rand(n, generator=g, dtype=dtype),
        chosen_errors=torch.rand(n, generator=g, dtype=dtype) * 0.5 + 0.01,  # per-sample denoising MSEs
        rejected_errors=torch.rand(n, generator=g, dtype=dtype) * 0.5 + 0.01,
    )


def call(name, b, beta, **options):
    spec = LOSS_TYPES[name]
    kw = {k: v for k, v in b.items() if not (k.endswith("win_probs") and name != "sppo")}
    if not spec.needs_reference:
        kw.pop("chosen_logratios"), kw.pop("rejected_logratios")
    return preference_loss(name, beta=beta, **kw, **options)


@pytest.mark.parametrize("name", PAIRWISE)
def test_every_pairwise_loss_matches_its_formula(name):
    b, beta = batch(), 0.7
    out = call(name, b, beta, **OPTIONS.get(name, {}))
    for i in range(6):
        args = dict(rw=b["chosen_logratios"][i].item(), rl=b["rejected_logratios"][i].item(), beta=beta,
                    pw=b["chosen_logps"][i].item(), pl=b["rejected_logps"][i].item(),
                    nw=b["chosen_lengths"][i].item(), nl=b["rejected_lengths"][i].item(),
                    Pw=b["chosen_win_probs"][i].item(), Pl=b["rejected_win_probs"][i].item(),
                    ew=b["chosen_errors"][i].item(), el=b["rejected_errors"][i].item())
        assert out.losses[i].item() == pytest.approx(reference(name, **args, **OPTIONS.get(name, {})), rel=1e-10, abs=1e-12)


def test_every_registered_type_is_covered_by_a_formula_test():
    covered = set(PAIRWISE) | {"kto", "aot", "aot_unpaired"}  # mapo is in PAIRWISE
    assert covered == set(LOSS_TYPES)


def test_hand_computed_values():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # h = 1 - (-1) = 2, beta = 0.5 -> beta h = 1: -log sigmoid(1) = log(1 + e^-1)
    out = preference_loss("sigmoid", t(1.0), t(-1.0), beta=0.5)
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-15)
    # hinge: 1 - 0.5 * 2 = 0 ; 1 - 0.5 * (-2) = 2
    assert preference_loss("hinge", t(1.0, -1.0), t(-1.0, 1.0), beta=0.5).losses.tolist() == [0.0, 2.0]
    # ipo summed: (2 - 1/(2*0.5))^2 = 1
    assert preference_loss("ipo", t(1.0), t(-1.0), beta=0.5, length_normalize=False).losses.item() == pytest.approx(1.0)
    # sppo_hard: (1 - 1)^2 + (-1 + 1)^2 = 0 at beta 0.5
    assert preference_loss("sppo_hard", t(1.0), t(-1.0), beta=0.5).losses.item() == pytest.approx(0.0)
    # apo_zero at r = 0: (1 - 1/2) + 1/2 = 1
    assert preference_loss("apo_zero", t(0.0), t(0.0), beta=3.0).losses.item() == pytest.approx(1.0)
    # nca_pair at r = 0: log 2 + 0.5 log 2 + 0.5 log 2 = 2 log 2
    assert preference_loss("nca_pair", t(0.0), t(0.0), beta=1.0).losses.item() == pytest.approx(2 * math.log(2))


@pytest.mark.parametrize("name", sorted(LOSS_TYPES))
def test_gradcheck(name):
    b = batch(n=4, seed=3)
    spec = LOSS_TYPES[name]
    # kto's reference point is detached by design: fix it so finite differences see the same function
    opts = {"reference_point": 0.2} if name == "kto" else OPTIONS.get(name, {})
    keys = ["chosen_logratios", "rejected_logratios"] if spec.needs_reference else []
    keys += [k for k in ("chosen_logps", "rejected_logps", "chosen_errors", "rejected_errors") if k in spec.needs]

    def f(*xs):
        kw = {k: v for k, v in b.items() if not k.endswith("win_probs") or name == "sppo"}
        if not spec.needs_reference:
            kw.pop("chosen_logratios"), kw.pop("rejected_logratios")
        kw.update(zip(keys, xs))
        return preference_loss(name, beta=0.6, **kw, **opts).losses

    xs = [b[k].clone().requires_grad_(True) for k in keys]
    assert torch.autograd.gradcheck(f, xs)


def test_limits():
    z = torch.zeros(3, dtype=torch.float64)
    x, y = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.allclose(preference_loss("sigmoid", z, z, beta=5.0).losses, torch.full_like(z, math.log(2)))
    base = preference_loss("sigmoid", x, y, beta=0.3).losses
    assert torch.allclose(preference_loss("robust", x, y, beta=0.3, label_smoothing=0.0).losses, base)
    assert torch.allclose(preference_loss("sigmoid", x, y, beta=0.3, label_smoothing=0.0).losses, base)
    # IPO is minimal where the margin equals 1/(2 beta)
    beta = 0.25
    margins = torch.linspace(0, 4, 401, dtype=torch.float64)
    ipo = preference_loss("ipo", margins, torch.zeros_like(margins), beta=beta, length_normalize=False).losses
    assert margins[ipo.argmin()].item() == pytest.approx(1 / (2 * beta))
    # margin-only losses: swapping chosen and rejected is the same as negating both log-ratios,
    # and only the margin matters (shifting both sides changes nothing)
    for name in ("sigmoid", "hinge", "exo_pair", "discopop", "robust"):
        swapped = preference_loss(name, y, x, beta=0.3).losses
        assert torch.allclose(swapped, preference_loss(name, -x, -y, beta=0.3).losses)
        assert torch.allclose(preference_loss(name, x + 7, y + 7, beta=0.3).losses,
                              preference_loss(name, x, y, beta=0.3).losses)
        assert not torch.allclose(swapped, preference_loss(name, x, y, beta=0.3).losses)
    # soft SPPO with win probabilities 1 and 0 is half of hard SPPO
    one, zero = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    soft = preference_loss("sppo", x, y, beta=0.4, chosen_win_probs=one, rejected_win_probs=zero).losses
    assert torch.allclose(soft, 0.5 * preference_loss("sppo_hard", x, y, beta=0.4).losses)


def test_discopop_gradient_at_zero_margin_favours_the_rejected_side():
    """DiscoPOP is non-convex at tau = 0.05: at h = 0 the loss *decreases* as h decreases.
    This is the formula's behaviour (TRL's too), recorded so nobody 'fixes' it silently."""
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    preference_loss("discopop", h, torch.zeros(1, dtype=torch.float64), beta=1.0).losses.sum().backward()
    # d/dh at 0: m' (e^0 - log 2) - (1/2)(1/2) - (1/2)(1) with m' = 1/(4 tau) = 5
    assert h.grad.item() == pytest.approx(5 * (1 - math.log(2)) - 0.75)
    assert h.grad.item() > 0


def test_kto_reference_point_and_weights():
    c = torch.tensor([0.5, 1.0, -0.2], dtype=torch.float64)
    r = torch.tensor([-1.0, 0.3], dtype=torch.float64)
    kl = torch.tensor([0.1, 0.3], dtype=torch.float64)
    out = preference_loss("kto", c, r, beta=2.0, desirable_weight=1.0, undesirable_weight=1.5, kl_logratios=kl)
    z0 = 0.2
    expect = [1 - s(2.0 * (v - z0)) for v in c.tolist()] + [1.5 * (1 - s(2.0 * (z0 - v))) for v in r.tolist()]
    assert out.losses.tolist() == pytest.approx(expect)
    # z0 is clamped at zero and, with no KL completions, estimated from the batch itself
    neg = preference_loss("kto", c, r, beta=2.0, kl_logratios=-kl)
    assert neg.losses[0].item() == pytest.approx(1 - s(2.0 * 0.5))
    batch_z0 = torch.cat([c, r]).mean().clamp(min=0).item()
    est = preference_loss("kto", c, r, beta=2.0)
    assert est.losses[0].item() == pytest.approx(1 - s(2.0 * (0.5 - batch_z0)))
    given = preference_loss("kto", c, r, beta=2.0, reference_point=0.7)
    assert given.losses[0].item() == pytest.approx(1 - s(2.0 * (0.5 - 0.7)))
    # z0 carries no gradient
    cg = c.clone().requires_grad_(True)
    preference_loss("kto", cg, r, beta=2.0).losses.sum().backward()
    assert cg.grad.tolist() == pytest.approx([2.0 * s(2.0 * (v - batch_z0)) * (1 - s(2.0 * (v - batch_z0))) * -1
                                              for v in c.tolist()])


def test_mapo_score_at_zero_and_huge_errors():
    """f(u) = u / (e^u - 1) is 1 at u = 0 (equal zero errors: the margin term is beta log 2) and 0 for
    huge u, with finite gradients at both ends; rewards are beta * -error."""
    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    out = preference_loss("mapo", beta=0.1, chosen_errors=z, rejected_errors=torch.zeros(2, dtype=torch.float64))
    assert out.losses.tolist() == pytest.approx([0.1 * math.log(2)] * 2, rel=1e-12)
    out.losses.sum().backward()
    # d/de_w [e_w + beta l(T (f(c e_w) - f(c e_l)))] at 0: 1 + beta * (-1/2) * T * f'(0) * c, f'(0) = -1/2
    assert z.grad.tolist() == pytest.approx([1 + 0.1 * 0.5 * 1000 * 0.5 * 0.5] * 2)
    big = torch.tensor([1e4, 3.0], dtype=torch.float64, requires_grad=True)
    out = preference_loss("mapo", beta=0.1, chosen_errors=big, rejected_errors=torch.tensor([1.0, 1e4]).double())
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(big.grad).all()
    assert out.chosen_rewards.tolist() == pytest.approx([-1e3, -0.3])


def test_aot_sorts_margins_across_the_batch():
    pc, pr = torch.tensor([-3.0, -1.0, -2.0]), torch.tensor([-2.0, -4.0, -1.0])
    rc, rr = torch.tensor([-2.5, -1.5, -2.0]), torch.tensor([-2.0, -3.0, -3.0])
    out = preference_loss("aot", pc - rc, pr - rr, beta=1.0, chosen_logps=pc, rejected_logps=pr)
    delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
    assert torch.allclose(out.losses, -torch.nn.functional.logsigmoid(delta))
    out_u = preference_loss("aot_unpaired", pc - rc, pr - rr, beta=1.0)
    delta_u = torch.sort(pc - rc).values - torch.sort(pr - rr).values
    assert torch.allclose(out_u.losses, -torch.nn.functional.logsigmoid(delta_u))


def test_sft_term_rpo_and_weighted_sum():
    b = batch()
    base = call("sigmoid", b, 0.1).losses
    summed = call("sigmoid", b, 0.1, sft_weight=0.2, sft_reduction="sum").losses
    assert torch.allclose(summed, base - 0.2 * b["chosen_logps"])
    mean = call("sigmoid", b, 0.1, sft_weight=0.2, sft_reduction="mean").losses
    assert torch.allclose(mean, base - 0.2 * b["chosen_logps"] / b["chosen_lengths"])
    nll = torch.rand(6, dtype=torch.float64)
    explicit = preference_loss("sigmoid", b["chosen_logratios"], b["rejected_logratios"], beta=0.1, sft_weight=2.0,
                               chosen_nll=nll).losses
    assert torch.allclose(explicit, base + 2.0 * nll)
    combo = preference_loss(["sigmoid", "hinge"], b["chosen_logratios"], b["rejected_logratios"], beta=0.1,
                            loss_weights=[0.8, 0.2]).losses
    assert torch.allclose(combo, 0.8 * base + 0.2 * call("hinge", b, 0.1).losses)
    w = torch.rand(6, dtype=torch.float64)
    assert torch.allclose(call("sigmoid", b, 0.1, weights=w).losses, base * w)


def test_diffusion_logratios_and_beta_conventions():
    g = torch.Generator().manual_seed(1)
    err_w_theta, err_w_ref, err_l_theta, err_l_ref = (torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    b = 1234.0
    out = preference_loss("sigmoid", -(err_w_theta - err_w_ref), -(err_l_theta - err_l_ref), beta=b)
    expect = -torch.nn.functional.logsigmoid(b * ((err_w_ref - err_w_theta) - (err_l_ref - err_l_theta)))
    assert torch.allclose(out.losses, expect)
    # Salesforce DiffusionDPO / Tango 2 form: -logsigmoid(-0.5 * B * (model_diff - ref_diff)), B = 5000
    model_diff, ref_diff = err_w_theta - err_l_theta, err_w_ref - err_l_ref
    salesforce = -torch.nn.functional.logsigmoid(-0.5 * 5000 * (model_diff - ref_diff))
    ours = preference_loss("sigmoid", -(err_w_theta - err_w_ref), -(err_l_theta - err_l_ref),
                           beta=diffusion_beta(5000, "salesforce")).losses
    assert torch.allclose(ours, salesforce)
    # diffusers example form: -logsigmoid(B * (ref_diff - model_diff)), B = 2500 — the same loss
    diffusers = -torch.nn.functional.logsigmoid(2500 * (ref_diff - model_diff))
    assert torch.allclose(diffusers, salesforce)
    assert diffusion_beta(2500, "diffusers") == diffusion_beta(5000, "salesforce") == 2500
    assert diffusion_beta(2000, "tango2") == 1000
    with pytest.raises(ValueError, match="convention"):
        diffusion_beta(1.0, "unknown")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(n for n, sp in LOSS_TYPES.items() if sp.paired))
def test_stable_in_half_precision_and_huge_margins(name, dtype):
    # beta 5000 in the Salesforce convention on real-scale diffusion errors: |beta h| ~ 1e3..1e4
    b = batch(dtype=dtype, n=6)
    b["chosen_logratios"] = (torch.tensor([5.0, -5.0, 3.0, -3.0, 0.0, 2.0]) * 1.0).to(dtype)
    b["rejected_logratios"] = (torch.tensor([-5.0, 5.0, -3.0, 3.0, 0.0, 0.5]) * 1.0).to(dtype)
    out = call(name, {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in b.items()}, 2500.0,
               **OPTIONS.get(name, {}))
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()


def test_metrics_names_and_ties():
    c = torch.tensor([1.0, 0.0, -1.0, 2.0])
    r = torch.tensor([0.0, 0.0, 0.0, 1.0])
    lp = torch.tensor([-3.0, -2.0, -1.0, -4.0])
    out = preference_loss("sigmoid", c, r, beta=0.5, chosen_logps=lp, rejected_logps=lp - 1)
    m = out.metrics()
    assert m["rewards/accuracies"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # the tie counts 0.5
    assert m["rewards/chosen"] == pytest.approx(0.5 * c.mean().item())
    assert m["rewards/rejected"] == pytest.approx(0.5 * r.mean().item())
    assert m["rewards/margins"] == pytest.approx(0.5 * (c - r).mean().item())
    assert m["logps/chosen"] == pytest.approx(-2.5) and m["logps/rejected"] == pytest.approx(-3.5)
    assert set(out.metrics(prefix="eval_")) == {"eval_" + k for k in m}
    assert not out.chosen_rewards.requires_grad


def test_running_reward_mean():
    shift = RunningRewardMean()
    assert shift.update(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])) == pytest.approx(2.0)
    assert shift.update(torch.tensor([0.0]), torch.tensor([0.0])) == pytest.approx(1.0)
    restored = RunningRewardMean()
    restored.load_state_dict(shift.state_dict())
    assert restored.update(torch.tensor([3.0]), torch.tensor([3.0])) == pytest.approx(5 / 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="nope"), "loss_type: unknown"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing: not an option"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing: must lie in"),
    (dict(loss_type="robust", label_smoothing=-0.1), "label_smoothing: must lie in"),
    (dict(loss_type="exo_pair", label_smoothing=0.0), "label_smoothing: must lie in"),
    (dict(loss_type="sigmoid", beta=0.0), "beta"),
    (dict(loss_type="sigmoid", rejected_logratios=torch.zeros(3)), "shape mismatch"),
    (dict(loss_type="sigmoid", chosen_logratios=torch.tensor([0.0, float("nan")])), "chosen_logratios: contains NaN"),
    (dict(loss_type="sigmoid", rejected_logratios=torch.tensor([0.0, float("inf")])), "rejected_logratios: contains NaN"),
    (dict(loss_type="sigmoid", chosen_logratios=torch.zeros(2, 1)), r"chosen_logratios: expected shape \[B\]"),
    (dict(loss_type="ipo"), "chosen_lengths: required"),
    (dict(loss_type="sppo"), "chosen_win_probs: required"),
    (dict(loss_type="sigmoid", sft_weight=0.1), "chosen_nll"),
    (dict(loss_type="sigmoid", chosen_logratios=None), "chosen_logratios: required"),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_type=["kto", "sigmoid"]), "unpaired"),
    (dict(loss_type="sigmoid", chosen_logps=torch.tensor([0.5, -1.0])), "chosen_logps: log-probabilities"),
])
def test_bad_input_raises_naming_the_argument(kwargs, message):
    args = dict(chosen_logratios=torch.zeros(2), rejected_logratios=torch.zeros(2), beta=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        preference_loss(args.pop("loss_type"), **args)


def test_reference_free_losses_need_policy_logps():
    with pytest.raises(ValueError, match="chosen_logps/rejected_logps: required"):
        preference_loss("simpo", beta=1.0)


def test_registry_cli_and_readme_list_the_same_names():
    listed = subprocess.run([sys.executable, "-m", "diffdpo", "losses"], capture_output=True, text=True, check=True)
    cli_names = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert cli_names == set(LOSS_TYPES)
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- loss-table", 1)[1].split("<!-- /loss-table -->", 1)[0]
    for name in LOSS_TYPES:
        assert f"| `{name}` |" in table, f"README's loss table does not list {name}"
    out = subprocess.run([sys.executable, "-c", "from diffdpo.losses import LOSS_TYPES; print(sorted(LOSS_TYPES))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(LOSS_TYPES))
