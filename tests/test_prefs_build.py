"""Selection strategies on fixed scores, and the builder end to end with a tiny fake world
(tests/helpers/fake_media.py): files, manifest, resume after SIGKILL, failures, prefs check."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from diffdpo.config import load_config
from diffdpo.prefs.build import BuildConfig, build_preferences, caption_id, derive_seed, unique_captions
from diffdpo.prefs.check import check_preference_set
from diffdpo.prefs.select import Candidate, NoPair, select_multi_sample, select_perturbed
from helpers.fake_media import FakeGenerator, FakeScorer

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "A dog barks followed by a man speaking",
    "Rain falls while a bell rings",
    "Birds chirp, then a car passes by",
    "a dog barks  followed by a man speaking.",  # duplicate of the first
    "A clock ticks",
    "A siren wails after an engine hums",
    "",
    "Water runs, then a door closes",
]


def cand(key, score, kind=None):
    return Candidate(key, "p", 0, score, kind)


def test_multi_sample_picks_max_and_min_above_the_gap():
    origs = [cand("a", 0.2), cand("b", 0.5), cand("c", 0.35)]
    sel = select_multi_sample(origs, min_gap=0.3)
    assert (sel.chosen.key, sel.rejected.key, sel.strategy) == ("b", "a", "multi_sample")
    assert sel.gap == pytest.approx(0.3)
    assert isinstance(select_multi_sample(origs, min_gap=0.31), NoPair)
    assert isinstance(select_multi_sample(origs[:1], min_gap=0.0), NoPair)


def test_perturbed_picks_a_loser_below_the_winner_by_the_gap():
    origs = [cand("o0", 0.6), cand("o1", 0.4)]
    pert = [cand("p0", 0.58, "swap_order"), cand("p1", 0.3, "drop_event"), cand("p2", 0.5, "replace_event")]
    lowest = select_perturbed(origs, pert, min_gap=0.05)
    assert (lowest.chosen.key, lowest.rejected.key) == ("o0", "p1")
    hardest = select_perturbed(origs, pert, min_gap=0.05, strategy="temporal", loser="hardest")
    assert (hardest.chosen.key, hardest.rejected.key, hardest.strategy) == ("o0", "p2", "temporal")
    none = select_perturbed(origs, pert, min_gap=0.4)
    assert isinstance(none, NoPair) and "0.6000" in none.reason
    assert isinstance(select_perturbed([], pert, 0.0), NoPair)
    with pytest.raises(ValueError, match="loser"):
        select_perturbed(origs, pert, 0.0, loser="random")


def test_min_winner_score_refuses_pairs_of_two_weak_samples():
    origs = [cand("a", 0.2), cand("b", 0.5)]
    pert = [cand("p", 0.1, "drop_event")]
    assert select_multi_sample(origs, min_gap=0.1, min_winner_score=0.5).chosen.key == "b"  # the floor is inclusive
    weak = select_multi_sample(origs, min_gap=0.1, min_winner_score=0.51)
    assert isinstance(weak, NoPair) and "min_winner_score 0.51" in weak.reason
    assert select_perturbed(origs, pert, 0.1, min_winner_score=0.5).rejected.key == "p"
    weak = select_perturbed(origs, pert, 0.1, strategy="temporal", min_winner_score=0.6)
    assert isinstance(weak, NoPair) and weak.strategy == "temporal"


def test_captions_are_deduplicated_and_seeds_stable():
    unique, dropped = unique_captions(CAPTIONS)
    assert dropped == 2 and len(unique) == 6
    assert unique[0] == (caption_id(CAPTIONS[0]), CAPTIONS[0])
    assert caption_id(CAPTIONS[0]) == caption_id(CAPTIONS[3])
    assert derive_seed(0, 0, "c1", "orig", 0) == derive_seed(0, 0, "c1", "orig", 0) != derive_seed(1, 0, "c1", "orig", 0)


def make_config(tmp_path, **overrides):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    args = [f"captions={captions}", f"out={tmp_path / 'set'}", "shard_size=2",
            "generator.kind=helpers.fake_media:make_generator", "scorer.kind=helpers.fake_media:make_scorer",
            *(f"{k}={v}" for k, v in overrides.items())]
    return load_config(BuildConfig, ROOT / "recipes/configs/prefs_tiny.yaml", args)


def test_build_end_to_end(tmp_path):
    config = make_config(tmp_path)
    manifest = build_preferences(config, progress=False)
    root = Path(config.out)
    records = [json.loads(line) for line in (root / "prefs.jsonl").read_text().splitlines()]
    assert manifest["pairs"] == len(records) > 0
    assert set(manifest["pairs_per_strategy"]) == {"multi_sample", "perturbed", "temporal"}
    assert manifest["captions"] == {"unique": 6, "duplicates_dropped": 2}
    assert manifest["sample_rate"] == 8000 and manifest["media"] == "audio"
    assert manifest["generator"]["kind"] == "fake-tones" and manifest["scorer"]["kind"] == "fake-tone-scorer"
    # "A clock ticks" has one event and no relation: the temporal strategy reports it
    assert any(n["strategy"] == "temporal" and "A clock ticks" in n["reason"] for n in manifest["nothing_to_perturb"])
    scorer = FakeScorer()
    for r in records:
        assert r["strategy"] in ("multi_sample", "perturbed", "temporal")
        chosen, sr = sf.read(root / r["chosen"], dtype="float32")
        rejected, _ = sf.read(root / r["rejected"], dtype="float32")
        # every score is against the ORIGINAL caption and reproducible from the written file
        s = scorer.score([r["prompt"]] * 2, [chosen, rejected], sr)
        assert s[0] == pytest.approx(r["meta"]["chosen_score"], rel=1e-6)
        assert s[1] == pytest.approx(r["meta"]["rejected_score"], rel=1e-6)
        assert r["meta"]["gap"] >= getattr(config, r["strategy"]).min_gap
        if r["strategy"] == "temporal":
            assert r["meta"]["perturbation"]["kind"] == "swap_order"
            assert r["meta"]["rejected_prompt"] != r["prompt"]
        if r["strategy"] == "multi_sample":
            assert r["meta"]["rejected_prompt"] == r["meta"]["chosen_prompt"] == r["prompt"]
    report = check_preference_set(root)
    assert report.ok, report.problems
    assert report.records == len(records)


def test_loads_with_datasets(tmp_path):
    import datasets

    config = make_config(tmp_path)
    build_preferences(config, progress=False)
    ds = datasets.load_dataset("json", data_files=str(Path(config.out) / "prefs.jsonl"), split="train")
    assert set(["id", "prompt", "chosen", "rejected", "strategy", "label"]) <= set(ds.column_names)
    assert ds.num_rows == json.loads((Path(config.out) / "manifest.json").read_text())["pairs"]


def test_rerun_is_idempotent_and_a_changed_config_is_refused(tmp_path):
    config = make_config(tmp_path)
    build_preferences(config, progress=False)
    before = (Path(config.out) / "prefs.jsonl").read_bytes()
    gen = FakeGenerator()
    build_preferences(config, generator=gen, scorer=FakeScorer(), progress=False)
    assert gen.calls == 0  # every shard was done: nothing regenerated
    assert (Path(config.out) / "prefs.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="different config"):
        build_preferences(make_config(tmp_path, seed=5), progress=False)


def test_generator_or_scorer_outside_the_protocol_is_refused(tmp_path):
    with pytest.raises(TypeError, match="generator: object does not follow the Generator protocol"):
        build_preferences(make_config(tmp_path), generator=object(), scorer=FakeScorer(), progress=False)
    with pytest.raises(TypeError, match="scorer: FakeGenerator does not follow the Scorer protocol"):
        build_preferences(make_config(tmp_path), generator=FakeGenerator(), scorer=FakeGenerator(), progress=False)


def test_failing_and_silent_captions_are_reported_not_fatal(tmp_path):
    config = make_config(tmp_path)
    gen = FakeGenerator(fail_on="Rain falls", silent_on="siren")
    manifest = build_preferences(config, generator=gen, scorer=FakeScorer(), progress=False)
    reasons = {f["reason"].split(":")[0] for f in manifest["failures"]}
    assert "generation failed" in reasons and "silent audio" in reasons
    failed = {f["caption_id"] for f in manifest["failures"] if f["sample"] is None}
    assert caption_id("Rain falls while a bell rings") in failed
    prompts = {json.loads(line)["prompt"] for line in (Path(config.out) / "prefs.jsonl").read_text().splitlines()}
    assert "Rain falls while a bell rings" not in prompts and "Birds chirp, then a car passes by" in prompts
    assert check_preference_set(config.out).ok


def _build_cmd(tmp_path, out):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    return [sys.executable, "-m", "diffdpo", "prefs", "build", "--no-progress", "--config",
            str(ROOT / "recipes/configs/prefs_tiny.yaml"), f"captions={captions}", f"out={out}", "shard_size=1",
            "generator.kind=helpers.fake_media:make_slow_generator", "scorer.kind=helpers.fake_media:make_scorer"]


def test_killed_build_resumes_to_the_same_set(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "HF_HUB_OFFLINE": "1", "FAKE_SLOW_SECONDS": "0.4"}
    reference = tmp_path / "uninterrupted"
    subprocess.run(_build_cmd(tmp_path, reference), env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_build_cmd(tmp_path, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((killed / "shards").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((killed / "shards").glob("*.json"))
    assert 2 <= len(done) < 6, "the kill should land mid-build"
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    assert not (killed / "prefs.jsonl").exists()
    subprocess.run(_build_cmd(tmp_path, killed), env=env, check=True, capture_output=True)
    assert {p.name: p.stat().st_mtime_ns for p in done} == stamps  # finished shards were not redone
    assert (killed / "prefs.jsonl").read_bytes() == (reference / "prefs.jsonl").read_bytes()
    for line in (reference / "prefs.jsonl").read_text().splitlines():
        r = json.loads(line)
        for side in ("chosen", "rejected"):
            assert (killed / r[side]).read_bytes() == (reference / r[side]).read_bytes()
    assert check_preference_set(killed).ok


# ------------------------------------------------------------------ prefs check on broken sets


@pytest.fixture()
def good_set(tmp_path):
    config = make_config(tmp_path)
    build_preferences(config, progress=False)
    return Path(config.out)


def _rewrite(root, edit):
    lines = [json.loads(line) for line in (root / "prefs.jsonl").read_text().splitlines()]
    edit(lines)
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.mark.parametrize("breakage, expected", [
    (lambda root: os.remove(root / json.loads((root / "prefs.jsonl").read_text().splitlines()[0])["chosen"]),
     "missing file"),
    (lambda root: _rewrite(root, lambda ls: ls[0].update(chosen="../outside.wav")), "escapes the dataset root"),
    (lambda root: (root / "prefs.jsonl").write_text((root / "prefs.jsonl").read_text() + "{not json\n"),
     "invalid JSON"),
    (lambda root: _rewrite(root, lambda ls: ls[1].update(id=ls[0]["id"])), "appears 2 times"),
    (lambda root: _rewrite(root, lambda ls: ls[0].update(prompt="")), "empty prompt"),
    (lambda root: _rewrite(root, lambda ls: ls[0].update(rejected=ls[0]["chosen"])), "same file"),
    (lambda root: sf.write(root / json.loads((root / "prefs.jsonl").read_text().splitlines()[0])["chosen"],
                           np.ones(100, dtype=np.float32) * 0.1, 16000), "sample rate 16000"),
    (lambda root: sf.write(root / json.loads((root / "prefs.jsonl").read_text().splitlines()[0])["chosen"],
                           np.zeros(100, dtype=np.float32), 8000), "silent audio"),
    (lambda root: sf.write(root / json.loads((root / "prefs.jsonl").read_text().splitlines()[0])["chosen"],
                           np.full(100, np.nan, dtype=np.float32), 8000, subtype="FLOAT"), "NaN"),
    (lambda root: (root / json.loads((root / "prefs.jsonl").read_text().splitlines()[0])["chosen"]).write_bytes(b"RIFF"),
     "unreadable audio"),
    (lambda root: _rewrite(root, lambda ls: ls.pop()), "manifest.json says"),
    (lambda root: os.remove(root / "manifest.json"), "manifest.json: missing"),
])
def test_check_catches_each_kind_of_breakage(good_set, breakage, expected):
    assert check_preference_set(good_set).ok
    breakage(good_set)
    report = check_preference_set(good_set)
    assert not report.ok and any(expected in p for p in report.problems), report.problems


def test_check_cli_exit_codes(good_set):
    ok = subprocess.run([sys.executable, "-m", "diffdpo", "prefs", "check", str(good_set)], capture_output=True, text=True)
    assert ok.returncode == 0 and "problems" in ok.stdout
    os.remove(good_set / "manifest.json")
    bad = subprocess.run([sys.executable, "-m", "diffdpo", "prefs", "check", str(good_set)], capture_output=True, text=True)
    assert bad.returncode == 1 and "manifest.json: missing" in bad.stdout


@pytest.mark.parametrize("layout", ["model_layout", "tango_checkpoint"])
def test_build_through_the_real_tango_layout_generator_and_clap_adapter(tmp_path, layout):
    """The built-in adapters: a tiny Tango-layout model (the trainer's loader) — in the toolkit's
    layout, and a checkpoint in Tango's own published layout read as it is — and a CLAP backend
    (here the SoundWorld CLAP class, untrained) named through ``clap:<backend>``."""
    from diffdpo.diffusion import tiny
    from diffdpo.prefs.backends import ClapScorer, TangoLayoutGenerator

    if layout == "model_layout":
        model = tiny.build_tiny("tango", tmp_path / "tiny_tango")
    else:
        t5 = tiny.text_encoder_folder(tmp_path / "flan-t5")
        model = tiny.tango_checkpoint(tmp_path / "tango2", text_encoder_name=str(t5))
    config = make_config(tmp_path, **{"generator.kind": "tango", "generator.path": model,
                                      "generator.num_inference_steps": 2, "limit": 2,
                                      "scorer.kind": "clap:helpers.fake_media:untrained_soundworld_clap",
                                      "multi_sample.min_gap": 0.0, "perturbed.min_gap": 0.0})
    manifest = build_preferences(config, progress=False)
    assert manifest["generator"]["kind"] == "tango-layout" and manifest["scorer"]["kind"] == "clap"
    assert manifest["pairs"] >= 2 and check_preference_set(config.out).ok
    # the adapter's samples depend only on (prompt, seed), not on the batch around them
    gen = TangoLayoutGenerator(str(model), 2, 3.0, batch_size=4)
    a = gen.generate(["a dog barks", "rain falls", "a bell rings"], [1, 2, 3])
    b = gen.generate(["rain falls"], [2])
    np.testing.assert_allclose(a[1], b[0], atol=1e-4)  # batched convolutions differ in the last bits
    scorer = ClapScorer("helpers.fake_media:untrained_soundworld_clap")
    assert scorer.score(["a dog barks"], [a[0]], gen.sample_rate).shape == (1,)
