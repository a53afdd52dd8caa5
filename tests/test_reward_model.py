"""The Bradley-Terry reward model: its loss against a hand computation, that it learns TextWorld's
exact preferences, and that the saved folder is the `rm:PATH` judge the online recipe reads."""

from __future__ import annotations

import math

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
    prompts = tw.held_out_prompts(task, 500, seed=1)
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
