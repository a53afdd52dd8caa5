"""Config loading, checkpoints, preference records and the CLI entry point."""

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from diffdpo.config import load_config, parse_overrides
from diffdpo.data.records import PreferenceRecord, read_jsonl, resolve_under, write_jsonl
from diffdpo.training.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    extra: Optim | None = None

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError("steps: must be positive")


def test_config_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\noptim:\n  lr: 0.5\n")
    cfg = load_config(Cfg, path, ["optim.lr=2e-5", "steps=3", "extra.lr=1"])
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas, cfg.extra.lr) == ("run", 3, 2e-5, [0.9, 0.999], 1)
    assert parse_overrides(["a.b.c=[1, 2]", "d=true"]) == {"a": {"b": {"c": [1, 2]}}, "d": True}


def test_partial_nested_config_keeps_the_fields_own_default():
    """A nested section given in part starts from the field's default_factory, not from the
    section class's bare defaults (BuildConfig's temporal strategy is such a field)."""

    @dataclass
    class Outer:
        optim: Optim = field(default_factory=lambda: Optim(lr=0.1, betas=[0.5, 0.5]))

    cfg = load_config(Outer, None, ["optim.lr=0.2"])
    assert (cfg.optim.lr, cfg.optim.betas) == (0.2, [0.5, 0.5])


def test_dotted_override_of_a_dict_field_keeps_its_other_defaults():
    """`diffdpo demo dpo.train.max_steps=200` changes one key of the demo's dpo settings; it
    once replaced the whole dict, silently dropping the demo's beta, lr and batch."""

    @dataclass
    class Outer:
        settings: dict = field(default_factory=lambda: {"loss": {"beta": 2000, "type": "sigmoid"}, "steps": 5})

    cfg = load_config(Outer, None, ["settings.loss.beta=500"])
    assert cfg.settings == {"loss": {"beta": 500, "type": "sigmoid"}, "steps": 5}
    from diffdpo.worlds.soundworld.demo import DEFAULT_DPO, DEFAULT_PREFS, DemoConfig

    demo = load_config(DemoConfig, None, ["dpo.train.max_steps=7", "prefs.scorer.kind=my.module:Scorer"])
    assert demo.dpo["train"] == {**DEFAULT_DPO["train"], "max_steps": 7}
    assert demo.dpo["loss"] == DEFAULT_DPO["loss"]
    assert demo.prefs == {**DEFAULT_PREFS, "scorer": {"kind": "my.module:Scorer"}}


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], r"unknown config key\(s\) \['optim.lrr'\]"),
    (["steps=0"], "steps: must be positive"),
    (["novalue"], "expected key.sub=value"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(Cfg, None, overrides)


def test_config_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Cfg, "nope.yaml")


def test_checkpoint_is_atomic_and_restores_rng(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    path = save_checkpoint(tmp_path, 3, lambda d: (d / "weights.bin").write_bytes(b"w"), {"epoch": 1, "batch": 7})
    expected = (torch.rand(2), np.random.rand(2))
    # a crashed write leaves only a temp dir, which resume ignores
    (tmp_path / ".tmp_step_9_123").mkdir()
    (tmp_path / "step_x").mkdir()
    assert latest_checkpoint(tmp_path) == path
    state = load_trainer_state(path)
    assert state == {"step": 3, "epoch": 1, "batch": 7}
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    for step in (5, 10):
        save_checkpoint(tmp_path, step, lambda d: None, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_5", "step_10"]


def test_records_round_trip_and_errors(tmp_path):
    records = [PreferenceRecord("a", "a dog barks", "w/0.wav", "l/0.wav", "multi_sample", 1.0, {"score": 0.3}),
               PreferenceRecord("b", "rain falls", "w/1.wav", "l/1.wav", label=0.5)]
    path = tmp_path / "prefs.jsonl"
    assert write_jsonl(records, path) == 2
    assert list(read_jsonl(path)) == records
    path.write_text(json.dumps({"id": 1, "prompt": "p", "chosen": "c", "rejected": "r", "source": "x"}) + "\n{bad\n")
    it = read_jsonl(path)
    first = next(it)
    assert first.id == "1" and first.meta == {"source": "x"}
    with pytest.raises(ValueError, match=r"prefs.jsonl:2: invalid JSON"):
        next(it)
    path.write_text(json.dumps({"id": "z", "prompt": " ", "chosen": "c", "rejected": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"record 'z': empty prompt"):
        list(read_jsonl(path))
    path.write_text(json.dumps({"id": "z", "prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['rejected'\]"):
        list(read_jsonl(path))


def test_resolve_under_refuses_escapes(tmp_path):
    assert resolve_under(tmp_path, "a/b.wav") == (tmp_path / "a/b.wav").resolve()
    for bad in ("../x.wav", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="escapes the dataset root"):
            resolve_under(tmp_path, bad)


def test_cli_help_lists_subcommands_and_smoke_runs():
    out = subprocess.run([sys.executable, "-m", "diffdpo", "--help"], capture_output=True, text=True, check=True)
    from diffdpo.cli import SUBCOMMANDS
    for name in SUBCOMMANDS:
        assert name in out.stdout
    smoke = subprocess.run([sys.executable, "-m", "diffdpo", "smoke", "--steps", "60", "--loss-types", "sigmoid", "ipo"],
                           capture_output=True, text=True)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "sigmoid" in smoke.stdout and "ipo" in smoke.stdout


def test_config_reads_exponent_floats_yaml_leaves_as_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-5\n")
    assert load_config(Cfg, path).optim.lr == 1e-5
    with pytest.raises(ValueError, match="optim.lr: expected float"):
        load_config(Cfg, None, ["optim.lr=fast"])
