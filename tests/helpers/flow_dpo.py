"""The Flow-DPO re-derivation the flow-matching families' tests compare the toolkit's loss with."""

from __future__ import annotations

import math

import torch


def assert_flow_dpo_is_the_rederivation(out, got_grads, params, policy, reference, forward, winners, losers, noise,
                                        sigma, times, cond, beta, sft_weight):
    """Recompute ``-logsigmoid(-0.5 beta ((mse_w - mse_l) - (ref_w - ref_l))) + sft_weight mse_w`` by hand
    from ``forward(model, x_t, times, cond)`` (the family's transformer called directly) on
    ``x_t = (1 - sigma) x0 + sigma noise`` with target ``noise - x0``, and check ``out`` (loss, errors)
    and ``got_grads`` against it. Winners and losers go through one forward, as Salesforce's train.py
    stacks them (float32 sums then match the toolkit's to the last bits, which a beta of 1000 would
    otherwise amplify in the gradients)."""
    s = sigma.view(-1, *[1] * (winners.dim() - 1))
    x0 = torch.cat([winners, losers])
    x_t = torch.cat([(1 - s) * winners + s * noise, (1 - s) * losers + s * noise])
    times2 = torch.cat([times, times])
    cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}

    def mse(model):
        pred = forward(model, x_t, times2, cond2)
        return ((pred - (torch.cat([noise, noise]) - x0)) ** 2).flatten(1).mean(1).chunk(2)

    with torch.no_grad():
        ref_w, ref_l = mse(reference)
    pol_w, pol_l = mse(policy)
    losses = -torch.nn.functional.logsigmoid(-0.5 * beta * ((pol_w - pol_l) - (ref_w - ref_l))) + sft_weight * pol_w
    want = losses.mean()
    want_grads = torch.autograd.grad(want, params)

    assert abs(want.item() - math.log(2) - sft_weight * pol_w.mean().item()) > 1e-3  # a loss with something in it
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.policy_errors[0], pol_w.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.reference_errors[1], ref_l, rtol=1e-5, atol=1e-7)
    scale = max(w.abs().max().item() for w in want_grads)
    assert scale > 0
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
