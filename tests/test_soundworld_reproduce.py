"""``diffdpo soundworld reproduce``, reduced (6 captions, 2-step trainings, 8 validation captions) on the
shipped weak base: one preference set, the method on nested prefixes of it, every model judged on the
same captions and seeds, results JSON and report; a rerun reads every stage back; mistakes are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_METHOD = """\
base: weak
prefs:
  num_samples: 2
  shard_size: 3
  generator: {num_inference_steps: 2, batch_size: 16}
  multi_sample: {min_gap: 0.0}
  perturbed: {min_gap: -1.0, num_perturbations: 1}
  temporal: {min_gap: -1.0, samples_per_perturbation: 1}
dpo:
  loss: {type: sigmoid, beta: 5000, beta_convention: tango2}
  train: {per_device_batch: 2, max_steps: 2}
evaluate: {captions: 8, steps: 2, batch_size: 8, examples: 2, bootstrap: 50}
"""


def _args(tmp: Path, *extra: str) -> list[str]:
    return [f"method={tmp / 'method.yaml'}", f"out={tmp / 'run'}", "train_captions=6", "pairs=[0,3,6]",
            "evaluate={split: validation, captions: 8}", "threads=1", *extra]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    from diffdpo.config import load_config
    from diffdpo.worlds.soundworld.reproduce import ReproduceConfig, run_reproduce

    tmp = tmp_path_factory.mktemp("reproduce")
    (tmp / "method.yaml").write_text(TINY_METHOD)
    cfg = load_config(ReproduceConfig, None, _args(tmp))
    return tmp, cfg, run_reproduce(cfg)


def test_results_cover_every_dose_with_paired_deltas(reproduced):
    tmp, cfg, results = reproduced
    saved = json.loads((tmp / "run" / "results_validation.json").read_text())
    assert saved["table"] == json.loads(json.dumps(results["table"]))
    keys = [row["key"] for row in results["table"]]
    assert keys[:3] == ["satisfied", "order_correct", "single_event"] and "clap" in keys and "fad" in keys
    for row in results["table"]:
        assert list(row["models"]) == ["base", "dpo @ 3 pairs", "dpo @ 6 pairs", "sft @ 6 pairs"]
        assert list(row["deltas"]) == ["dpo @ 3 pairs - base", "dpo @ 6 pairs - base", "sft @ 6 pairs - base"]
    sat = results["dose_response"]["satisfied"]
    assert [p["x"] for p in sat["dpo"]] == [0, 3, 6] and sat["sft"]["x"] == 6
    assert sat["dpo_minus_base"][0]["mean"] == 0.0
    for p, d in zip(sat["dpo"][1:], sat["dpo_minus_base"][1:]):  # paired delta = difference of the means
        assert d["mean"] == pytest.approx(p["mean"] - sat["dpo"][0]["mean"])
        assert d["n"] == p["n"] == 8
    assert results["settings"]["pairs_read"] == {"dpo_3": 3, "dpo_6": 6, "sft_6": 6}
    # the method's settings, untouched but for the pairs read: beta, steps, loss as in the method config
    train = results["settings"]["train"]
    assert train["dpo_3"]["loss"]["beta"] == 5000 and train["dpo_3"]["train"]["max_steps"] == 2
    assert train["dpo_3"]["data"]["max_pairs"] == 3 and train["sft_6"]["loss"]["sft_epochs"] == 10**9
    assert all(h["sft_only"] == 1.0 for h in results["curves"]["sft_6"])
    assert results["settings"]["evaluation"]["split"] == "validation"


def test_doses_are_nested_prefixes_of_one_set(reproduced):
    from diffdpo.data.records import read_jsonl

    tmp, cfg, results = reproduced
    nested = results["nested_pairs"]
    assert len(nested["3"]) == 3 and len(nested["6"]) == 6 and nested["6"][:3] == nested["3"]
    ids = [r.id for r in read_jsonl(tmp / "run" / "prefs" / "prefs.jsonl")]
    assert nested["6"] == ids[:6]
    for name in ("dpo_3", "dpo_6", "sft_6"):  # every model trained on the one set
        assert results["settings"]["train"][name]["data"]["path"] == str(tmp / "run" / "prefs")


def test_report_has_the_dose_charts_and_examples(reproduced):
    tmp, cfg, results = reproduced
    html = (tmp / "run" / "report_validation.html").read_text()
    for title in ("oracle: caption satisfied", "oracle: caption satisfied - base (paired)", "proxy: CLAP score"):
        assert f'aria-label="{title}"' in html
    assert html.count("<line") >= 3 * 4  # CI bars (3 lines each) at the 3 doses and the sft point
    assert "dpo @ 6 pairs - base" in html
    for ex in results["examples"]:
        assert set(ex["media"]) == {"base", "dpo_3", "dpo_6", "sft_6"}
        for rel in ex["media"].values():
            assert (tmp / "run" / rel).is_file()


def test_rerun_reads_every_stage_back(reproduced, monkeypatch):
    """Nothing is built, trained or generated again: each would fail here if called."""
    from diffdpo.diffusion import trainer
    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.prefs import build
    from diffdpo.worlds.soundworld.reproduce import run_reproduce

    tmp, cfg, results = reproduced
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("redone"))
    monkeypatch.setattr(TangoPipeline, "sample_latents", boom)
    monkeypatch.setattr(trainer, "train", boom)
    monkeypatch.setattr(build, "build_shard", boom)
    again = run_reproduce(cfg)
    assert again["table"] == results["table"] and again["nested_pairs"] == results["nested_pairs"]


def test_mistakes_are_one_line_and_exit_code_2(reproduced, capsys):
    from diffdpo import cli

    tmp, cfg, _ = reproduced
    cases = {  # args -> what the line says
        ("pairs=[500,250]",): "pairs",
        ("evaluate={split: test}",): "test split",
        ("train_captions=5",): "other settings",           # the set was built from 6 captions: no shrinking
        ("pairs=[0,3,6000]",): "fewer than the 6000 asked for",
        ("dpo_steps=3",): "dpo_steps",
    }
    for extra, needle in cases.items():
        code = cli.main(["soundworld", "reproduce", *_args(tmp, *extra)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
    code = cli.main(["soundworld", "reproduce", f"method={tmp / 'nope.yaml'}", f"out={tmp / 'other'}"])
    assert code == 2 and "nope.yaml" in capsys.readouterr().err


def test_more_captions_grow_the_set_and_keep_the_doses(reproduced):
    """Rerun with more captions: the finished shards stay (they are the larger set's first shards), one
    more is built, the doses read the same first pairs, so their models and evaluations are reused."""
    from diffdpo.config import load_config
    from diffdpo.worlds.soundworld.reproduce import ReproduceConfig, run_reproduce

    tmp, cfg, results = reproduced
    shards = tmp / "run" / "prefs" / "shards"
    before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    assert sorted(before) == ["00000.json", "00001.json"]
    grown = run_reproduce(load_config(ReproduceConfig, None, _args(tmp, "train_captions=9")))
    after = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    assert sorted(after) == ["00000.json", "00001.json", "00002.json"]
    assert all(after[k] == v for k, v in before.items())
    manifest = grown["settings"]["prefs_manifest"]
    assert manifest["captions"]["unique"] == 9 and manifest["pairs"] > results["settings"]["prefs_manifest"]["pairs"]
    assert grown["nested_pairs"] == results["nested_pairs"] and grown["table"] == results["table"]


def test_shipped_config_reproduces_the_preregistered_method_on_validation():
    from diffdpo.config import load_config, to_dict
    from diffdpo.worlds.soundworld.reproduce import ReproduceConfig, method_config, model_names

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(ReproduceConfig, root / "recipes" / "configs" / "soundworld_reproduce_weak.yaml")
    assert cfg.method == "recipes/configs/soundworld_demo_weak.yaml"
    cfg.method = str(root / cfg.method)
    demo = method_config(cfg)
    assert demo.evaluate.split == "validation" and demo.dpo["loss"]["beta"] == 5000
    assert demo.dpo["train"]["max_steps"] == 240 and demo.base == "weak"
    assert model_names(cfg) == ["base", "dpo_250", "dpo_500", "dpo_1000", "dpo_2000", "sft_2000"]
    clean = load_config(ReproduceConfig, root / "recipes" / "configs" / "soundworld_reproduce_clean.yaml")
    clean.method = str(root / clean.method)
    assert method_config(clean).base == "clean" and method_config(clean).evaluate.split == "validation"
    assert {k: v for k, v in to_dict(clean).items() if k not in ("method", "out")} == \
        {k: v for k, v in to_dict(cfg).items() if k not in ("method", "out")}


def test_growing_is_refused_after_a_partial_last_shard(tmp_path):
    """7 captions in shards of 3 leave a last shard of 1 caption; once that shard is built, a set of 9
    captions would miss 2 captions there, so the larger run is refused; before, it may grow."""
    import dataclasses

    from diffdpo.data.records import write_json_atomic
    from diffdpo.worlds.soundworld.reproduce import ReproduceConfig, _grows, method_config, set_settings

    (tmp_path / "method.yaml").write_text(TINY_METHOD)
    small = ReproduceConfig(method=str(tmp_path / "method.yaml"), out=str(tmp_path), train_captions=7)
    write_json_atomic(tmp_path / "set_settings.json", {"settings": set_settings(method_config(small))})
    large = dataclasses.replace(small, train_captions=9)
    assert _grows(tmp_path, set_settings(method_config(large)), method_config(large))
    (tmp_path / "prefs" / "shards").mkdir(parents=True)
    (tmp_path / "prefs" / "shards" / "00002.json").write_text("{}")
    assert not _grows(tmp_path, set_settings(method_config(large)), method_config(large))
    other = dataclasses.replace(large, pairs=[0, 1], method=str(tmp_path / "method.yaml"))
    assert not _grows(tmp_path, {**set_settings(method_config(other)), "base": "clean"}, method_config(other))
