"""Online and iterative preference optimisation: preference models, pair selection, the mixture
sampler, the loop's budget and resume, and every method's config run end to end (tiny TextWorld)."""

from __future__ import annotations

import copy
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdpo.llm.objective import LossConfig
from diffdpo.llm.online import LLMOnlinePolicy, read_prompts, sample_completions
from diffdpo.online.loop import OnlineConfig, run_online
from diffdpo.online.selection import best_vs_worst, rso_accept, rso_pairs, win_probs
from diffdpo.preference_model import Judgement, PairwisePreference, RewardPreference, scorer_reward
from diffdpo.worlds import textworld as tw

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("llm_online_*.yaml"))


# ------------------------------------------------------------------ preference models


def test_reward_preference_is_bradley_terry_and_counts_completions():
    pm = RewardPreference(lambda ps, outs: [float(len(o)) for o in outs], temperature=2.0)
    j = pm.judge("p", ["a", "abc", "ab"])
    assert pm.calls == 3 and pm.cost(3) == 3
    assert j.rewards.tolist() == [1.0, 3.0, 2.0]
    assert j.probs[1, 0] == pytest.approx(1 / (1 + math.exp(-(3 - 1) / 2.0)))
    assert np.allclose(j.probs + j.probs.T, 1.0) and np.allclose(np.diag(j.probs), 0.5)


def test_pairwise_preference_asks_each_unordered_pair_once():
    asked = []

    def prob(prompts, a, b):
        asked.extend(zip(a, b))
        return [0.9 if x < y else 0.2 for x, y in zip(a, b)]

    pm = PairwisePreference(prob)
    j = pm.judge("p", ["x", "y", "z"])
    assert pm.calls == 3 == pm.cost(3) and len(asked) == 3
    assert j.probs[0, 1] == 0.9 and j.probs[1, 0] == pytest.approx(0.1)
    # Borda score: each output's mean win probability over the two others
    assert j.rewards[0] == pytest.approx((0.9 + 0.9) / 2)


def test_builder_scorer_is_a_reward():
    class Scorer:
        def score(self, texts, media, sample_rate):
            return np.array([len(t) * m for t, m in zip(texts, media)], dtype=float)

    pm = RewardPreference(scorer_reward(Scorer(), 16000))
    assert pm.judge("abc", [1, 2]).rewards.tolist() == [3.0, 6.0]


# ------------------------------------------------------------------ pair selection


def test_best_vs_worst_carries_sppo_win_probabilities():
    probs = np.array([[0.5, 0.8, 0.6], [0.2, 0.5, 0.3], [0.4, 0.7, 0.5]])
    assert win_probs(probs) == pytest.approx([0.7, 0.25, 0.55])
    [pair] = best_vs_worst(Judgement(np.zeros(3), probs))
    assert (pair.chosen, pair.rejected) == (0, 1)
    assert (pair.chosen_win_prob, pair.rejected_win_prob) == pytest.approx((0.7, 0.25))
    assert best_vs_worst(Judgement(np.zeros(2), np.full((2, 2), 0.5))) == []  # a tie gives no pair


def test_rso_accepts_in_proportion_to_exp_reward_over_beta():
    """Candidates from a proposal with two reward levels, log 3 apart in units of beta: the accepted
    samples follow proposal x exp(r / beta), i.e. 3 high : 1 low when both are equally common."""
    beta, high = 0.5, 0.5 * math.log(3)
    rng, share = random.Random(0), []
    for _ in range(300):
        rewards = np.array([high] * 200 + [0.0] * 200)
        order = rng.sample(range(400), 400)
        kept = rso_accept(rewards[order], beta, 20, rng)
        share.append(np.mean(rewards[order][kept] == high))
    assert np.mean(share) == pytest.approx(0.75, abs=0.02)


def test_rso_limits():
    rewards = np.array([0.0, 5.0, 1.0, 3.0])
    assert rso_accept(rewards, 1e-6, 2, random.Random(0)) == [1, 3]  # beta -> 0: the best first
    assert sorted(rso_accept(rewards, 1e9, 4, random.Random(0))) == [0, 1, 2, 3]
    assert len(set(rso_accept(rewards, 1.0, 10, random.Random(1)))) == 4  # never more than there are
    with pytest.raises(ValueError, match="beta"):
        rso_accept(rewards, 0.0, 2, random.Random(0))


def test_rso_pairs_are_ordered_by_the_preference_model():
    r = np.array([0.0, 1.0, 2.0, 3.0])
    probs = 1 / (1 + np.exp(-(r[:, None] - r[None, :])))
    for pair in rso_pairs(Judgement(r, probs), beta=100.0, num_accept=4, rng=random.Random(3)):
        assert r[pair.chosen] > r[pair.rejected]


# ------------------------------------------------------------------ the sampler


@pytest.fixture(scope="module")
def world():
    task = tw.SortTask(length=6)
    tok = tw.make_tokenizer(task)
    model = tw.make_model(tok, seed=0, hidden_size=32, layers=1)
    tw.sft(model, tok, task, steps=40, batch_size=32, lr=3e-3)
    other = tw.make_model(tok, seed=1, hidden_size=32, layers=1)
    return task, tok, model, other


def _ids(tok, prompts):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def test_mixture_weight_one_samples_the_reference_and_zero_the_policy(world):
    task, tok, model, other = world
    ids = _ids(tok, tw.held_out_prompts(task, 3, seed=5))

    def draw(m, ref=None, w=0.0):
        return sample_completions(m, ids, 4, 8, tok.eos_token_id, torch.Generator().manual_seed(7), ref, w)

    assert draw(model, other, 1.0) == draw(other)
    assert draw(model, other, 0.0) == draw(model)
    assert draw(model, other, 0.5) != draw(model)


def test_mixture_next_token_distribution_is_the_geometric_mixture(world):
    """One-token draws from w = 0.5 match normalised sqrt(p q) computed from the two models' logits."""
    task, tok, model, other = world
    prompt = _ids(tok, tw.held_out_prompts(task, 1, seed=6))
    x = torch.tensor(prompt)
    with torch.no_grad():
        p = torch.softmax(model(x).logits[0, -1], -1)
        q = torch.softmax(other(x).logits[0, -1], -1)
    target = (p * q).sqrt() / (p * q).sqrt().sum()
    draws = sample_completions(model, prompt, 4000, 1, tok.eos_token_id, torch.Generator().manual_seed(0), other, 0.5)
    counts = torch.bincount(torch.tensor([c[1][0] for c in draws[0]]), minlength=len(target)).float() / 4000
    top = target.topk(3).indices
    assert counts[top] == pytest.approx(target[top], abs=0.03)


# ------------------------------------------------------------------ the loop


def _exact(task):
    return RewardPreference(lambda ps, cs: [task.exact_reward(p, c) for p, c in zip(ps, cs)], 0.1)


def _policy(world, loss=None):
    _, tok, model, _ = world
    return LLMOnlinePolicy(copy.deepcopy(model), tok, loss or LossConfig(type="ipo", beta=0.1), lr=1e-3,
                           batch_size=8, max_new_tokens=12)


def test_budget_caps_calls_and_rounds_are_written(world, tmp_path):
    task = world[0]
    prompts = tw.held_out_prompts(task, 40, seed=2)
    pm = _exact(task)
    cfg = OnlineConfig(rounds=10, prompts_per_round=8, samples_per_prompt=2, budget=40)
    result = run_online(cfg, _policy(world), pm, prompts, tmp_path, progress=False)
    assert pm.calls == 40 and result["rounds"] == 3  # 16 + 16 + 8 calls
    assert [h["prompts"] for h in result["history"]] == [8, 8, 4]
    rows = (tmp_path / "rounds" / "round_0002.jsonl").read_text().splitlines()
    assert len(rows) == result["history"][2]["pairs"]
    assert (tmp_path / "checkpoints" / "step_3").is_dir()


def test_resume_after_a_kill_equals_the_uninterrupted_run(world, tmp_path):
    task = world[0]
    prompts = tw.held_out_prompts(task, 64, seed=3)
    cfg = dict(prompts_per_round=8, samples_per_prompt=4, steps_per_round=2, reference="previous_round")
    loss = LossConfig(type="sppo", beta=0.1)
    whole = _policy(world, loss)
    run_online(OnlineConfig(rounds=4, **cfg), whole, _exact(task), prompts, tmp_path / "a", progress=False)
    first = _policy(world, loss)
    run_online(OnlineConfig(rounds=2, **cfg), first, _exact(task), prompts, tmp_path / "b", progress=False)
    resumed, pm = _policy(world, loss), _exact(task)  # a fresh process: the initial model, then the checkpoint
    run_online(OnlineConfig(rounds=4, **cfg), resumed, pm, prompts, tmp_path / "b", progress=False)
    assert pm.calls == 4 * 8 * 4
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for r in range(4):
        name = f"rounds/round_{r:04d}.jsonl"
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_read_prompts_names_the_bad_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: .*'prompt'"):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    assert read_prompts(tmp_path / "p.txt") == ["a", "b"]


# ------------------------------------------------------------------ every method from its config


@pytest.fixture(scope="module")
def sft_folder(world, tmp_path_factory):
    task, tok, model, _ = world
    folder = tmp_path_factory.mktemp("tw")
    model.save_pretrained(folder / "sft_model")
    tok.save_pretrained(folder / "sft_model")
    (folder / "prompts.txt").write_text("\n".join(tw.held_out_prompts(task, 32, seed=4)) + "\n")
    return folder


def test_there_is_a_config_per_method():
    assert {p.stem for p in CONFIGS} == {f"llm_online_{m}" for m in (
        "dpo_offline", "rso_dpo", "rso_hinge", "dpo_iterative", "ipo", "ipo_md", "sppo")}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_each_method_runs_from_its_config(config, sft_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "llm_online.py"), "--config", str(config),
           f"model.name_or_path={sft_folder / 'sft_model'}", f"prompts_path={sft_folder / 'prompts.txt'}",
           f"train.output_dir={out}", "online.rounds=2", "online.prompts_per_round=4", "online.steps_per_round=1",
           "online.budget=64", "train.batch_size=4", "train.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                                                   "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "final" / "config.json").is_file() and (out / "history.json").is_file()
    assert sorted(p.name for p in (out / "rounds").iterdir())[0] == "round_0000.jsonl"
    assert f"rounds: {out / 'rounds'}" in proc.stdout


def test_recipe_user_mistake_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "llm_online.py"), "--config",
                           str(CONFIGS[0]), "online.sampler=sideways"], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "online.sampler" in proc.stderr


# ------------------------------------------------------------------ the TextWorld comparison recipe


def test_textworld_comparison_measures_every_method_at_the_same_steps(tmp_path):
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import textworld_online
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    torch.set_num_threads(1)
    results = textworld_online.main(["--out", str(tmp_path), "--split", "validation", "--seeds", "2", "--first-seed",
                                     "3", "--budget", "64", "--steps", "8", "--sft-steps", "2", "--eval-prompts", "3",
                                     "--methods", "dpo_offline", "ipo_online"])
    assert list(results["seeds"]) == ["3", "4"] and results["checkpoints"] == [2, 4, 8]
    for seed in results["seeds"].values():
        for name, m in seed["methods"].items():
            assert sorted(m["exact"], key=int) == ["2", "4", "8"] and all(len(v) == 3 for v in m["exact"].values())
            assert m["calls"] <= 64, name
    summary = results["summary"]
    # the table's mean is the mean over seeds and prompts; its CI holds it
    finals = [x for s in results["seeds"].values() for x in s["methods"]["ipo_online"]["exact"]["8"]]
    mean, lo, hi = summary["exact"]["ipo_online"]
    assert mean == pytest.approx(sum(finals) / len(finals)) and lo <= mean <= hi
    assert summary["curve_ci"]["dpo_offline"][8][0] == pytest.approx(summary["exact"]["dpo_offline"][0])
    assert "ipo_online - dpo_offline" in summary["differences"]
    svg = (tmp_path / "curves_validation.svg").read_text()
    assert svg.startswith("<svg") and "dpo_offline" in svg and "ipo_online" in svg
    assert (tmp_path / "results_validation.json").is_file() and (tmp_path / "report_validation.html").is_file()


def test_interval_chart_legend_wraps_instead_of_running_off_the_chart():
    from diffdpo.report import render_interval_chart

    series = {f"method_{i}": [{"x": 0, "mean": 0.5, "ci95": [0.4, 0.6]}, {"x": 1, "mean": 0.6}] for i in range(7)}
    svg = render_interval_chart("t", series, "steps", width=640, height=300)
    xs = [float(x) for x in re.findall(r'<text x="([\d.]+)" y="[\d.]+">method_', svg)]
    assert len(xs) == 7 and max(xs) + 60 < 640  # every name starts inside the chart's width
    assert 'height="314"' in svg  # 4 a row at this width: a second row adds 14 px


def test_textworld_comparison_rso_options_reach_the_config_and_bad_values_are_refused(tmp_path):
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import textworld_online
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    from diffdpo.errors import UserError

    cfg = textworld_online.scaled_config("rso_dpo", 6400, 200, tmp_path, 0, rso_candidates=16, rso_beta=0.1)
    assert cfg.online.samples_per_prompt == 16 and cfg.online.rso_beta == 0.1
    assert textworld_online.scaled_config("rso_dpo", 6400, 200, tmp_path, 0, 16).online.rso_beta == 0.5  # configs'
    with pytest.raises(UserError, match="--rso-beta"):
        textworld_online.main(["--out", str(tmp_path), "--rso-beta", "0"])
