"""Caption parsing and the named perturbations, on AudioCaps-style captions written for the test."""

import subprocess
import sys

import pytest

from diffdpo.prefs.captions import OVERLAP, REVERSE, SEQUENCE, parse_caption, temporal_order
from diffdpo.prefs.perturb import (PERTURBATIONS, LLMPerturber, NothingToPerturb, Perturber, make_perturber,
                                   parse_llm_answer)

PARSES = [
    ("A dog barks followed by a man speaking", ["a dog barks", "a man speaking"], ["followed by"], [SEQUENCE], [0, 1]),
    ("Birds chirp, then a car passes by.", ["birds chirp", "a car passes by"], [", then"], [SEQUENCE], [0, 1]),
    ("A bell rings after a dog barks", ["a bell rings", "a dog barks"], ["after"], [REVERSE], [1, 0]),
    ("Rain falls while thunder rumbles in the distance", ["rain falls", "thunder rumbles in the distance"],
     ["while"], [OVERLAP], None),
    ("Someone talks as a TV plays and then an engine starts", ["someone talks", "a TV plays", "an engine starts"],
     ["as", "and then"], [OVERLAP, SEQUENCE], [0, 1, 2]),
    ("A siren wails before a crowd cheers, and a horn honks", ["a siren wails", "a crowd cheers", "a horn honks"],
     ["before", ", and"], [SEQUENCE, OVERLAP], [0, 1, 2]),
    ("Water runs", ["water runs"], [], [], None),
]


@pytest.mark.parametrize("caption, events, connectors, kinds, order", PARSES, ids=[p[0] for p in PARSES])
def test_parse_and_render_round_trip(caption, events, connectors, kinds, order):
    parsed = parse_caption(caption)
    assert list(parsed.events) == events
    assert list(parsed.connectors) == connectors
    assert list(parsed.kinds()) == kinds
    assert temporal_order(parsed) == order
    assert parsed.render() == " ".join(caption.split())


def test_parse_rejects_empty_and_keeps_leading_relation_words_in_the_phrase():
    with pytest.raises(ValueError, match="empty caption"):
        parse_caption("   ")
    assert parse_caption("as the wind blows").events == ("as the wind blows",)


# Captions where a kind has exactly one possible result, so the expected text is certain.
EXPECTED = [
    ("swap_order", "A dog barks followed by a man speaking", "A man speaking followed by a dog barks"),
    ("swap_order", "A bell rings after a dog barks.", "A dog barks after a bell rings."),
    ("swap_order", "Birds chirp, then a car passes by", "A car passes by, then birds chirp"),
    ("change_relation", "A dog barks followed by a man speaking", "A dog barks while a man speaking"),
    ("change_relation", "Rain falls while a bell rings", "Rain falls followed by a bell rings"),
    ("change_relation", "Birds chirp, then a car passes by", "Birds chirp, while a car passes by"),
]


@pytest.mark.parametrize("kind, caption, expected", EXPECTED)
def test_single_outcome_perturbations(kind, caption, expected):
    result = Perturber(seed=3).apply(caption, kind)
    assert result.caption == expected and result.kind == kind and result.backend == "rule"


def test_drop_and_replace_change_exactly_one_event():
    caption = "A dog barks followed by a man speaking while rain falls"
    for seed in range(10):
        dropped = parse_caption(Perturber(seed=seed).apply(caption, "drop_event").caption)
        assert len(dropped.events) == 2 and set(dropped.events) < {"a dog barks", "a man speaking", "rain falls"}
        vocab = ["a cat meows", "wind blows"]
        replaced = parse_caption(Perturber(vocab, seed=seed).apply(caption, "replace_event").caption)
        original = parse_caption(caption)
        changed = [i for i in range(3) if replaced.events[i] != original.events[i]]
        assert len(changed) == 1 and replaced.events[changed[0]] in vocab
        assert replaced.connectors == original.connectors


def test_add_event_appends_one_new_vocabulary_event():
    caption = "A dog barks followed by a bell rings"
    original = parse_caption(caption)
    vocab = ["a dog barks", "an engine hums", "wind blows"]
    connectors = set()
    for seed in range(12):
        added = parse_caption(Perturber(vocab, seed=seed).apply(caption, "add_event").caption)
        assert added.events[:2] == original.events and added.connectors[:1] == original.connectors
        assert added.events[2] in {"an engine hums", "wind blows"}  # never one the caption already has
        connectors.add(added.connectors[1])
    assert connectors == {"while", "followed by"}
    assert Perturber(["a dog barks"]).apply("A dog barks", "add_event") is None


@pytest.mark.parametrize("kind, caption", [
    ("drop_event", "A clock ticks"), ("swap_order", "A clock ticks"), ("change_relation", "A clock ticks"),
    ("swap_order", "Rain falls while a bell rings"),  # no order stated: nothing to reorder
    ("swap_order", "A dog barks followed by a dog barks"),
])
def test_kind_that_cannot_apply_returns_none(kind, caption):
    assert Perturber().apply(caption, kind) is None


def test_replace_with_exhausted_vocabulary_returns_none():
    assert Perturber(["a dog barks"]).apply("A dog barks", "replace_event") is None


def test_perturb_never_returns_the_original_and_reports_nothing_to_perturb():
    captions = [p[0] for p in PARSES] + [e[1] for e in EXPECTED]
    for caption in captions:
        for kinds in (["drop_event", "replace_event", "change_relation"], ["swap_order"], list(PERTURBATIONS)):
            try:
                results = Perturber(seed=1).perturb(caption, kinds, 3)
            except NothingToPerturb as e:
                assert caption in str(e)
                continue
            texts = [" ".join(r.caption.lower().rstrip(".").split()) for r in results]
            assert " ".join(caption.lower().rstrip(".").split()) not in texts
            assert len(set(texts)) == len(texts)
    with pytest.raises(NothingToPerturb, match="A clock ticks"):
        Perturber().perturb("A clock ticks", ["swap_order"], 2)
    with pytest.raises(ValueError, match="unknown"):
        Perturber().perturb("A clock ticks", ["shuffle"], 2)


def test_deterministic_across_processes():
    code = ("from diffdpo.prefs.perturb import Perturber;"
            "print([p.caption for p in Perturber(seed=7).perturb("
            "'A dog barks followed by a man speaking while rain falls', "
            "['drop_event', 'replace_event', 'swap_order', 'change_relation'], 4)])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": "/usr/bin:/bin"}).stdout for h in (1, 2)}
    assert len(outs) == 1
    caption = "A dog barks followed by a man speaking while rain falls"
    kinds = ["drop_event", "replace_event", "swap_order", "change_relation"]
    assert outs.pop().strip() == str([p.caption for p in Perturber(seed=7).perturb(caption, kinds, 4)])
    assert Perturber(seed=7).perturb(caption, kinds, 4) != Perturber(seed=8).perturb(caption, kinds, 4)


def test_parse_llm_answer():
    assert parse_llm_answer('\n  "A cat meows then a dog barks"\nmore') == "A cat meows then a dog barks"
    assert parse_llm_answer("New caption: rain falls") == "rain falls"
    assert parse_llm_answer("\n \n") == ""


@pytest.fixture(scope="module")
def tiny_llm():
    """A random-weight Llama and a word-level tokenizer built offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for p in PARSES for w in p[0].lower().replace(",", " ").replace(".", " ").split()}
                   | {"rewrite", "the", "caption", "new", ":"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", "\n"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=1, eos_token_id=2))
    return model, tokenizer


def test_llm_backend_uses_the_model_answer(tiny_llm, monkeypatch):
    model, tokenizer = tiny_llm
    perturber = LLMPerturber(model=model, tokenizer=tokenizer)
    answer = tokenizer("a car passes by then birds chirp", return_tensors="pt")["input_ids"][0]

    def fake_generate(input_ids=None, **kwargs):
        import torch
        return torch.cat([input_ids, answer[None]], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    result = perturber.apply("Birds chirp, then a car passes by", "swap_order")
    assert result.caption == "a car passes by then birds chirp" and result.backend == "llm"
    assert result.kind == "swap_order"


def test_llm_backend_falls_back_when_the_answer_is_unusable(tiny_llm, monkeypatch):
    model, tokenizer = tiny_llm
    perturber = LLMPerturber(model=model, tokenizer=tokenizer)
    caption = "Birds chirp, then a car passes by"
    echo = tokenizer(caption.lower().replace(",", ""), return_tensors="pt")["input_ids"][0]
    monkeypatch.setattr(model, "generate", lambda input_ids=None, **kw: __import__("torch").cat([input_ids, echo[None]], 1))
    result = perturber.apply(caption, "swap_order")
    assert result.backend == "rule-fallback"
    assert result.caption == Perturber().apply(caption, "swap_order").caption


def test_llm_backend_with_a_real_random_model_keeps_the_schema(tiny_llm):
    model, tokenizer = tiny_llm
    perturber = LLMPerturber(model=model, tokenizer=tokenizer, max_new_tokens=8)
    caption = "A dog barks followed by a man speaking"
    results = perturber.perturb(caption, ["swap_order", "drop_event"], 2)
    assert 1 <= len(results) <= 2
    for r in results:
        assert r.backend in ("llm", "rule-fallback") and r.caption.lower() != caption.lower()


def test_make_perturber_errors():
    with pytest.raises(ValueError, match="perturb.backend"):
        make_perturber("gpt")
    with pytest.raises(ValueError, match="perturb.llm_model"):
        make_perturber("llm")
    with pytest.raises(ValueError, match="must contain"):
        LLMPerturber(model=object(), tokenizer=object(), prompt_template="no slots")
