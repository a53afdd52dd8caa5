"""The main job, reduced (few captions, few steps): every stage runs through the real code path on
the shipped SoundWorld models, writes its numbers with their settings, and a rerun resumes
instead of redoing finished stages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffdpo.config import from_dict
from helpers.chromium import browser, page_problems  # noqa: F401  (browser is a fixture)

TINY = {
    "train_captions": 6,
    "prefs": {"num_samples": 2, "shard_size": 3,
              "generator": {"num_inference_steps": 2, "batch_size": 16},
              "multi_sample": {"min_gap": 0.0}, "perturbed": {"min_gap": -1.0, "num_perturbations": 1},
              "temporal": {"min_gap": -1.0, "samples_per_perturbation": 1}},
    "dpo": {"train": {"per_device_batch": 2, "max_steps": 2}},
    "evaluate": {"captions": 8, "steps": 2, "batch_size": 8, "examples": 2, "bootstrap": 50},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from diffdpo.worlds.soundworld.demo import DemoConfig, run_demo

    cfg = from_dict(DemoConfig, {**TINY, "out": str(tmp_path_factory.mktemp("demo") / "run")})
    return cfg, run_demo(cfg)


def test_every_stage_ran_and_wrote_its_numbers(demo):
    cfg, results = demo
    out = cfg.out
    saved = json.loads(open(f"{out}/results.json").read())
    assert saved["table"] == json.loads(json.dumps(results["table"]))
    metrics = [row["key"] for row in results["table"]]
    assert metrics[0] == "satisfied" and "fad" in metrics and "clap" in metrics and "presence_f1" in metrics
    for row in results["table"]:
        assert set(row["models"]) == {"base", "dpo", "sft"}
        assert set(row["deltas"]) == {"dpo - base", "dpo - sft", "sft - base"}
        for v in [*row["models"].values(), *row["deltas"].values()]:
            assert v["ci95"][0] <= v["mean"] + 1e-9 or row["key"] == "fad"  # FAD's resampled CI sits above
            assert v["n"] == row["n"]
    assert set(results["curves"]) == {"dpo", "sft"} and len(results["curves"]["dpo"]) == 2
    assert "rewards/accuracies" in results["curves"]["dpo"][0]
    assert sum(results["settings"]["prefs_manifest"]["pairs_per_strategy"].values()) == results["settings"]["pairs"]["dpo"]
    assert (out_path := __import__("pathlib").Path(out) / "report.html").is_file() and out_path.stat().st_size > 0
    for ex in results["examples"]:
        for rel in ex["media"].values():
            assert (__import__("pathlib").Path(out) / rel).is_file()


def test_demo_report_loads_in_a_browser(demo, browser):
    """The page the demo wrote: renders its table, every spectrogram and audio player loads, no
    console errors."""
    from pathlib import Path

    cfg, results = demo
    found = browser.check_page(Path(cfg.out) / "report.html")
    assert page_problems(found) == []
    assert results["table"][0]["metric"] in found["text"]
    n = len(results["examples"]) * 3  # base, dpo, sft
    assert len(found["audios"]) == n and len(found["images"]) == n and n > 0


def test_pair_audit_counts_every_pair_once(demo):
    cfg, results = demo
    audit = results["pair_audit"]
    assert audit["all"]["pairs"] == results["settings"]["pairs"]["dpo"]
    assert sum(a["pairs"] for k, a in audit.items() if k != "all") == audit["all"]["pairs"]
    for a in audit.values():
        assert a["winner_only"] + a["loser_only"] + a["tie"] == pytest.approx(1.0)
        assert a["winner_satisfied"] - a["loser_satisfied"] == pytest.approx(a["winner_only"] - a["loser_only"])


def test_paired_deltas_are_the_differences_of_the_rows(demo):
    """A delta row is the mean of per-caption differences, i.e. the difference of the means."""
    cfg, results = demo
    row = results["table"][0]
    d = row["deltas"]["dpo - base"]["mean"]
    assert d == pytest.approx(row["models"]["dpo"]["mean"] - row["models"]["base"]["mean"], abs=1e-12)


def test_satisfied_is_events_and_order(demo):
    cfg, _ = demo
    rows = json.loads(open(f"{cfg.out}/eval/base/rows.json").read())["rows"]
    for r in rows:
        assert r["satisfied"] == bool(r["events_exact"] and r["order_correct"] is not False)
        assert -1.0 <= r["clap"] <= 1.0


def test_sft_baseline_trains_on_winners_only(demo):
    cfg, results = demo
    assert all(h["sft_only"] == 1.0 for h in results["curves"]["sft"])
    assert all(h["sft_only"] == 0.0 for h in results["curves"]["dpo"])


def test_rerun_resumes_without_redoing_stages(demo, monkeypatch):
    """Finished stages are read back, not recomputed: generation would fail here if called."""
    from diffdpo.worlds.soundworld import demo as demo_module
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    cfg, results = demo
    monkeypatch.setattr(TangoPipeline, "sample_latents",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    again = demo_module.run_demo(cfg)
    assert again["table"] == results["table"]


def test_rerun_with_other_settings_is_refused(demo, tmp_path):
    """A changed stage setting must not silently reuse the old stage's output."""
    import dataclasses

    from diffdpo.worlds.soundworld import demo as demo_module

    cfg, _ = demo
    changed = dataclasses.replace(cfg, dpo={"train": {"per_device_batch": 2, "max_steps": 3}})
    with pytest.raises(ValueError, match="other settings"):
        demo_module.run_demo(changed)


def test_results_table_against_hand_numbers():
    """The table's means, paired deltas and FAD, from tiny hand-made evaluations."""
    from diffdpo.metrics.frechet import frechet_distance
    from diffdpo.worlds.soundworld.demo import results_table
    from diffdpo.worlds.soundworld.scenes import SEQUENCE, SINGLE, Scene

    scenes = [Scene(SEQUENCE, ("dog", "bell"), "a"), Scene(SINGLE, ("dog",), "b"),
              Scene(SEQUENCE, ("bell", "dog"), "c"), Scene(SINGLE, ("rain",), "d")]
    rng = np.random.default_rng(0)

    def ev(sat, order):
        rows = [{"satisfied": s, "order_correct": o, "events_exact": True, "presence_f1": 1.0, "clap": 0.5}
                for s, o in zip(sat, order)]
        return {"rows": rows, "embeddings": rng.normal(size=(4, 3))}

    evals = {"base": ev([0, 1, 0, 1], [False, None, False, None]), "dpo": ev([1, 1, 1, 0], [True, None, True, None])}
    ref = rng.normal(size=(10, 3))
    table = {r["key"]: r for r in results_table(evals, scenes, ref, 100)}
    assert table["satisfied"]["models"]["base"]["mean"] == 0.5 and table["satisfied"]["models"]["dpo"]["mean"] == 0.75
    assert table["satisfied"]["deltas"]["dpo - base"]["mean"] == pytest.approx(0.25)
    assert table["order_correct"]["n"] == 2 and table["order_correct"]["models"]["dpo"]["mean"] == 1.0
    assert table["single_event"]["n"] == 2 and table["single_event"]["models"]["base"]["mean"] == 1.0
    assert table["fad"]["models"]["base"]["mean"] == pytest.approx(frechet_distance(ref, evals["base"]["embeddings"]))
    assert set(table["satisfied"]["deltas"]) == {"dpo - base"}


def test_validation_split_reuses_the_models_and_keeps_the_test_files(demo, monkeypatch):
    """Settings are chosen on validation captions: the same pairs and models, evaluated on other
    captions into their own files, the test split's untouched; training captions are refused."""
    import dataclasses
    from pathlib import Path

    from diffdpo.diffusion import trainer
    from diffdpo.errors import ConfigError
    from diffdpo.worlds.soundworld.dataset import clips
    from diffdpo.worlds.soundworld.demo import DemoConfig, EvalSettings, run_demo

    cfg, results = demo
    out = Path(cfg.out)
    test_rows = (out / "eval" / "base" / "rows.json").read_text()
    monkeypatch.setattr(trainer, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    val = run_demo(dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, split="validation")))
    rows = json.loads((out / "eval_validation" / "base" / "rows.json").read_text())
    want, _ = clips(cfg.data_seed, "validation", cfg.evaluate.captions)
    test, _ = clips(cfg.data_seed, "test", cfg.evaluate.captions)
    assert rows["settings"]["captions"] == [s.caption for s in want] != [s.caption for s in test]
    assert (out / "eval" / "base" / "rows.json").read_text() == test_rows
    assert json.loads((out / "results.json").read_text())["table"] == json.loads(json.dumps(results["table"]))
    assert json.loads((out / "results_validation.json").read_text())["table"] == json.loads(json.dumps(val["table"]))
    assert (out / "report_validation.html").is_file()
    assert all(rel.startswith("eval_validation/") for ex in val["examples"] for rel in ex["media"].values())
    with pytest.raises(ConfigError, match="evaluate.split"):
        from_dict(DemoConfig, {"evaluate": {"split": "train"}})
    assert EvalSettings().split == "test"
    assert run_demo(cfg)["table"] == results["table"]  # back to the test split: read back, demo_config.yaml restored


def test_base_picks_generator_and_proxy_clap_together(tmp_path):
    """`base: weak` generates with the weak-caption generator and scores with the CLAP learnt from the
    same captions; the clean base keeps the builder's defaults; an unknown base is refused."""
    from diffdpo.errors import ConfigError
    from diffdpo.worlds.soundworld import BASES
    from diffdpo.worlds.soundworld.demo import DemoConfig, _model_dir, prefs_config

    clean = prefs_config(DemoConfig(), tmp_path)
    assert clean.generator.path is None and clean.scorer.ckpt is None
    weak_cfg = from_dict(DemoConfig, {"base": "weak"})
    weak = prefs_config(weak_cfg, tmp_path)
    assert weak.generator.path == str(BASES["weak"] / "generator") == _model_dir(weak_cfg, tmp_path, "base")
    assert weak.scorer.ckpt == str(BASES["weak"] / "clap") == str(weak_cfg.clap_dir)
    named = prefs_config(from_dict(DemoConfig, {"base": "weak", "prefs": {"scorer": {"ckpt": "my_clap"}}}), tmp_path)
    assert named.scorer.ckpt == "my_clap"
    with pytest.raises(ConfigError, match="base"):
        from_dict(DemoConfig, {"base": "noisy"})


def test_recipe_yaml_is_the_command_default():
    """`diffdpo demo` alone and `--config recipes/configs/soundworld_demo.yaml` run the same job."""
    from pathlib import Path

    from diffdpo.config import load_config
    from diffdpo.worlds.soundworld.demo import DemoConfig

    yaml_path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "soundworld_demo.yaml"
    assert load_config(DemoConfig, yaml_path) == DemoConfig()


def test_sweep_evaluates_checkpoints_against_the_demos_base(demo, tmp_path):
    """recipes/soundworld_sweep.py on the reduced demo: every (run, step) is evaluated on the
    demo's captions and seeds; the base row's deltas are zero by construction."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import soundworld_sweep

    cfg, _ = demo
    report = soundworld_sweep.main([f"demo={cfg.out}", f"out={tmp_path / 'sweep'}", "steps=[1,2]",
                                    "runs={dpo: {}, dpo_sft: {loss: {sft_weight: 10.0}}}"])
    assert [(r["run"], r["step"]) for r in report["table"]] == [("dpo", 1), ("dpo", 2), ("dpo_sft", 1), ("dpo_sft", 2)]
    assert report["base"]["oracle_satisfied"]["delta_vs_base"] == 0.0
    assert report["base"]["oracle_presence_f1"]["delta_vs_base"] == 0.0
    base_rows = json.loads((Path(cfg.out) / "eval" / "base" / "rows.json").read_text())["rows"]
    for row in report["table"]:
        assert row["oracle_satisfied"]["n"] == cfg.evaluate.captions
        assert -1 <= row["proxy_clap"]["delta_vs_base"] <= 1
        rows = json.loads((tmp_path / "sweep" / row["run"] / "eval" / f"step_{row['step']}" / "rows.json").read_text())
        f1 = [r["presence_f1"] for r in rows["rows"]]
        assert row["oracle_presence_f1"]["mean"] == pytest.approx(sum(f1) / len(f1))
        assert row["oracle_presence_f1"]["delta_vs_base"] == pytest.approx(
            (sum(f1) - sum(r["presence_f1"] for r in base_rows)) / len(f1))
    assert (tmp_path / "sweep" / "sweep.md").read_text().count("\n") == 6
    # asked for a later step, a finished run continues from its last checkpoint instead of starting over
    longer = soundworld_sweep.main([f"demo={cfg.out}", f"out={tmp_path / 'sweep'}", "steps=[2,3]", "runs={dpo: {}}"])
    assert [r["step"] for r in longer["table"]] == [2, 3]
    assert (tmp_path / "sweep" / "dpo" / "checkpoints" / "step_3").is_dir()
    # other evaluation settings: the base is evaluated anew beside the runs, the trained runs are reused
    fewer = cfg.evaluate.captions - 2
    other = soundworld_sweep.main([f"demo={cfg.out}", f"out={tmp_path / 'sweep'}", "steps=[2]", "runs={dpo: {}}",
                                   f"evaluate.captions={fewer}"])
    assert other["table"][0]["oracle_satisfied"]["n"] == fewer
    assert (tmp_path / "sweep" / f"base_eval_test_{fewer}c_2s_g3.0_seed1234" / "rows.json").is_file()
    assert (tmp_path / "sweep" / "dpo" / f"eval_test_{fewer}c_2s_g3.0_seed1234" / "step_2" / "rows.json").is_file()
