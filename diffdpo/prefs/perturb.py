"""Named caption perturbations that make losers, Tango 2 style, with two back ends.

Kinds (each a function of a parsed caption and an RNG):

* ``drop_event``      remove one event and its connector           (needs >= 2 events)
* ``replace_event``   swap one event for a vocabulary phrase        (needs a vocabulary)
* ``add_event``       append a vocabulary phrase, with or after the rest ("while" / "followed by"):
                      a loser holding an event its caption does not name, the commonest failure
                      of the shipped SoundWorld base (docs/soundworld.md)
* ``swap_order``      exchange two events joined by an ordered relation, reversing their order in time
* ``change_relation`` "followed by"-like <-> "while"-like           (needs >= 2 events)

Every result differs from the original caption; a caption where a kind cannot apply yields no
result for that kind (see :meth:`Perturber.perturb`, which reports why). Randomness comes from
``random.Random(f"{seed}:{kind}:{caption}")``, stable across processes and Python runs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from diffdpo.prefs.captions import REVERSE, SEQUENCE, ParsedCaption, parse_caption

DEFAULT_VOCABULARY = (
    "a dog barks", "a bell rings", "a siren wails", "rain falls", "a clock ticks", "birds chirp",
    "an engine hums", "someone knocks on a door", "a man speaks", "a woman laughs", "a baby cries",
    "water runs from a tap", "wind blows", "a car horn honks", "a cat meows", "people applaud",
)


@dataclass(frozen=True)
class Perturbation:
    caption: str
    kind: str
    detail: str
    backend: str = "rule"


class NothingToPerturb(ValueError):
    """The caption offers nothing for the requested kind(s)."""


def _drop_event(p: ParsedCaption, rng: random.Random, vocabulary) -> tuple[ParsedCaption, str] | None:
    if len(p.events) < 2:
        return None
    k = rng.randrange(len(p.events))
    events = list(p.events[:k] + p.events[k + 1:])
    connectors = list(p.connectors)
    del connectors[max(k - 1, 0)]
    return p.with_parts(events, connectors), f"dropped {p.events[k]!r}"


def _new_phrases(p: ParsedCaption, vocabulary) -> list[str]:
    """Vocabulary phrases the caption does not already hold (compared as text, not as events)."""
    present = {e.lower() for e in p.events}
    return [v for v in vocabulary if v.lower() not in present]


def _replace_event(p: ParsedCaption, rng: random.Random, vocabulary) -> tuple[ParsedCaption, str] | None:
    options = _new_phrases(p, vocabulary)
    if not options:
        return None
    k = rng.randrange(len(p.events))
    new = rng.choice(options)
    events = list(p.events)
    events[k] = new
    return p.with_parts(events, p.connectors), f"replaced {p.events[k]!r} with {new!r}"


def _add_event(p: ParsedCaption, rng: random.Random, vocabulary) -> tuple[ParsedCaption, str] | None:
    options = _new_phrases(p, vocabulary)
    if not options:
        return None
    new = rng.choice(options)
    connector = rng.choice(("while", "followed by"))
    return p.with_parts([*p.events, new], [*p.connectors, connector]), f"added {new!r} ({connector})"


def _swap_order(p: ParsedCaption, rng: random.Random, vocabulary) -> tuple[ParsedCaption, str] | None:
    ordered = [i for i, kind in enumerate(p.kinds()) if kind in (SEQUENCE, REVERSE)]
    if not ordered:
        return None
    i = rng.choice(ordered)
    events = list(p.events)
    if events[i].lower() == events[i + 1].lower():
        return None
    events[i], events[i + 1] = events[i + 1], events[i]
    return p.with_parts(events, p.connectors), f"swapped {p.events[i]!r} and {p.events[i + 1]!r}"


def _change_relation(p: ParsedCaption, rng: random.Random, vocabulary) -> tuple[ParsedCaption, str] | None:
    if not p.connectors:
        return None
    i = rng.randrange(len(p.connectors))
    old = p.connectors[i]
    new = "while" if p.kinds()[i] in (SEQUENCE, REVERSE) else "followed by"
    connectors = list(p.connectors)
    connectors[i] = ", " + new if old.startswith(",") else new
    return p.with_parts(p.events, connectors), f"{old!r} -> {connectors[i]!r}"


PERTURBATIONS: dict[str, Callable] = {
    "drop_event": _drop_event,
    "replace_event": _replace_event,
    "add_event": _add_event,
    "swap_order": _swap_order,
    "change_relation": _change_relation,
}


def _check_kinds(kinds: Sequence[str]) -> None:
    unknown = [k for k in kinds if k not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"perturbation kind(s) {unknown} unknown; valid: {sorted(PERTURBATIONS)}")


class Perturber:
    """Rule-based perturbation (the default back end: offline, no model)."""

    backend = "rule"

    def __init__(self, vocabulary: Sequence[str] = DEFAULT_VOCABULARY, seed: int = 0):
        self.vocabulary = tuple(vocabulary)
        self.seed = seed

    def apply(self, caption: str, kind: str, attempt: int = 0) -> Perturbation | None:
        """One perturbation of ``kind`` (``attempt`` draws another one), or None when it cannot apply."""
        _check_kinds([kind])
        parsed = parse_caption(caption)
        rng = random.Random(f"{self.seed}:{kind}:{attempt}:{caption}")
        for _ in range(8):  # a random choice may land on a no-op (e.g. replacing with a synonym)
            result = PERTURBATIONS[kind](parsed, rng, self.vocabulary)
            if result is None:
                return None
            new, detail = result
            text = new.render()
            if _normalise(text) != _normalise(caption):
                return Perturbation(text, kind, detail, self.backend)
        return None

    def perturb(self, caption: str, kinds: Sequence[str], n: int) -> list[Perturbation]:
        """Up to ``n`` distinct perturbations, cycling through ``kinds`` in order.

        Raises :class:`NothingToPerturb` naming the caption when no kind applies.
        """
        _check_kinds(kinds)
        out: list[Perturbation] = []
        seen = {_normalise(caption)}
        for round_ in range(n * 4):
            if len(out) == n:
                break
            kind = kinds[round_ % len(kinds)]
            result = self.apply(caption, kind, attempt=round_ // len(kinds))
            if result is not None and _normalise(result.caption) not in seen:
                seen.add(_normalise(result.caption))
                out.append(result)
        if not out:
            raise NothingToPerturb(f"caption {caption!r}: nothing to perturb with {list(kinds)}")
        return out


def _normalise(text: str) -> str:
    """Compare captions by their words: case and punctuation do not make a new caption."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


LLM_INSTRUCTIONS = {
    "drop_event": "Remove one of the sound events from the caption.",
    "replace_event": "Replace one of the sound events with a different sound event.",
    "add_event": "Add one more sound event, heard at the same time as or after the others.",
    "swap_order": "Swap the order in time of two of the sound events.",
    "change_relation": "Change how two events relate in time (one after the other <-> at the same time).",
}
DEFAULT_LLM_TEMPLATE = (
    "Rewrite the audio caption below. {instruction} Keep the style of the caption. "
    "Answer with the new caption only.\nCaption: {caption}\nNew caption:"
)


class LLMPerturber(Perturber):
    """Perturbation by an instruction-following causal LM from a local directory.

    Same interface and output schema as the rule-based :class:`Perturber`. The model's answer is
    the first non-empty line of its continuation; an unusable answer (empty, the original
    caption, or far longer than it) falls back to the rule-based kind, recorded as backend
    ``"rule-fallback"`` so a manifest shows how often the model was useful.
    """

    backend = "llm"

    def __init__(self, model_path: str | None = None, prompt_template: str = DEFAULT_LLM_TEMPLATE,
                 max_new_tokens: int = 48, vocabulary: Sequence[str] = DEFAULT_VOCABULARY, seed: int = 0,
                 model=None, tokenizer=None, min_vocab: int = 1000):
        super().__init__(vocabulary, seed)
        if "{caption}" not in prompt_template or "{instruction}" not in prompt_template:
            raise ValueError("perturb.llm_prompt_template: must contain {caption} and {instruction}")
        self.prompt_template, self.max_new_tokens = prompt_template, max_new_tokens
        if model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from diffdpo.metrics.loading import check_tokenizer

            if not model_path:
                raise ValueError("perturb.llm_model: the llm back end needs a local model directory")
            tokenizer = check_tokenizer(AutoTokenizer.from_pretrained(model_path, local_files_only=True),
                                        model_path, min_vocab)
            model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
        self.model, self.tokenizer = model.eval(), tokenizer

    def apply(self, caption: str, kind: str, attempt: int = 0) -> Perturbation | None:
        import torch

        _check_kinds([kind])
        prompt = self.prompt_template.format(caption=caption, instruction=LLM_INSTRUCTIONS[kind])
        inputs = self.tokenizer(prompt, return_tensors="pt")
        torch.manual_seed(random.Random(f"{self.seed}:{kind}:{attempt}:{caption}").randrange(2**31))
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=attempt > 0,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        answer = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        text = parse_llm_answer(answer)
        if text and _normalise(text) != _normalise(caption) and len(text) <= 3 * len(caption) + 20:
            return Perturbation(text, kind, LLM_INSTRUCTIONS[kind], self.backend)
        fallback = super().apply(caption, kind, attempt)
        return None if fallback is None else Perturbation(fallback.caption, kind, fallback.detail, "rule-fallback")


def parse_llm_answer(answer: str) -> str:
    """First non-empty line, without quotes or a leading 'Caption:' label."""
    for line in answer.splitlines():
        line = line.strip().strip("\"'“”").strip()
        for label in ("new caption:", "caption:"):
            if line.lower().startswith(label):
                line = line[len(label):].strip().strip("\"'“”")
        if line:
            return line
    return ""


def make_perturber(backend: str = "rule", vocabulary: Sequence[str] = DEFAULT_VOCABULARY, seed: int = 0,
                   llm_model: str | None = None, llm_prompt_template: str = DEFAULT_LLM_TEMPLATE) -> Perturber:
    if backend == "rule":
        return Perturber(vocabulary, seed)
    if backend == "llm":
        return LLMPerturber(llm_model, llm_prompt_template, vocabulary=vocabulary, seed=seed)
    raise ValueError(f"perturb.backend: unknown {backend!r}; valid: ['llm', 'rule']")
