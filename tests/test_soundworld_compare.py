"""``diffdpo soundworld compare``, reduced (6 captions, 2-step trainings, 8 held-out captions) on the shipped
weak base turned rectified flow (its weights with a flow schedule: the Euler sampler, the velocity target and
the flow log-ratios all run, the numbers mean nothing): four losses on one preference set, each saved at two checkpoints, every model judged on the same
captions and seeds with paired differences; the test split then evaluates only the models named, reading the
set and the trainings back; mistakes are one line before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_METHOD = """\
base: weak
base_model: BASE_MODEL
train_captions: 6
prefs:
  num_samples: 2
  shard_size: 3
  generator: {num_inference_steps: 2, batch_size: 16}
  multi_sample: {min_gap: 0.0}
  perturbed: {min_gap: -1.0, num_perturbations: 1}
  temporal: {min_gap: -1.0, samples_per_perturbation: 1}
dpo:
  loss: {type: sigmoid, beta: 5000, beta_convention: tango2}
  train: {per_device_batch: 2, lr: 1.0e-4}
evaluate: {captions: 8, steps: 2, batch_size: 8, examples: 2, bootstrap: 50}
"""
ARMS = ("arms={dpo: {}, mapo: {loss: {type: mapo, beta: 0.1, beta_convention: core}}, "
        "kto: {loss: {type: kto, beta: 1000, beta_convention: core}, train: {per_device_batch: 4}}, sft: {}}")


def _args(tmp: Path, *extra: str) -> list[str]:
    return [f"method={tmp / 'method.yaml'}", f"out={tmp / 'run'}", ARMS, "checkpoints=[1,2]", "primary=dpo",
            "evaluate={split: validation, captions: 8}", "threads=1", *extra]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from diffdpo.config import load_config
    from diffdpo.worlds.soundworld.compare import CompareConfig, run_compare

    import shutil

    from diffdpo.worlds.soundworld import BASES
    from diffdpo.worlds.soundworld.components import build_scheduler

    tmp = tmp_path_factory.mktemp("compare")
    shutil.copytree(BASES["weak"] / "generator", tmp / "flow_base")
    build_scheduler("flow_matching").save_pretrained(tmp / "flow_base" / "scheduler")
    (tmp / "method.yaml").write_text(TINY_METHOD.replace("BASE_MODEL", str(tmp / "flow_base")))
    cfg = load_config(CompareConfig, None, _args(tmp))
    return tmp, cfg, run_compare(cfg)


def test_every_arm_at_every_checkpoint_with_paired_deltas(compared):
    tmp, cfg, results = compared
    saved = json.loads((tmp / "run" / "results_validation.json").read_text())
    assert saved["table"] == json.loads(json.dumps(results["table"]))
    labels = [f"{arm}@{step}" for arm in ("dpo", "mapo", "kto", "sft") for step in (1, 2)]
    others = [m for m in labels if not m.startswith("dpo@")]
    for row in results["table"]:
        assert list(row["models"]) == ["base", *labels]
        assert list(row["deltas"]) == [f"{m} - base" for m in labels] + \
            [f"dpo@{s} - {m}" for s in (1, 2) for m in others]
    md = (tmp / "run" / "results_validation.md").read_text().splitlines()
    assert len(md) == 2 + 1 + len(labels) + 2 * len(others)  # header, rule, base, models, primary's deltas
    assert md[2].startswith("| base | ") and md[-1].startswith(f"| dpo@2 - {others[-1]} | ")
    sat = next(row for row in results["table"] if row["key"] == "satisfied")
    for name, d in sat["deltas"].items():  # paired difference of the same captions = difference of the means
        a, b = name.split(" - ")
        assert d["mean"] == pytest.approx(sat["models"][a]["mean"] - sat["models"][b]["mean"]) and d["n"] == 8


def test_arms_share_the_method_and_differ_only_in_their_loss(compared):
    tmp, cfg, results = compared
    train = results["settings"]["train"]
    assert {arm: t["loss"]["type"] for arm, t in train.items()} == \
        {"dpo": "sigmoid", "mapo": "mapo", "kto": "kto", "sft": "sigmoid"}
    assert train["sft"]["loss"]["sft_epochs"] == 10**9 and train["dpo"]["loss"]["sft_epochs"] == 0
    assert train["kto"]["train"]["per_device_batch"] == 4 and train["dpo"]["train"]["per_device_batch"] == 2
    for t in train.values():  # the method's seed, lr and data; a checkpoint at each step
        assert t["train"]["lr"] == 1e-4 and t["train"]["max_steps"] == 2 and t["train"]["save_every"] == 1
        assert t["data"]["path"] == str(tmp / "run" / "prefs") and t["train"]["seed"] == 0
    from diffdpo.data.records import read_jsonl

    records = list(read_jsonl(tmp / "run" / "prefs" / "prefs.jsonl"))
    clips = {path for r in records for path in (r.chosen, r.rejected)}  # KTO reads each clip once, labelled
    n = len(records)
    assert results["settings"]["pairs_read"] == {"dpo": n, "mapo": n, "kto": len(clips), "sft": n}
    assert all(len(results["curves"][arm]) == 2 for arm in train)  # one history entry per step
    html = (tmp / "run" / "report_validation.html").read_text()
    assert "dpo@2 - mapo@2" in html and "oracle: caption satisfied" in html
    for ex in results["examples"]:
        assert set(ex["media"]) == {"base", *[f"{a}@{s}" for a in train for s in (1, 2)]}
        assert all((tmp / "run" / rel).is_file() for rel in ex["media"].values())


def test_last_checkpoint_is_the_final_model(compared):
    from safetensors.torch import load_file

    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld.compare import checkpoint_pipeline

    tmp, cfg, results = compared
    run = tmp / "run" / "mapo"
    trained = TangoPipeline.from_pretrained(run / "final")
    assert type(trained.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    final = trained.unet.state_dict()
    loaded = checkpoint_pipeline(results["settings"]["models"]["base"], run / "checkpoints" / "step_2").unet.state_dict()
    first = load_file(run / "checkpoints" / "step_1" / "trainable.safetensors")
    assert all(torch.equal(final[k], loaded[k]) for k in final)
    assert any(not torch.equal(first[k], final[k]) for k in first)  # the two checkpoints differ


def test_test_split_evaluates_the_named_models_and_trains_nothing(compared, monkeypatch):
    from diffdpo.config import load_config
    from diffdpo.diffusion import trainer
    from diffdpo.prefs import build
    from diffdpo.worlds.soundworld.compare import CompareConfig, run_compare

    tmp, cfg, results = compared
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("redone"))
    monkeypatch.setattr(trainer, "train", boom)
    monkeypatch.setattr(build, "build_shard", boom)
    final = run_compare(load_config(CompareConfig, None, _args(
        tmp, "models=[dpo@2,kto@1]", "evaluate={split: test, captions: 8}")))
    for row in final["table"]:
        assert list(row["models"]) == ["base", "dpo@2", "kto@1"]
        assert list(row["deltas"]) == ["dpo@2 - base", "kto@1 - base", "dpo@2 - kto@1"]
    assert set(final["settings"]["train"]) == {"dpo", "kto"}  # arms with no model named are not even read back
    assert (tmp / "run" / "results.json").is_file() and (tmp / "run" / "eval" / "dpo" / "step_2" / "rows.json").is_file()
    assert not (tmp / "run" / "eval" / "dpo" / "step_1").exists()


def test_mistakes_are_one_line_and_exit_code_2(compared, capsys):
    from diffdpo import cli

    tmp, cfg, _ = compared
    cases = {  # args -> what the line says
        ("models=[dpo@3]",): "models",
        ("models=[nope@1]",): "models",
        ("primary=nope",): "primary",
        ("checkpoints=[0,2]",): "checkpoints",
        ("arms={dpo: {loss: {type: nope}}}",): "arms.dpo",
        ("arms={}",): "arms",
    }
    for extra, needle in cases.items():
        code = cli.main(["soundworld", "compare", *_args(tmp, *extra)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
