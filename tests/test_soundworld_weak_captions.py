"""diffdpo.worlds.soundworld.weak_captions: each corruption does what it says, rates are met within
binomial error, draws are seeded and per clip, rates of 0 give the clean captions exactly, bad
rates are refused; the counting code behind the default rates; and the pretraining recipe's clap
and generator stages train on exactly the weak captions (clean ones by default)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from diffdpo.worlds.soundworld.dataset import split_scenes
from diffdpo.worlds.soundworld.events import EVENTS
from diffdpo.worlds.soundworld.scenes import (OVERLAP, OVERLAP_MARKERS, SEQUENCE, SINGLE, _spans, make_clip,
                                             parse_caption, recast_caption)
from diffdpo.worlds.soundworld.weak_captions import (CATEGORY, GENERIC, WeakCaptionConfig, caption_statistics,
                                                     read_caption_clips, truncated_binomial_rate, vague_phrases,
                                                     weak_caption, weaken_captions)

ROOT = Path(__file__).resolve().parents[1]
ORDER_WORDS = re.compile(r"\b(followed|then|first|before|after)\b", re.I)
N_SCENES = 3000


@pytest.fixture(scope="module")
def scenes():
    return split_scenes(0, "train", N_SCENES)


def only(**rates) -> WeakCaptionConfig:
    return WeakCaptionConfig(**rates)


def within(observed: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """``observed`` successes of ``n`` trials are within ``sigmas`` binomial SDs of ``n p``."""
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


# ---------------------------------------------------------------- config
def test_default_config_is_clean_and_rates_of_zero_give_the_exact_captions(scenes):
    cfg = WeakCaptionConfig()
    assert not cfg.enabled and all(getattr(cfg, r) == 0.0 for r in
                                   ("omit_rate", "order_drop_rate", "vague_rate", "swap_rate"))
    weak, counts = weaken_captions(scenes, cfg, key=(0, 0))
    assert [w.text for w in weak] == [s.caption for s in scenes]
    assert counts.changed == counts.swapped == counts.omitted == counts.order_dropped == counts.vague == 0
    assert counts.captions == N_SCENES and counts.omit_eligible > 0 and counts.order_eligible > 0
    # a single caption given as text, too
    assert weak_caption(scenes[0].caption, np.random.default_rng(0), cfg).text == scenes[0].caption


@pytest.mark.parametrize("name", ["omit_rate", "order_drop_rate", "vague_rate", "swap_rate"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf"), "0.3", True, None])
def test_invalid_rates_raise_a_clear_error(name, value):
    with pytest.raises(ValueError, match=rf"weak_captions\.{name} must be a probability in \[0, 1\]"):
        WeakCaptionConfig(**{name: value})


def test_invalid_seed_and_the_recipe_config_name_the_key():
    with pytest.raises(ValueError, match="weak_captions.seed must be a non-negative integer"):
        WeakCaptionConfig(seed=-1)
    sys.path.insert(0, str(ROOT / "recipes"))
    import soundworld_pretrain

    from diffdpo.config import load_config

    with pytest.raises(ValueError, match=r"weak_captions\.order_drop_rate must be a probability"):
        load_config(soundworld_pretrain.PretrainConfig, str(ROOT / "recipes/configs/soundworld_pretrain.yaml"),
                    ["weak_captions.order_drop_rate=2"])
    clean = load_config(soundworld_pretrain.PretrainConfig, str(ROOT / "recipes/configs/soundworld_pretrain.yaml"), [])
    weak = load_config(soundworld_pretrain.PretrainConfig,
                       str(ROOT / "recipes/configs/soundworld_pretrain_weak.yaml"), [])
    assert not clean.weak_captions.enabled and weak.weak_captions.enabled
    assert weak.output_dir != clean.output_dir and "soundworld/weights" not in weak.output_dir
    for section in ("data", "oracle", "clap", "arch", "vae", "generator", "decoder", "evaluate"):
        assert getattr(weak, section) == getattr(clean, section), section


# ---------------------------------------------------------------- each corruption
def test_omitted_events_are_absent_from_the_caption_but_present_in_the_timeline(scenes):
    weak, counts = weaken_captions(scenes, only(omit_rate=1.0), key=(0, 0))
    multi = 0
    for scene, w in zip(scenes, weak):
        if len(scene.events) < 2:
            assert w.text == scene.caption and not w.omitted
            continue
        multi += 1
        # every event but the anchor goes: exactly one is left, never none
        assert len(w.omitted) == len(scene.events) - 1
        kind, named = parse_caption(w.text)
        assert kind == SINGLE and len(named) == 1 and named[0] in scene.events
        assert not set(named) & set(w.omitted)
        assert {t.event for t in scene.timeline} == set(scene.events)  # the audio's truth is untouched
    assert counts.omitted == counts.omit_eligible == sum(len(s.events) - 1 for s in scenes if len(s.events) > 1)
    assert multi > 1000
    # rendered audio keeps all events: the timeline the oracle trains on is the scene's
    scene, _ = make_clip([0, 0, 0])
    w = weak_caption(scene, np.random.default_rng(1), only(omit_rate=1.0))
    assert {t.event for t in scene.timeline} == set(scene.events)
    assert all(e not in [sp[2] for sp in _spans(w.text)] for e in w.omitted)


def test_anchor_is_uniform_and_a_partial_rate_keeps_the_rest(scenes):
    weak, _ = weaken_captions(scenes, only(omit_rate=0.5), key=(0, 0))
    three = [(s, w) for s, w in zip(scenes, weak) if len(s.events) == 3]
    kept_counts = [len(s.events) - len(w.omitted) for s, w in three]
    assert min(kept_counts) >= 1 and max(kept_counts) == 3
    for s, w in three:  # a shortened sequence still names what is left in temporal order
        kept = tuple(e for e in s.events if e not in w.omitted)
        assert parse_caption(w.text) == ((SEQUENCE if len(kept) > 1 else SINGLE), kept)
    # which event survives under omit_rate=1 is uniform over positions
    survivors = [s.events.index(w.named[0]) for s, w in
                 zip(scenes, weaken_captions(scenes, only(omit_rate=1.0), key=(0, 0))[0]) if len(s.events) == 2]
    assert within(sum(i == 0 for i in survivors), len(survivors), 0.5)


def test_order_words_are_dropped_and_the_order_is_not_kept_in_word_position(scenes):
    weak, counts = weaken_captions(scenes, only(order_drop_rate=1.0), key=(0, 0))
    first_named_is_first = []
    for scene, w in zip(scenes, weak):
        if scene.kind == SEQUENCE:
            assert w.order_dropped and not ORDER_WORDS.search(w.text) and " and " in w.text, w.text
            assert sorted(w.named) == sorted(scene.events) and not w.states_order and w.order_negative() == ""
            first_named_is_first.append(w.named[0] == scene.events[0])
        else:  # singles and overlaps ("while", "in the background", "over") state no order: untouched
            assert w.text == scene.caption and not w.order_dropped
    assert counts.order_dropped == counts.order_eligible == len(first_named_is_first)
    assert within(sum(first_named_is_first), len(first_named_is_first), 0.5)


def test_vague_phrases_replace_one_named_event(scenes):
    weak, counts = weaken_captions(scenes, only(vague_rate=1.0), key=(0, 0))
    for scene, w in zip(scenes, weak):
        (event,) = w.vague
        assert event in scene.events
        assert sorted(w.named + w.vague) == sorted(scene.events)  # one mention replaced, the rest kept
        assert any(p in w.text.lower() for p in (*GENERIC["S"], *GENERIC["N"], *CATEGORY[event]["S"],
                                                 *CATEGORY[event]["N"]))
        if w.named:
            kind, named = parse_caption(w.text)
            assert named == w.named
        else:  # the only event was made vague: the caption names no SoundWorld event
            with pytest.raises(ValueError, match="names no SoundWorld event"):
                parse_caption(w.text)
        assert w.text[:1].isupper()
    assert counts.vague == counts.vague_eligible == N_SCENES


def test_vague_phrases_name_no_event_and_no_relation():
    for event in EVENTS:
        for form in ("S", "N"):
            for phrase in vague_phrases(event, form):
                assert _spans(phrase) == [] and _spans(f"{phrase} while rain falls")[0][2] == "rain"
                assert not any(m in f" {phrase} " for m in OVERLAP_MARKERS)


def test_swapped_captions_belong_to_another_scene(scenes):
    weak, counts = weaken_captions(scenes, only(swap_rate=1.0), key=(0, 0))
    for scene, w in zip(scenes, weak):
        assert w.swapped and w.text != scene.caption
        assert (w.described.kind, w.described.events) != (scene.kind, scene.events)
        assert parse_caption(w.text) == (w.described.kind, w.described.events)  # another scene's own caption
        assert not w.states_order
    assert counts.swapped == N_SCENES
    # the swapped-in scenes follow the world's mix: every relation appears
    assert {w.described.kind for w in weak} == {SINGLE, SEQUENCE, OVERLAP}


def test_clean_sequences_keep_their_reversed_caption_negative(scenes):
    weak, _ = weaken_captions(scenes[:300], WeakCaptionConfig(), key=(0, 0))
    for scene, w in zip(scenes, weak):
        expected = recast_caption(scene.caption, scene.events[::-1]) if scene.kind == SEQUENCE else ""
        assert w.order_negative() == expected and w.states_order == (scene.kind == SEQUENCE)


# ---------------------------------------------------------------- rates, seeds
@pytest.mark.parametrize("cfg", [
    WeakCaptionConfig(omit_rate=0.24, order_drop_rate=0.4, vague_rate=0.07, swap_rate=0.02),
    WeakCaptionConfig(omit_rate=0.6, order_drop_rate=0.15, vague_rate=0.5, swap_rate=0.3, seed=7)])
def test_rates_are_met_within_binomial_error(scenes, cfg):
    weak, counts = weaken_captions(scenes, cfg, key=(0, 0))
    assert within(counts.swapped, counts.captions, cfg.swap_rate)
    assert within(counts.omitted, counts.omit_eligible, cfg.omit_rate)
    assert within(counts.order_dropped, counts.order_eligible, cfg.order_drop_rate)
    assert within(counts.vague, counts.vague_eligible, cfg.vague_rate)
    # the counters agree with the texts themselves
    assert counts.swapped == sum(w.swapped for w in weak)
    assert counts.order_dropped == sum(w.order_dropped and not ORDER_WORDS.search(w.text) for w in weak)
    assert counts.changed == sum(w.text != s.caption for w, s in zip(weak, scenes))
    # every unswapped caption names an event after the omission (the anchor); swapped ones are left as written
    assert counts.vague_eligible == counts.captions - counts.swapped
    assert all(w.text == w.described.caption for w in weak if w.swapped)


def test_seeded_determinism_and_per_clip_draws(scenes):
    cfg = WeakCaptionConfig(omit_rate=0.3, order_drop_rate=0.5, vague_rate=0.3, swap_rate=0.2, seed=3)
    a, _ = weaken_captions(scenes[:500], cfg, key=(0, 0))
    b, _ = weaken_captions(scenes[:500], cfg, key=(0, 0))
    assert [w.text for w in a] == [w.text for w in b]
    # a clip's weak caption does not depend on how many clips are weakened with it
    first, _ = weaken_captions(scenes[:120], cfg, key=(0, 0))
    assert [w.text for w in first] == [w.text for w in a[:120]]
    # and a later slice gets the captions of those clip indices
    tail, _ = weaken_captions(scenes[200:260], cfg, key=(0, 0), start=200)
    assert [w.text for w in tail] == [w.text for w in a[200:260]]
    other_seed, _ = weaken_captions(scenes[:500], WeakCaptionConfig(**{**cfg.__dict__, "seed": 4}), key=(0, 0))
    other_key, _ = weaken_captions(scenes[:500], cfg, key=(1, 0))
    assert [w.text for w in other_seed] != [w.text for w in a] != [w.text for w in other_key]


def test_one_rate_does_not_move_another_corruptions_draws(scenes):
    base, _ = weaken_captions(scenes[:800], WeakCaptionConfig(swap_rate=0.3), key=(0, 0))
    more, _ = weaken_captions(scenes[:800], WeakCaptionConfig(swap_rate=0.3, vague_rate=0.9), key=(0, 0))
    assert [w.swapped for w in base] == [w.swapped for w in more]
    assert [w.described for w in base] == [w.described for w in more]


# ---------------------------------------------------------------- counting code behind the defaults
def test_truncated_binomial_rate_recovers_p():
    rng = np.random.default_rng(0)
    for p in (0.3, 0.7):
        k = rng.binomial(5, p, size=20000)
        assert truncated_binomial_rate(list(k), [5] * len(k), 1) == pytest.approx(p, abs=0.015)
        assert truncated_binomial_rate(list(k), [5] * len(k), 2) == pytest.approx(p, abs=0.02)
    assert truncated_binomial_rate([0, 0], [5, 5]) is None


def test_caption_statistics_on_hand_counted_clips(tmp_path):
    clips = [["A dog barks, then a bell rings", "A dog barks and a bell rings", "Something rattles",
              "A dog barking", "Rain falls"],
             ["Rain falls while an engine hums", "rain", "An engine idles", "Raining", "A noise"]]
    stats = caption_statistics(clips)
    assert stats["captions"] == 10 and stats["clips"] == 2
    assert stats["order"]["share_of_captions"] == pytest.approx(1 / 10)
    assert stats["vague"]["share_of_captions"] == pytest.approx(2 / 10)  # "something", "a noise"
    per = stats["omission"]["per_class"]
    assert per["dog"]["clips_with_mention"] == 1 and per["rain"]["clips_with_mention"] == 2
    # AudioCaps-style rows (one caption a row) and Clotho-style rows (five columns) read the same
    (tmp_path / "ac.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,a,0,x one\n2,a,0,x two\n3,b,5,y\n")
    assert read_caption_clips(tmp_path / "ac.csv") == [["x one", "x two"], ["y"]]
    (tmp_path / "clotho.csv").write_text("file_name,caption_1,caption_2\nf.wav,p,q\n")
    assert read_caption_clips(tmp_path / "clotho.csv") == [["p", "q"]]
    (tmp_path / "bad.csv").write_text("name,text\nx,y\n")
    with pytest.raises(ValueError, match="bad.csv: expected Clotho columns"):
        read_caption_clips(tmp_path / "bad.csv")


# ---------------------------------------------------------------- the recipe feeds them to training
@pytest.fixture(scope="module")
def recipe():
    sys.path.insert(0, str(ROOT / "recipes"))
    import soundworld_pretrain

    return soundworld_pretrain


N_CLIPS = 240
TINY = ["stages=[clap,generator]", "threads=1", f"data.clap_clips={N_CLIPS}", f"data.generator_clips={N_CLIPS - 40}",
        "data.validation_clips=4", "clap.steps=1", "clap.batch_size=8", "vae.steps=1", "vae.batch_size=4",
        "generator.steps=1", "generator.batch_size=4", "generator.snapshot_every=0"]
RATES = {"omit_rate": 0.5, "order_drop_rate": 0.5, "vague_rate": 0.4, "swap_rate": 0.25}


def _run_and_capture(recipe, monkeypatch, out: Path, *overrides: str) -> tuple[dict, dict]:
    import diffdpo.worlds.soundworld.clap as clap_module
    import diffdpo.worlds.soundworld.train as train_module

    fed: dict = {}
    real_clap, real_gen = clap_module.train_clap, train_module.train_generator

    def spy_clap(model, scenes, audio, cfg, seed=0, log=None, captions=None, order_negatives=None):
        fed["clap"] = (list(scenes), captions, order_negatives)
        return real_clap(model, scenes, audio, cfg, seed=seed, log=log, captions=captions,
                         order_negatives=order_negatives)

    def spy_gen(unet, text_encoder, tokenizer, scheduler, latents, captions, cfg, **kw):
        fed["generator"] = list(captions)
        return real_gen(unet, text_encoder, tokenizer, scheduler, latents, captions, cfg, **kw)

    monkeypatch.setattr(clap_module, "train_clap", spy_clap)
    monkeypatch.setattr(train_module, "train_generator", spy_gen)
    recipe.main(["--config", str(ROOT / "recipes/configs/soundworld_pretrain.yaml"), *TINY, f"output_dir={out}",
                 f"work_dir={out.parent / (out.name + '_work')}", *overrides])
    return fed, json.loads((out / "MANIFEST.json").read_text())


def test_recipe_clean_default_feeds_the_exact_captions(recipe, monkeypatch, tmp_path):
    fed, manifest = _run_and_capture(recipe, monkeypatch, tmp_path / "clean")
    scenes, captions, negatives = fed["clap"]
    assert captions is None and negatives is None  # train_clap's own default path: the scenes' captions
    assert fed["generator"] == [s.caption for s in scenes[:N_CLIPS - 40]]
    for stage in ("clap", "generator"):
        entry = manifest[stage]
        assert entry["config"]["weak_captions"] == {"omit_rate": 0.0, "order_drop_rate": 0.0, "vague_rate": 0.0,
                                                    "swap_rate": 0.0, "seed": 0}
        assert entry["metrics"]["weak_captions"]["enabled"] is False
        assert entry["metrics"]["weak_captions"]["counts"]["changed"] == 0


def test_recipe_stages_train_on_the_weak_captions_at_the_configured_rates(recipe, monkeypatch, tmp_path):
    overrides = [f"weak_captions.{k}={v}" for k, v in RATES.items()]
    fed, manifest = _run_and_capture(recipe, monkeypatch, tmp_path / "weak", *overrides)
    scenes, captions, negatives = fed["clap"]
    cfg = WeakCaptionConfig(**RATES)
    expected, counts = weaken_captions(scenes, cfg, key=(0, 0))  # data.seed 0, train split
    assert captions == [w.text for w in expected]
    assert negatives == [w.order_negative() for w in expected]
    # both stages learn from the same weak caption for every clip they share
    assert fed["generator"] == captions[:N_CLIPS - 40]
    # the captions fed were corrupted, at the configured rates (within binomial error)
    assert sum(c != s.caption for c, s in zip(captions, scenes)) == counts.changed > N_CLIPS // 3
    assert within(counts.swapped, counts.captions, cfg.swap_rate)
    assert within(counts.omitted, counts.omit_eligible, cfg.omit_rate)
    assert within(counts.order_dropped, counts.order_eligible, cfg.order_drop_rate)
    assert within(counts.vague, counts.vague_eligible, cfg.vague_rate)
    swapped = [c for c, s, w in zip(captions, scenes, expected) if w.swapped]
    assert swapped and all(parse_caption(c) != (s.kind, s.events) for c, s in
                           zip(swapped, [s for s, w in zip(scenes, expected) if w.swapped]))
    # the manifest records the settings and the counters of what was fed
    clap_entry, gen_entry = manifest["clap"], manifest["generator"]
    assert clap_entry["config"]["weak_captions"] == {**RATES, "seed": 0}
    assert clap_entry["metrics"]["weak_captions"]["counts"] == counts.as_dict()
    gen_counts = weaken_captions(scenes[:N_CLIPS - 40], cfg, key=(0, 0))[1]
    assert gen_entry["metrics"]["weak_captions"]["counts"] == gen_counts.as_dict()
    assert gen_entry["metrics"]["weak_captions"]["captions_with_unknown_words"] == 0
    assert gen_entry["config"]["weak_captions"] == {**RATES, "seed": 0}
