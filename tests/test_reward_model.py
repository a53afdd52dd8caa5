"""The Bradley-Terry reward model and the pairwise preference model: their losses against hand
computations, that they learn TextWorld's exact preferences, and that the saved folders are the
`rm:PATH` / `pm:PATH` judges the online recipe reads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffdpo.llm.metrics import load_judge
from diffdpo.llm.reward_model import (bradley_terry_loss, pair_accuracy, rewards, sequence_classifier_like,
                                      train_reward_model)
from diffdpo.preference_model import RewardPreference
from diffdpo.worlds import textworld as tw


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    task = tw.SortTask(length=6)
    tok = tw.make_tokenizer(task)
    sft = tw.make_model(tok, seed=0, hidden_size=64, layers=2)
    tw.sft(sft, tok, task, steps=150, lr=2e-3)
    prompts = tw.held_out_prompts(task, 400, seed=1)
    rows = tw.make_pairs(task, prompts, tw.generate(sft, tok, prompts, num_samples=4, seed=0), "exact")
    return task, tok, sft, rows


def test_loss_is_minus_log_sigmoid_of_the_reward_margin(world):
    _, tok, sft, rows = world
    rm = sequence_classifier_like(sft, tok.pad_token_id)
    pair = rows[:3]
    with torch.no_grad():
        loss = bradley_terry_loss(rm, tok, pair)
        hand = []
        for r in pair:  # one sequence at a time: no padding involved
            rc = rm(**tok(r["prompt"] + r["chosen"], return_tensors="pt", add_special_tokens=False)).logits[0, 0]
            rr = rm(**tok(r["prompt"] + r["rejected"], return_tensors="pt", add_special_tokens=False)).logits[0, 0]
            hand.append(math.log1p(math.exp(-(float(rc) - float(rr)))))
    assert float(loss) == pytest.approx(sum(hand) / 3, rel=1e-4)


def test_learns_the_exact_preferences_and_loads_as_a_judge(world, tmp_path):
    task, tok, sft, rows = world
    train, held_out = rows[: len(rows) - 100], rows[len(rows) - 100:]
    rm = sequence_classifier_like(sft, tok.pad_token_id)
    before = pair_accuracy(rm, tok, held_out)
    losses = train_reward_model(rm, tok, train, steps=150, lr=2e-3, batch_size=32)
    after = pair_accuracy(rm, tok, held_out)
    assert losses[-1] < losses[0] and after > 0.75 and after > before + 0.1, (before, after)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = load_judge(f"rm:{tmp_path / 'rm'}")
    r = held_out[0]
    with torch.no_grad():
        expected = rewards(rm, tok, [r["prompt"]], [r["chosen"]])[0]
    assert judge(r["prompt"], r["chosen"]) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    pm = RewardPreference(lambda ps, cs: [judge(p, c) for p, c in zip(ps, cs)], temperature=1.0)
    assert pm.judge(r["prompt"], [r["chosen"], r["rejected"]]).probs.shape == (2, 2)


def test_pairwise_model_learns_the_preferences_is_symmetric_and_judges_the_online_loop(world, tmp_path):
    from diffdpo.llm.online import PreferenceConfig, judge_preference
    from diffdpo.llm.reward_model import pairwise_loss, train_pairwise_model, win_probability
    from diffdpo.preference_model import PairwisePreference

    task, tok, sft, rows = world
    train, held_out = rows[: len(rows) - 100], rows[len(rows) - 100:]
    pm = sequence_classifier_like(sft, tok.pad_token_id)
    r = train[0]
    with torch.no_grad():  # the loss: both orders of the pair, by hand
        f = lambda a, b: float(pm(**tok(r["prompt"] + a + " || " + b, return_tensors="pt",  # noqa: E731
                                        add_special_tokens=False)).logits[0, 0])
        hand = (math.log1p(math.exp(-f(r["chosen"], r["rejected"]))) + math.log1p(math.exp(f(r["rejected"], r["chosen"])))) / 2
        assert float(pairwise_loss(pm, tok, [r])) == pytest.approx(hand, rel=1e-4)
    losses = train_pairwise_model(pm, tok, train, steps=80, lr=2e-3, batch_size=16)
    prompts = [x["prompt"] for x in held_out]
    p_cw = win_probability(pm, tok, prompts, [x["chosen"] for x in held_out], [x["rejected"] for x in held_out])
    p_wc = win_probability(pm, tok, prompts, [x["rejected"] for x in held_out], [x["chosen"] for x in held_out])
    assert losses[-1] < losses[0] and float((p_cw > 0.5).float().mean()) > 0.75
    assert torch.allclose(p_cw + p_wc, torch.ones_like(p_cw), atol=1e-6)  # symmetrised whatever was learnt
    pm.save_pretrained(tmp_path / "pm")
    tok.save_pretrained(tmp_path / "pm")
    judge = judge_preference(PreferenceConfig(judge=f"pm:{tmp_path / 'pm'}"))
    assert isinstance(judge, PairwisePreference)
    outs = [held_out[0]["chosen"], held_out[0]["rejected"], held_out[1]["chosen"]]
    j = judge.judge(held_out[0]["prompt"], outs)
    assert judge.calls == 3 and j.probs[0, 1] == pytest.approx(float(p_cw[0]), abs=1e-5)
    assert np.allclose(j.probs + j.probs.T, 1.0)
    with pytest.raises(FileNotFoundError, match="pm:"):
        judge_preference(PreferenceConfig(judge=f"pm:{tmp_path / 'nothing'}"))
