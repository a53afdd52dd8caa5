"""Weakly labelled captions for SoundWorld's pretraining pairs.

SoundWorld's clean captions name every audible event and, for sequences, their exact order. Real
text-to-audio bases learn from weaker captions (AudioCaps, Clotho, WavCaps): captions leave out
audible events, rarely state the order, use vague or generic words, and some describe another
clip. This module corrupts the *caption* of a training pair in those four ways; the audio and the
scene's true timeline are untouched (the oracle, the judge, keeps learning from the truth).

Four corruptions, one rate each (all 0 = the clean caption, exactly; the default everywhere):

``swap_rate`` (per caption)
    The caption is that of another clip: a scene drawn from the same world distribution whose
    relation or events differ from the true ones, its caption as written. The other three
    corruptions act on the captions that were not swapped (so a swapped caption never comes back
    to describe the true clip through an omission).
``omit_rate`` (per omittable event)
    In an unswapped caption of two or three events one event, the *anchor* (drawn uniformly), is always named;
    every other event is left out of the caption with this probability, so a caption never loses
    all its events. The caption is recomposed from the world's templates for the events that are
    left (a three-event sequence that loses one reads as a two-event sequence; an overlap that
    loses one reads as a single event).
``order_drop_rate`` (per unswapped caption of a sequence that still names two or more events)
    The order words go: "followed by", "then", "First ..., then" become "and", and the events are
    listed in a random order, so the caption carries no order information ("A bell rings and a dog
    barks"). Overlaps ("while", "in the background", "over") state no order and are left as they
    are.
``vague_rate`` (per unswapped caption, all of which name an event)
    One named event (drawn uniformly) is described generically: a fully generic phrase ("a noise",
    "something makes a sound") or a category-level one from the event's AudioSet-ontology parent
    ("an animal", "an alarm", "machinery").

Parseability: a weak caption is for training only. :func:`~diffdpo.worlds.soundworld.scenes.parse_caption`
finds the events a weak caption still names (generic phrases name none, so a caption whose only
event was made vague raises its "names no SoundWorld event" error), and it reads an order-dropped
"A and B" caption as a sequence in the order written, which after shuffling is not the true order.
Code that needs a clip's structure takes it from the :class:`~diffdpo.worlds.soundworld.scenes.Scene`,
never from its weak caption. :attr:`WeakCaption.states_order` says when a weak caption still
states its clip's true order (the CLAP's reversed-caption negatives are built only for those).

The default weak rates and where they come from are in docs/soundworld_weak_captions.md;
:func:`caption_statistics` is the counting code that measured the ones taken from public caption
sets (``python -m diffdpo.worlds.soundworld.weak_captions <caption csv files>``).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffdpo.worlds.soundworld.events import EVENTS
from diffdpo.worlds.soundworld.scenes import (SEQUENCE, SINGLE, Scene, _spans, compose_caption, recast_caption,
                                             sample_scene, scene_from_caption)

RATES = ("swap_rate", "omit_rate", "order_drop_rate", "vague_rate")


@dataclass
class WeakCaptionConfig:
    """Rates of the four caption corruptions (0 = off; all 0 = the clean captions)."""

    omit_rate: float = field(default=0.0, metadata={
        "help": "per event other than the always-named anchor of a 2-3 event scene: left out of the caption"})
    order_drop_rate: float = field(default=0.0, metadata={
        "help": "per sequence caption naming >= 2 events: order words replaced by 'and', events in random order"})
    vague_rate: float = field(default=0.0, metadata={
        "help": "per caption naming an event: one named event described generically ('a noise', 'an animal')"})
    swap_rate: float = field(default=0.0, metadata={
        "help": "per caption: replaced by the caption of another clip (a different scene of the same world)"})
    seed: int = field(default=0, metadata={
        "help": "corruption seed; a clip's weak caption depends only on it, the data seed, the split and "
                "the clip index"})

    def __post_init__(self):
        for name in RATES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 <= value <= 1.0:
                raise ValueError(f"weak_captions.{name} must be a probability in [0, 1], got {value!r}")
            setattr(self, name, float(value))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"weak_captions.seed must be a non-negative integer, got {self.seed!r}")

    @property
    def enabled(self) -> bool:
        """Whether any corruption can fire (False: every caption is the clean one)."""
        return any(getattr(self, name) > 0 for name in RATES)


# Generic descriptions, by grammatical slot: "S" = clause ("a dog barks"), "N" = noun phrase.
GENERIC: dict[str, tuple[str, ...]] = {
    "S": ("something makes a sound", "a noise is heard"),
    "N": ("a noise", "a sound", "some noise"),
}
# Category-level descriptions from each event's parent in the AudioSet ontology (Animal, Alarm,
# Mechanisms, Engine/Vehicle, Domestic sounds, Natural sounds), same slots.
CATEGORY: dict[str, dict[str, tuple[str, ...]]] = {
    "dog": {"S": ("an animal makes noise",), "N": ("an animal",)},
    "bird": {"S": ("an animal calls",), "N": ("animal sounds",)},
    "siren": {"S": ("an alarm goes off",), "N": ("an alarm",)},
    "bell": {"S": ("something rings",), "N": ("a ringing sound",)},
    "clock": {"S": ("a mechanism clicks",), "N": ("mechanical clicking",)},
    "engine": {"S": ("a machine runs",), "N": ("machinery",)},
    "knock": {"S": ("something thumps",), "N": ("thumping",)},
    "rain": {"S": ("a steady hiss fills the air",), "N": ("ambient noise",)},
}


def vague_phrases(event: str, form: str) -> tuple[str, ...]:
    """Generic and category-level phrases that may stand for ``event`` in slot ``form`` ("S"/"N")."""
    return GENERIC[form] + CATEGORY[event][form]


@dataclass(frozen=True)
class WeakCaption:
    """A weak caption and what was done to it.

    ``described`` is the structure the caption was made from: the clip's own scene, or another
    clip's when ``swapped``. ``omitted`` and ``vague`` name events of ``described``; ``named`` are
    the events the text still names specifically, in text order.
    """

    text: str
    clean: str
    described: Scene
    swapped: bool = False
    omitted: tuple[str, ...] = ()
    order_dropped: bool = False
    vague: tuple[str, ...] = ()
    named: tuple[str, ...] = ()

    @property
    def states_order(self) -> bool:
        """True when the text still states its own clip's true order of two or more named events."""
        return (not self.swapped and self.described.kind == SEQUENCE and not self.order_dropped
                and len(self.named) >= 2)

    def order_negative(self) -> str:
        """The text with its named events in reverse order where it :attr:`states_order`, else ""."""
        return recast_caption(self.text, self.named[::-1]) if self.states_order else ""


@dataclass
class WeakCaptionCounts:
    """Per-corruption counters: how many units were eligible and how many were corrupted."""

    captions: int = 0
    changed: int = 0
    swapped: int = 0
    omit_eligible: int = 0
    omitted: int = 0
    order_eligible: int = 0
    order_dropped: int = 0
    vague_eligible: int = 0
    vague: int = 0

    def add(self, weak: WeakCaption, eligible: dict[str, int]) -> None:
        self.captions += 1
        self.changed += weak.text != weak.clean
        self.swapped += weak.swapped
        self.omit_eligible += eligible["omit"]
        self.omitted += len(weak.omitted)
        self.order_eligible += eligible["order"]
        self.order_dropped += weak.order_dropped
        self.vague_eligible += eligible["vague"]
        self.vague += len(weak.vague)

    def rates(self) -> dict[str, float | None]:
        """Realised rate of each corruption over its eligible units (None where none were eligible)."""
        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        return {"swap_rate": ratio(self.swapped, self.captions), "omit_rate": ratio(self.omitted, self.omit_eligible),
                "order_drop_rate": ratio(self.order_dropped, self.order_eligible),
                "vague_rate": ratio(self.vague, self.vague_eligible), "changed": ratio(self.changed, self.captions)}

    def as_dict(self) -> dict:
        return {**asdict(self), "rates": self.rates()}


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:] if text else text


def _unordered_caption(events: tuple[str, ...], rng: np.random.Generator) -> str:
    """The events joined by "and" in a random order, all clauses or all noun phrases."""
    order = rng.permutation(len(events))
    form = "S" if rng.random() < 0.5 else "N"
    parts = []
    for i in order:
        ev = EVENTS[events[i]]
        phrases = ev.sentences if form == "S" else ev.nouns
        parts.append(phrases[rng.integers(len(phrases))])
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return _capitalise(text)


def _structure(scene: Scene) -> Scene:
    return Scene(scene.kind, tuple(scene.events), scene.caption)


def weak_caption_with_eligibility(scene: Scene | str, rng: np.random.Generator,
                                  cfg: WeakCaptionConfig) -> tuple[WeakCaption, dict[str, int]]:
    """:func:`weak_caption` and the number of units each corruption could act on."""
    if isinstance(scene, str):
        scene = scene_from_caption(scene)
    # one independent stream per corruption, so changing one rate never moves another's draws
    s_swap, s_omit, s_order, s_vague = (np.random.default_rng(s) for s in rng.integers(0, 2**63 - 1, size=4))
    clean = scene.caption
    described, text, swapped = _structure(scene), clean, False
    eligible = {"omit": 0, "order": 0, "vague": 0}

    # (d) the caption of another clip
    if s_swap.random() < cfg.swap_rate:
        other = sample_scene(s_swap)
        while (other.kind, other.events) == (scene.kind, tuple(scene.events)):
            other = sample_scene(s_swap)
        described, text, swapped = _structure(other), other.caption, True

    # (a) events left out; the anchor is always named
    kind, events, omitted = described.kind, tuple(described.events), ()
    if len(events) >= 2 and not swapped:
        anchor = int(s_omit.integers(len(events)))
        draws = s_omit.random(len(events))
        eligible["omit"] = len(events) - 1
        omitted = tuple(e for i, e in enumerate(events) if i != anchor and draws[i] < cfg.omit_rate)
        if omitted:
            events = tuple(e for e in events if e not in omitted)
            kind = SINGLE if len(events) == 1 else kind
            text = compose_caption(kind, events, s_omit)

    # (b) order words dropped: "A and B", events in random order
    order_dropped = False
    if kind == SEQUENCE and len(events) >= 2 and not swapped:
        eligible["order"] = 1
        if s_order.random() < cfg.order_drop_rate:
            text, order_dropped = _unordered_caption(events, s_order), True

    # (c) one named event described generically
    vague: tuple[str, ...] = ()
    spans = _spans(text)
    if spans and not swapped:
        eligible["vague"] = 1
        if s_vague.random() < cfg.vague_rate:
            a, b, event, form, _ = spans[int(s_vague.integers(len(spans)))]
            options = vague_phrases(event, form)
            phrase = options[int(s_vague.integers(len(options)))]
            was_upper = text[:1].isupper()
            text = text[:a] + phrase + text[b:]
            text = _capitalise(text) if a == 0 and was_upper else text
            vague = (event,)
    named = tuple(span[2] for span in _spans(text))
    weak = WeakCaption(text=text, clean=clean, described=described, swapped=swapped, omitted=omitted,
                       order_dropped=order_dropped, vague=vague, named=named)
    return weak, eligible


def weak_caption(scene: Scene | str, rng: np.random.Generator, cfg: WeakCaptionConfig) -> WeakCaption:
    """The weak caption of ``scene`` (a :class:`Scene` or a SoundWorld caption) drawn from ``rng``.

    With every rate 0 the text is ``scene.caption`` exactly; a corruption that does not fire
    leaves the text as it was.
    """
    return weak_caption_with_eligibility(scene, rng, cfg)[0]


def clip_rng(cfg: WeakCaptionConfig, key: tuple[int, ...] | list[int], index: int) -> np.random.Generator:
    """The generator of clip ``index``'s weak caption: seeded by ``(cfg.seed, *key, index)``."""
    return np.random.default_rng([int(cfg.seed), *(int(k) for k in key), int(index)])


def weaken_captions(scenes: list[Scene], cfg: WeakCaptionConfig, key: tuple[int, ...] | list[int] = (),
                    start: int = 0) -> tuple[list[WeakCaption], WeakCaptionCounts]:
    """Weak captions of ``scenes`` (clip ``start + i`` is ``scenes[i]``) and their counters.

    Clip ``i``'s caption is drawn from :func:`clip_rng` ``(cfg, key, i)`` alone, so two stages that
    read the first 6000 and the first 8000 clips of the same split with the same ``key`` (the
    recipe passes ``(data seed, split id)``) see the same weak caption for every clip they share.
    """
    counts, out = WeakCaptionCounts(), []
    for i, scene in enumerate(scenes, start=start):
        weak, eligible = weak_caption_with_eligibility(scene, clip_rng(cfg, key, i), cfg)
        counts.add(weak, eligible)
        out.append(weak)
    return out, counts


# ---------------------------------------------------------------- measuring public caption sets
# Word patterns used to measure the rates from public caption sets (docs/soundworld_weak_captions.md).
# Sound sources: broad classes whose mentions a keyword finds reliably.
SOURCE_PATTERNS: dict[str, str] = {
    "dog": r"dogs?|barks?|barking|puppy|puppies|howl\w*|yelp\w*|growl\w*",
    "bird": r"birds?|chirp\w*|tweet\w*|pigeons?|crows?|cooing|coos?|squawk\w*|warbl\w*|songbirds?",
    "bell": r"bells?|chim(?:e|es|ed|ing)|ding|dings|dinging|dinged",
    "siren": r"sirens?",
    "rain": r"rain|rains|raining|rainfall|rainstorm|rainwater|drizzl\w*",
    "clock": r"clocks?|tick|ticks|ticking|tock\w*|tick-tock\w*",
    "engine": r"engines?|motors?|idle|idles|idling|rev|revs|revv\w*",
    "knock": r"knock\w*",
    "speech": r"speak\w*|speech|talk\w*|voices?|says?|said|narrat\w*|conversation|chatter\w*",
    "music": r"music\w*|song|melody|guitar|piano|drums?",
    "vehicle": r"cars?|vehicles?|trucks?|bus|buses|train|trains|motorcycles?|traffic",
    "wind": r"wind|winds|windy",
    "water": r"water|stream|splash\w*|flowing|waves?",
    "footsteps": r"footsteps?|walking|steps",
    "horn": r"horns?|honk\w*",
    "aircraft": r"airplanes?|aircraft|planes?|jets?|helicopters?",
    "laughter": r"laugh\w*|giggl\w*",
    "baby": r"bab(y|ies)|infants?",
    "thunder": r"thunder\w*",
    "insects": r"insects?|crickets?|bees?|flies|fly|mosquito\w*",
    "typing": r"typing|keyboard\w*",
    "gunshot": r"guns?|gunshots?|gunfire|shots?",
    "applause": r"applau\w*|clapping|cheer\w*",
    "cat": r"cats?|meow\w*",
}
# Words that state the order of events in time.
ORDER_PATTERN = (r"followed by|then|before|after|afterwards?|first|next|later|finally|eventually|until|"
                 r"subsequently")
# Words that describe a sound without naming its source.
GENERIC_PATTERN = (r"something|some ?thing|an? object|objects|an item|items|an animal|animals|a vehicle|vehicles|"
                   r"a machine|machinery|a device|devices|(?:an?|some) (?:\w+ )?(?:noise|sound)s?|noises|sounds")


def _word_regex(pattern: str) -> re.Pattern:
    return re.compile(r"(?<![a-z])(?:" + pattern + r")(?![a-z])")


def truncated_binomial_rate(counts: list[int], trials: list[int], min_count: int = 1) -> float | None:
    """Maximum-likelihood ``p`` of ``k ~ Binomial(m, p)`` observed only where ``k >= min_count``.

    Used with ``k`` = how many of a clip's ``m`` independent captions mention something that at
    least ``min_count`` of them mention: ``p`` is then the chance that one caption mentions it.
    Grid search (step 1e-4), then the best point; None without observations.
    """
    from collections import Counter

    pairs = Counter((int(k), int(m)) for k, m in zip(counts, trials) if min_count <= k <= m)
    if not pairs:
        return None
    (ks, ms), weight = np.array(list(pairs), float).T, np.array(list(pairs.values()), float)
    p = np.linspace(1e-4, 1 - 1e-4, 9999)[:, None]
    # log P(k) - log P(K >= min_count); the binomial coefficients do not depend on p
    tail = np.zeros((len(p), len(ms)))
    for j in range(min_count):
        coef = np.array([math.comb(int(m), j) for m in ms])
        tail += coef * p**j * (1 - p) ** (ms - j)
    loglik = (weight * (ks * np.log(p) + (ms - ks) * np.log(1 - p) - np.log1p(-np.minimum(tail, 1 - 1e-12)))).sum(1)
    return float(p[int(np.argmax(loglik)), 0])


def caption_statistics(clips: list[list[str]]) -> dict:
    """What the weak rates are measured from, on clips with several independent captions each.

    * omission: for every source class in :data:`SOURCE_PATTERNS` and every clip where at least
      one (or two) of its captions mention it, how many do; the truncated-binomial MLE of the
      chance that one caption mentions an audible source (``1 - p`` = omission), pooled over all
      classes and over the eight that are SoundWorld's events;
    * order: the share of captions with an order word (:data:`ORDER_PATTERN`), and, over clips
      where at least one (or two) captions state an order, the MLE chance that a caption does;
    * vague: the share of captions with a generic word (:data:`GENERIC_PATTERN`).
    """
    sources = {name: _word_regex(p) for name, p in SOURCE_PATTERNS.items()}
    order, generic = _word_regex(ORDER_PATTERN), _word_regex(GENERIC_PATTERN)
    lowered = [[c.lower() for c in caps if c and c.strip()] for caps in clips]
    ks, ms, per_class = [], [], {}
    sw_ks, sw_ms = [], []
    for name, rx in sources.items():
        k = [sum(bool(rx.search(c)) for c in caps) for caps in lowered]
        m = [len(caps) for caps in lowered]
        per_class[name] = {"clips_with_mention": sum(x >= 1 for x in k),
                           "p_mention": truncated_binomial_rate(k, m, 1),
                           "p_mention_2plus": truncated_binomial_rate(k, m, 2)}
        ks += k
        ms += m
        if name in EVENTS:
            sw_ks += k
            sw_ms += m
    ok = [sum(bool(order.search(c)) for c in caps) for caps in lowered]
    m = [len(caps) for caps in lowered]
    n_captions = sum(m)
    p1, p2 = truncated_binomial_rate(ks, ms, 1), truncated_binomial_rate(ks, ms, 2)
    s1, s2 = truncated_binomial_rate(sw_ks, sw_ms, 1), truncated_binomial_rate(sw_ks, sw_ms, 2)
    q1, q2 = truncated_binomial_rate(ok, m, 1), truncated_binomial_rate(ok, m, 2)
    return {
        "clips": len(lowered), "captions": n_captions,
        "omission": {"p_mention": p1, "omit": None if p1 is None else 1 - p1,
                     "p_mention_2plus": p2, "omit_2plus": None if p2 is None else 1 - p2,
                     "pairs_with_mention": sum(k >= 1 for k in ks),
                     "soundworld_classes": {"omit": None if s1 is None else 1 - s1,
                                            "omit_2plus": None if s2 is None else 1 - s2,
                                            "pairs_with_mention": sum(k >= 1 for k in sw_ks)},
                     "per_class": per_class},
        "order": {"share_of_captions": sum(ok) / n_captions if n_captions else None,
                  "clips_with_order_word": sum(k >= 1 for k in ok),
                  "p_states_order": q1, "drop": None if q1 is None else 1 - q1,
                  "p_states_order_2plus": q2, "drop_2plus": None if q2 is None else 1 - q2},
        "vague": {"share_of_captions": sum(bool(generic.search(c)) for caps in lowered for c in caps) / n_captions
                  if n_captions else None},
    }


def read_caption_clips(path: str | Path) -> list[list[str]]:
    """Captions grouped by clip from a public caption CSV: Clotho's ``caption_1 .. caption_5``
    columns, or AudioCaps' one row per caption (``youtube_id, start_time, caption``)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    cols = rows[0].keys()
    if "caption_1" in cols:
        return [[r[c] for c in sorted(cols) if c.startswith("caption_") and r[c]] for r in rows]
    if {"youtube_id", "caption"} <= set(cols):
        grouped: dict[tuple, list[str]] = {}
        for r in rows:
            grouped.setdefault((r["youtube_id"], r.get("start_time", "")), []).append(r["caption"])
        return list(grouped.values())
    raise ValueError(f"{path}: expected Clotho columns caption_1..caption_5 or AudioCaps columns "
                     f"youtube_id, start_time, caption; got {list(cols)}")


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Measure omission, order and vague-word rates of caption CSVs "
                                                 "(clips with several captions each: AudioCaps val/test, Clotho)")
    parser.add_argument("csv", nargs="+", help="caption CSV files; their clips are pooled")
    args = parser.parse_args(argv)
    clips = [caps for path in args.csv for caps in read_caption_clips(path)]
    print(json.dumps(caption_statistics(clips), indent=2))


__all__ = ["CATEGORY", "GENERIC", "RATES", "WeakCaption", "WeakCaptionConfig", "WeakCaptionCounts",
           "caption_statistics", "clip_rng", "read_caption_clips", "truncated_binomial_rate", "vague_phrases",
           "weak_caption", "weak_caption_with_eligibility", "weaken_captions"]

if __name__ == "__main__":
    main()
