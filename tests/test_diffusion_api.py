"""``diffdpo.diffusion.api.diffusion_dpo_loss`` against a hand computation of the published formula.

Salesforce DiffusionDPO's loss, written here from its maths and nothing of diffdpo: noise the
winner and the loser with the pair's noise and timestep, per-sample MSE of the prediction against
the target over every non-batch dimension, ``model_diff = mse_w - mse_l`` (policy),
``ref_diff`` likewise (reference, no grad), ``inside = -0.5 * beta * (model_diff - ref_diff)``,
loss = mean of ``-logsigmoid(inside)``. Checked on a tiny diffusers UNet2DConditionModel (fixed seed)
for epsilon, v-prediction and flow matching, for every beta convention at the same effective beta;
loss, metrics and the policy's gradient all agree, and no gradient reaches the reference. The
example in docs/diffusion_api.md is run as written.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffdpo.diffusion.api import BETA_CONVENTIONS, core_beta, diffusion_dpo_loss
from helpers.tiny_unet import perturbed, tiny_unet

B = 3
DOC = Path(__file__).resolve().parents[1] / "docs" / "diffusion_api.md"
# the same loss in every convention: Salesforce's 5000 (and Tango 2's form), the diffusers SD1.5 example's 2500
EQUAL_BETAS = [("salesforce", 5000.0), ("tango2", 5000.0), ("diffusers", 2500.0), ("core", 2500.0)]


def pair_batch(num_steps: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w, l, noise = (torch.randn(B, 4, 8, 8, generator=g) for _ in range(3))
    hidden = torch.randn(B, 5, 16, generator=g)
    steps = torch.tensor([17, num_steps // 2, num_steps - 3])
    return w, l, hidden, noise, steps


def hand_loss(policy, reference, scheduler, kind, w, l, hidden, noise, steps, published_beta):
    """Salesforce's published form with the noised input and target of ``kind``."""
    x0, eps = torch.cat([w, l]), torch.cat([noise, noise])
    if kind == "flow":
        sigma = scheduler.sigmas[torch.cat([steps, steps])].view(-1, 1, 1, 1)
        t = scheduler.timesteps[torch.cat([steps, steps])]
        noisy, target = (1 - sigma) * x0 + sigma * eps, eps - x0
    else:
        t = torch.cat([steps, steps])
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    cond = torch.cat([hidden, hidden])

    def mse(unet):
        return ((unet(noisy, t, encoder_hidden_states=cond).sample - target) ** 2).mean(dim=[1, 2, 3])

    model = mse(policy)
    with torch.no_grad():
        ref = mse(reference)
    (mw, ml), (rw, rl) = model.chunk(2), ref.chunk(2)
    inside = -0.5 * published_beta * ((mw - ml) - (rw - rl))
    return -F.logsigmoid(inside).mean(), inside.detach(), model.detach(), ref


def scheduler_of(kind: str):
    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)


@pytest.mark.parametrize("convention, beta", EQUAL_BETAS)
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_loss_metrics_and_gradient_equal_the_hand_computation(kind, convention, beta):
    scheduler = scheduler_of(kind)
    policy = tiny_unet()
    reference = perturbed(policy)  # requires_grad stays True: the API must still keep it out of the graph
    w, l, hidden, noise, steps = pair_batch()

    out = diffusion_dpo_loss(policy, reference, scheduler, w, l, hidden, noise, steps,
                             beta=beta, beta_convention=convention)
    out.loss.backward()
    api_grads = [p.grad.clone() for p in policy.parameters()]
    assert all(p.grad is None for p in reference.parameters())  # nothing flows to the reference
    assert sum(g.abs().sum().item() for g in api_grads) > 0

    policy.zero_grad(set_to_none=True)
    hand, inside, model_mse, ref_mse = hand_loss(policy, reference, scheduler, kind, w, l, hidden, noise, steps,
                                                 published_beta=5000.0)
    hand.backward()
    assert not math.isclose(hand.item(), math.log(2), rel_tol=1e-3) and (inside != 0).all()
    torch.testing.assert_close(out.loss, hand, rtol=1e-5, atol=1e-6)
    for p, g in zip(policy.parameters(), api_grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)

    m = out.metrics
    assert m["loss"] == pytest.approx(hand.item(), rel=1e-5)
    assert m["rewards/accuracies"] == pytest.approx((inside > 0).float().mean().item())
    assert m["rewards/margins"] == pytest.approx(inside.mean().item(), rel=1e-4, abs=1e-6)
    assert m["mse/policy"] == pytest.approx(model_mse.mean().item(), rel=1e-5)
    assert m["mse/ref"] == pytest.approx(ref_mse.mean().item(), rel=1e-5)
    assert (m["mse/policy_chosen"], m["mse/policy_rejected"]) == \
        pytest.approx([model_mse[:B].mean().item(), model_mse[B:].mean().item()], rel=1e-5)
    assert (m["mse/ref_chosen"], m["mse/ref_rejected"]) == \
        pytest.approx([ref_mse[:B].mean().item(), ref_mse[B:].mean().item()], rel=1e-5)
    assert out.beta_core == 2500.0
    assert not any(t.requires_grad for t in (out.losses, out.chosen_rewards, out.rejected_rewards,
                                             *out.policy_errors, *out.reference_errors))


def test_precomputed_reference_errors_and_lora_disabled_reference():
    """Reference errors given as tensors give the module's loss; ``"lora_disabled"`` is the base
    model under the policy's LoRA (the diffusers example's reference), and only LoRA weights get gradients."""
    from peft import LoraConfig

    scheduler = scheduler_of("epsilon")
    w, l, hidden, noise, steps = pair_batch(seed=2)
    policy, reference = tiny_unet(), perturbed(tiny_unet())
    with_module = diffusion_dpo_loss(policy, reference, scheduler, w, l, hidden, noise, steps,
                                     beta=5000, beta_convention="salesforce")
    with_errors = diffusion_dpo_loss(policy, with_module.reference_errors, scheduler, w, l, hidden, noise, steps,
                                     beta=5000, beta_convention="salesforce")
    torch.testing.assert_close(with_errors.loss, with_module.loss)

    base = tiny_unet().requires_grad_(False)
    base.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out = diffusion_dpo_loss(base, "lora_disabled", scheduler, w, l, hidden, noise, steps,
                             beta=5000, beta_convention="salesforce")
    out.loss.backward()
    base.disable_adapters()
    hand, *_ = hand_loss(base, base, scheduler, "epsilon", w, l, hidden, noise, steps, 5000.0)
    base.enable_adapters()
    lora_policy_hand, *_ = hand_loss(base, tiny_unet(), scheduler, "epsilon", w, l, hidden, noise, steps, 5000.0)
    assert hand.item() == pytest.approx(math.log(2))  # adapters off on both sides
    torch.testing.assert_close(out.loss, lora_policy_hand.detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in base.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)


def test_at_the_start_the_loss_is_log2_whatever_the_convention():
    scheduler = scheduler_of("v_prediction")
    policy = tiny_unet()
    w, l, hidden, noise, steps = pair_batch(seed=4)
    for convention, beta in EQUAL_BETAS:
        out = diffusion_dpo_loss(policy, copy.deepcopy(policy), scheduler, w, l, hidden, noise, steps,
                                 beta=beta, beta_convention=convention)
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert out.metrics["rewards/accuracies"] == pytest.approx(0.5)


def test_condition_as_a_dict_and_a_custom_predict():
    scheduler = scheduler_of("epsilon")
    policy, reference = tiny_unet(), perturbed(tiny_unet())
    w, l, hidden, noise, steps = pair_batch()
    plain = diffusion_dpo_loss(policy, reference, scheduler, w, l, hidden, noise, steps, beta=2500,
                               beta_convention="diffusers")
    seen = []

    def predict(model, noisy, t, cond):
        seen.append(sorted(cond))
        return model(noisy, t, encoder_hidden_states=cond["text"]).sample

    custom = diffusion_dpo_loss(policy, reference, scheduler, w, l, {"text": hidden}, noise, steps, beta=2500,
                                beta_convention="diffusers", predict=predict)
    torch.testing.assert_close(custom.loss, plain.loss)
    assert seen == [["text"], ["text"]]  # policy and reference, each one forward over winners and losers


def test_sft_weight_adds_the_winners_policy_mse():
    scheduler = scheduler_of("epsilon")
    policy, reference = tiny_unet(), perturbed(tiny_unet())
    w, l, hidden, noise, steps = pair_batch()
    args = (policy, reference, scheduler, w, l, hidden, noise, steps)
    plain = diffusion_dpo_loss(*args, beta=2000, beta_convention="tango2")
    crpo = diffusion_dpo_loss(*args, beta=2000, beta_convention="tango2", sft_weight=1.0)
    torch.testing.assert_close(crpo.loss, plain.loss + plain.policy_errors[0].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(beta_convention="sdxl"), r"beta_convention: unknown 'sdxl'; valid are:\n  salesforce: .*\n  tango2: .*"
                                   r"\n  tangoflux: .*\n  diffusers: .*\n  core: "),
    (dict(timesteps=torch.tensor([0.5, 1.0, 2.0])), r"timesteps: expected an integer tensor of shape \[B\] = \[3\]"),
    (dict(timesteps=torch.tensor([0, 1])), r"timesteps: expected an integer tensor of shape \[B\] = \[3\]"),
    (dict(timesteps=torch.tensor([0, 1, 1000])), r"timesteps: must lie in \[0, 1000\)"),
    (dict(noise=torch.randn(B, 4, 4, 4)), r"noise: expected one noise per pair, shape \(3, 4, 8, 8\)"),
    (dict(rejected=torch.randn(2, 4, 8, 8)), r"expected the same shape \[B, \.\.\.\]"),
    (dict(condition=torch.randn(1, 5, 16)), r"condition\['encoder_hidden_states'\]: expected a tensor with leading"),
    (dict(loss_type="kto"), r"loss_type: 'kto' is not a paired loss with a reference; valid: \[.*'sigmoid'"),
    (dict(loss_type="simpo"), r"loss_type: 'simpo' is not a paired loss with a reference"),
    (dict(reference="copy"), r"reference: a module, 'lora_disabled' or \(errors_chosen, errors_rejected\)"),
    (dict(reference=(torch.zeros(3), torch.zeros(2))), r"reference: precomputed errors must be two \[B\] = \[3\]"),
])
def test_bad_arguments_are_named(change, message):
    scheduler = scheduler_of("epsilon")
    policy = tiny_unet()
    w, l, hidden, noise, steps = pair_batch()
    args = dict(reference=policy, rejected=l, condition=hidden, noise=noise, timesteps=steps,
                beta_convention="salesforce", loss_type="sigmoid")
    args.update(change)
    with pytest.raises(ValueError, match=message):
        diffusion_dpo_loss(policy, args["reference"], scheduler, w, args["rejected"], args["condition"], args["noise"],
                           args["timesteps"], beta=5000, beta_convention=args["beta_convention"],
                           loss_type=args["loss_type"])


def test_core_beta_of_the_published_settings():
    assert core_beta(5000, "salesforce") == core_beta(2500, "diffusers") == core_beta(2500, "core") == 2500
    assert core_beta(2000, "tango2") == core_beta(2000, "tangoflux") == 1000


def test_convention_help_says_which_diffusers_script_is_which():
    """The 'diffusers' convention is the SD1.5 example's (train_diffusion_dpo.py, beta 2500); the
    SDXL example in the same folder (train_diffusion_dpo_sdxl.py) uses -0.5*beta, i.e. 'salesforce'."""
    diffusers_text = BETA_CONVENTIONS["diffusers"]
    assert "SD1.5" in diffusers_text and "train_diffusion_dpo.py" in diffusers_text and "2500" in diffusers_text
    assert "train_diffusion_dpo_sdxl.py" in diffusers_text and "'salesforce'" in diffusers_text
    assert "train_diffusion_dpo_sdxl.py" in BETA_CONVENTIONS["salesforce"]
    table = DOC.read_text().split("## Beta conventions", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)[1:]  # after the header row
    assert rows == list(BETA_CONVENTIONS)  # the doc's table lists exactly the accepted conventions
    diffusers_row = next(r for r in table.splitlines() if r.startswith("| `diffusers`"))
    assert "train_diffusion_dpo.py" in diffusers_row and "2500" in diffusers_row
    assert "train_diffusion_dpo_sdxl.py" in diffusers_row and "`salesforce`" in diffusers_row


def test_the_documented_example_runs_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/diffusion_api.md has no python example"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 25
    scope: dict = {}
    exec(compile(example, str(DOC), "exec"), scope)  # noqa: S102 - the doc's own code, as a user would run it
    out, unet = scope["out"], scope["unet"]
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # what the example's comment says
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert all(p.grad is None for p in scope["reference"].parameters())
    printed = capsys.readouterr().out
    for key in ("rewards/accuracies", "rewards/margins", "mse/policy", "mse/ref"):
        assert key in out.metrics and f"'{key}'" in printed
