"""SoundWorld synthesis: determinism, timelines that match the audio, captions that match timelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from diffdpo.worlds.soundworld import (CLIP_SECONDS, EVENT_NAMES, OVERLAP, SAMPLE_RATE, SEQUENCE, SINGLE,
                                       compose_caption, make_clip, parse_caption, scene_from_caption)
from diffdpo.worlds.soundworld.dataset import clip_seed, clips, read_split, scene_of, split_scenes, write_split
from diffdpo.worlds.soundworld.events import synthesize

SEEDS = [[7, 0, i] for i in range(60)]


def test_at_least_eight_events():
    assert len(EVENT_NAMES) >= 8


def test_same_seed_same_clip_and_different_seeds_differ():
    s1, a1 = make_clip([3, 1, 4])
    s2, a2 = make_clip([3, 1, 4])
    _, a3 = make_clip([3, 1, 5])
    assert s1 == s2
    np.testing.assert_array_equal(a1, a2)
    assert a1.dtype == np.float32 and a1.shape == (int(CLIP_SECONDS * SAMPLE_RATE),)
    assert not np.allclose(a1, a3)


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_event_parameters_vary_between_seeds(name):
    a = synthesize(name, 8000, np.random.default_rng(1))
    b = synthesize(name, 8000, np.random.default_rng(2))
    assert np.isfinite(a).all() and abs(np.sqrt(np.mean(a**2)) - 1) < 0.1
    assert not np.allclose(a, b)


def test_energy_lies_where_the_timeline_says():
    """Inside every event's segment the power is far above the uncovered gaps (noise floor only)."""
    checked = 0
    for seed in SEEDS:
        scene, audio = make_clip(seed)
        covered = np.zeros(len(audio), dtype=bool)
        for e in scene.timeline:
            covered[int(round(e.start * SAMPLE_RATE)):int(round(e.end * SAMPLE_RATE))] = True
        if (~covered).sum() < 400:
            continue
        floor = np.mean(audio[~covered].astype(np.float64) ** 2)
        for e in scene.timeline:
            seg = audio[int(round(e.start * SAMPLE_RATE)):int(round(e.end * SAMPLE_RATE))]
            assert np.mean(seg.astype(np.float64) ** 2) > 100 * floor, (seed, e)
        checked += 1
    assert checked > 20


def test_caption_agrees_with_timeline():
    kinds = set()
    for seed in SEEDS:
        scene, _ = make_clip(seed)
        kinds.add((scene.kind, len(scene.events)))
        assert parse_caption(scene.caption) == (scene.kind, scene.events)
        assert [e.event for e in scene.timeline] == list(scene.events)
        assert len(set(scene.events)) == len(scene.events)
        for e in scene.timeline:
            assert 0.0 <= e.start < e.end <= CLIP_SECONDS
        if scene.kind == SEQUENCE:
            for a, b in zip(scene.timeline, scene.timeline[1:]):
                assert a.end < b.start, scene  # strictly ordered, with a gap
            assert scene.order == scene.events
        if scene.kind == OVERLAP:
            fg, bg = scene.timeline
            assert (bg.start, bg.end) == (0.0, CLIP_SECONDS) and fg.end - fg.start >= 1.0
            assert scene.order is None
    assert kinds == {(SINGLE, 1), (SEQUENCE, 2), (SEQUENCE, 3), (OVERLAP, 2)}


def test_every_template_parses_back():
    rng = np.random.default_rng(0)
    for kind, n in [(SINGLE, 1), (SEQUENCE, 2), (SEQUENCE, 3), (OVERLAP, 2)]:
        for _ in range(40):
            events = tuple(EVENT_NAMES[i] for i in rng.permutation(len(EVENT_NAMES))[:n])
            caption = compose_caption(kind, events, rng)
            assert parse_caption(caption) == (kind, events), caption
    assert parse_caption("A bell rings, then a dog barks.") == (SEQUENCE, ("bell", "dog"))
    assert parse_caption("A dog barks, then a bell rings") == (SEQUENCE, ("dog", "bell"))
    assert scene_from_caption("Rain falls while an engine hums").events == ("rain", "engine")


def test_bad_captions_and_events_are_named():
    with pytest.raises(ValueError, match="names no SoundWorld event"):
        parse_caption("A cat meows")
    with pytest.raises(ValueError, match="twice"):
        parse_caption("A dog barks, then a dog barks")
    with pytest.raises(KeyError, match="cat"):
        compose_caption(SINGLE, ("cat",), np.random.default_rng(0))
    with pytest.raises(ValueError, match="no caption template"):
        compose_caption(OVERLAP, ("dog",), np.random.default_rng(0))


def test_make_data_cli_writes_splits_that_regenerate(tmp_path):
    from diffdpo.cli import main

    assert main(["soundworld", "make-data", "--out", str(tmp_path), "--train", "4", "--validation", "2",
                 "--test", "2", "--seed", "5"]) == 0
    recs = read_split(tmp_path / "train.jsonl")
    assert [r["id"] for r in recs] == [f"train-{i:06d}" for i in range(4)]
    assert len(read_split(tmp_path / "test.jsonl")) == 2
    for i, rec in enumerate(recs):
        audio, sr = sf.read(tmp_path / rec["path"], dtype="float32")
        scene, expected = make_clip(clip_seed(5, "train", i))
        assert sr == SAMPLE_RATE and rec["seed"] == [5, 0, i]
        np.testing.assert_array_equal(audio, expected)
        assert scene_of(rec).caption == scene.caption and scene_of(rec).events == scene.events
    # splits never share a clip
    test_captions = {json.loads(l)["caption"] for l in (tmp_path / "test.jsonl").read_text().splitlines()}
    _, a_test = make_clip(clip_seed(5, "test", 0))
    _, a_train = make_clip(clip_seed(5, "train", 0))
    assert not np.allclose(a_test, a_train) and test_captions


def test_read_split_names_the_bad_record(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a", "caption": "c"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1 \(id a\).*missing"):
        read_split(p)
    with pytest.raises(ValueError, match="unknown split"):
        write_split(tmp_path, "dev", 1, 0)


def test_split_scenes_are_the_rendered_clips_scenes_filtered_by_kind():
    rendered, _ = clips(3, "train", 40)
    assert split_scenes(3, "train", 40) == rendered
    multi = split_scenes(3, "train", 12, [SEQUENCE, OVERLAP])
    expected = [s for s in rendered if s.kind != SINGLE][:12]
    assert len(expected) == 12 and multi == expected
    with pytest.raises(ValueError, match=r"unknown scene kind\(s\) \['pair'\]"):
        split_scenes(3, "train", 2, ["pair"])


def test_recast_caption_swaps_events_and_keeps_the_template():
    from diffdpo.worlds.soundworld.scenes import recast_caption

    assert recast_caption("A dog barks, then a bell rings", ("bell", "dog")) == "A bell rings, then a dog barks"
    assert recast_caption("Rain falls as an engine hums in the background", ("engine", "rain")) == \
        "An engine hums as rain falls in the background"
    rng = np.random.default_rng(1)
    for seed in SEEDS[:30]:
        scene, _ = make_clip(seed)
        swapped = recast_caption(scene.caption, scene.events[::-1])
        assert parse_caption(swapped) == (scene.kind, scene.events[::-1])
        other = tuple(rng.permutation([e for e in EVENT_NAMES if e not in scene.events])[:len(scene.events)])
        assert parse_caption(recast_caption(scene.caption, other)) == (scene.kind, other)
    with pytest.raises(ValueError, match="names 2 event"):
        recast_caption("A dog barks, then a bell rings", ("dog",))
