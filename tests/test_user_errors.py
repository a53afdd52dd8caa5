"""User mistakes are one line on stderr and exit code 2; bugs keep their traceback.

Each case runs the real entry point in a subprocess (``diffdpo <command>`` or ``python recipes/<x>.py``)
with a mistake that is found before any model loads: a missing config file, a missing input file, an
unknown config key, a value of the wrong type or outside a config's choices. The one stderr line must
start with ``<prog>: error:`` and name the key or file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffdpo.config import load_config
from diffdpo.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("DIFFDPO_TRACEBACK", None)

# How an entry point is started: ``diffdpo`` (python -m diffdpo) or a recipe script.
CLI, PRETRAIN = "cli", "recipes/soundworld_pretrain.py"


def argv_of(entry: str, args: list[str]) -> list[str]:
    return [PY, "-m", "diffdpo", *args] if entry == CLI else [PY, entry, *args]


def run(argv: list[str], **env) -> SimpleNamespace:
    p = subprocess.run(argv, cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=300)
    return SimpleNamespace(code=p.returncode, out=p.stdout, err=p.stderr, lines=p.stderr.strip().splitlines())


def cases(tmp: Path) -> dict[str, tuple[str, list[str], str, list[str]]]:
    """id -> (entry point, arguments, prog, substrings the one stderr line must contain)."""
    nope = str(tmp / "nope.yaml")
    prefs = ["prefs", "build", "--config", "recipes/configs/prefs_tiny.yaml", f"captions={tmp / 'captions.txt'}",
             f"out={tmp / 'set'}"]
    train = ["--config", "recipes/configs/tiny_sd15.yaml", f"train.output_dir={tmp / 'run'}",
             f"model.name_or_path={tmp / 'model'}", f"data.path={tmp / 'data'}"]
    tango = ["--config", "recipes/configs/tango2_dpo.yaml", f"train.output_dir={tmp / 'run'}",
             f"model.name_or_path={tmp / 'tango2'}", f"data.path={tmp}"]
    demo = ["demo", f"out={tmp / 'demo_run'}"]
    clap = ["eval", "clap", "--out", str(tmp / "clap.json"), "--audio"]
    prompts = [str(tmp / "audio"), "--prompts", str(tmp / "prompts.jsonl")]
    dpo, llm, sweep, tw = ("recipes/diffusion_dpo.py", "recipes/llm_dpo.py", "recipes/soundworld_sweep.py",
                           "recipes/textworld_llm.py")
    llm_args = ["--config", "recipes/configs/llm_tiny.yaml", f"train.output_dir={tmp / 'llm'}"]
    sweep_args = ["--config", "recipes/configs/soundworld_sweep.yaml", f"out={tmp / 'sweep'}"]
    pre = ["--config", "recipes/configs/soundworld_pretrain.yaml", f"output_dir={tmp / 'w'}", f"work_dir={tmp / 'wd'}"]
    found = ["config file not found", nope]
    return {
        "prefs/config": (CLI, ["prefs", "build", "--config", nope], "diffdpo prefs build", found),
        "prefs/input": (CLI, [*prefs, f"captions={tmp / 'missing.txt'}"], "diffdpo prefs build",
                        ["captions", "missing.txt"]),
        "prefs/import": (CLI, ["prefs", "import", "trl", str(tmp / "pairs_without_rejected.jsonl"), str(tmp / "p.jsonl")],
                         "diffdpo prefs import", ["pairs_without_rejected.jsonl", "missing rejected"]),
        "prefs/key": (CLI, [*prefs, "scorer.nope=1"], "diffdpo prefs build",
                      ["override 'scorer.nope=1'", "unknown config key", "'scorer.nope'"]),
        "prefs/type": (CLI, [*prefs, "num_samples=many"], "diffdpo prefs build", ["num_samples: expected int", "'many'"]),
        "prefs/choice": (CLI, [*prefs, "temporal.kinds=[drop_event]"], "diffdpo prefs build",
                         ["override 'temporal.kinds=[drop_event]'", "swap_order"]),
        "train/config": (CLI, ["train", "--config", nope], "diffdpo train", found),
        "train/input": (CLI, ["train", *tango], "diffdpo train", ["tango2'", "local folder"]),
        "train/data": (CLI, ["train", *tango, f"data.path={tmp / 'no_data'}"], "diffdpo train",
                       ["data.path", "no_data"]),
        "train/key": (CLI, ["train", *train, "train.nope=1"], "diffdpo train", ["unknown config key", "'train.nope'"]),
        "train/type": (CLI, ["train", *train, "train.lr=fast"], "diffdpo train", ["train.lr: expected float", "'fast'"]),
        "train/choice": (CLI, ["train", *train, "loss.type=nope"], "diffdpo train",
                         ["override 'loss.type=nope'", "sigmoid"]),
        "demo/config": (CLI, ["demo", "--config", nope], "diffdpo demo", found),
        "demo/input": (CLI, [*demo, f"base_model={tmp / 'base'}"], "diffdpo demo", [str(tmp / "base"), "model folder"]),
        "demo/key": (CLI, [*demo, "evaluate.nope=1"], "diffdpo demo", ["unknown config key", "'evaluate.nope'"]),
        "demo/type": (CLI, [*demo, "train_kinds=5"], "diffdpo demo", ["train_kinds: expected a list", "5"]),
        # diffdpo eval has no config file: its inputs and settings are flags
        "eval/input": (CLI, [*clap, str(tmp / "no_audio")], "diffdpo eval clap", ["no_audio"]),
        "eval/prompts": (CLI, [*clap, str(tmp / "audio"), "--prompts", str(tmp / "no_prompts.jsonl")],
                         "diffdpo eval clap", ["no_prompts.jsonl"]),
        "eval/choice": (CLI, [*clap, *prompts, "--backend", "nope"], "diffdpo eval clap",
                        ["unknown CLAP backend", "nope"]),
        "eval/value": (CLI, [*clap, *prompts, "--backend-arg", "nope"], "diffdpo eval clap", ["--backend-arg", "nope"]),
        "diffusion_dpo/config": (dpo, ["--config", nope], "diffusion_dpo.py", found),
        "diffusion_dpo/input": (dpo, tango, "diffusion_dpo.py", ["tango2'", "local folder"]),
        "diffusion_dpo/key": (dpo, [*train, "train.nope=1"], "diffusion_dpo.py", ["unknown config key", "'train.nope'"]),
        "diffusion_dpo/type": (dpo, [*train, "train.mixed_precision=[fp16]"], "diffusion_dpo.py",
                               ["train.mixed_precision: expected a string"]),
        "diffusion_dpo/choice": (dpo, [*train, "train.timestep_range=[0.6, 0.4]"], "diffusion_dpo.py",
                                 ["override 'train.timestep_range=[0.6, 0.4]'", "train.timestep_range"]),
        "llm_dpo/config": (llm, ["--config", nope], "llm_dpo.py", found),
        "llm_dpo/input": (llm, [*llm_args, f"data.train_path={tmp / 'pairs.jsonl'}"], "llm_dpo.py",
                          ["data.train_path", "pairs.jsonl"]),
        "llm_dpo/key": (llm, [*llm_args, "loss.betta=0.1"], "llm_dpo.py", ["unknown config key", "'loss.betta'"]),
        "llm_dpo/type": (llm, [*llm_args, "train.resume=maybe"], "llm_dpo.py", ["train.resume: expected true or false"]),
        "llm_dpo/choice": (llm, [*llm_args, "loss.type=dpo"], "llm_dpo.py", ["override 'loss.type=dpo'", "sigmoid"]),
        "sweep/config": (sweep, ["--config", nope], "soundworld_sweep.py", found),
        "sweep/input": (sweep, [*sweep_args, f"demo={tmp / 'no_demo'}"], "soundworld_sweep.py", ["demo:", "no_demo"]),
        "sweep/key": (sweep, [*sweep_args, f"demo={tmp / 'demo'}", "runs.dpo.nope=1"], "soundworld_sweep.py",
                      ["runs.dpo", "unknown config key", "'nope'"]),
        "sweep/type": (sweep, [*sweep_args, "steps=many"], "soundworld_sweep.py", ["steps: expected a list", "'many'"]),
        # recipes/textworld_llm.py has flags only
        "textworld/choice": (tw, ["--out", str(tmp / "tw"), "--methods", "nope"], "textworld_llm.py",
                             ["--methods", "nope", "dpo_proxy"]),
        "textworld/value": (tw, ["--out", str(tmp / "tw"), "--steps", "2"], "textworld_llm.py", ["--steps", ">= 4"]),
        "pretrain/config": (PRETRAIN, ["--config", nope], "soundworld_pretrain.py", found),
        "pretrain/key": (PRETRAIN, [*pre, "oracle.nope=1"], "soundworld_pretrain.py",
                         ["unknown config key", "'oracle.nope'"]),
        "pretrain/type": (PRETRAIN, [*pre, "threads=two"], "soundworld_pretrain.py", ["threads: expected int", "'two'"]),
        "pretrain/choice": (PRETRAIN, [*pre, "stages=[nope]"], "soundworld_pretrain.py", ["unknown stage", "'nope'"]),
    }


CASE_IDS = list(cases(Path(".")))
# one case per entry point also runs as its own process: the exit code and stderr the user sees
PROCESS_CASES = ["prefs/config", "train/key", "demo/config", "eval/input", "diffusion_dpo/key", "llm_dpo/input",
                 "sweep/config", "textworld/choice", "pretrain/type"]

# The other cases run in one subprocess that starts each entry point in turn as its command line
# would (cli.main(argv); a recipe script as __main__ with sys.argv set, catching its SystemExit) and
# records its exit code and stderr: the same code paths, without paying torch's import 40 times.
DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
sys.path.insert(0, "recipes")
from diffdpo.cli import main as cli_main
todo, out_path, argv0 = json.loads(sys.argv[1]), sys.argv[2], list(sys.argv)
results = {}
for name, (entry, args) in todo.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if entry == "cli":
                code = cli_main(args)
            else:
                sys.argv = [entry, *args]
                runpy.run_path(entry, run_name="__main__")
                code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    sys.argv = list(argv0)
    results[name] = [code, err.getvalue()]
with open(out_path, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with what the cases need to get past their first check: captions, a clip with its prompt,
    and a finished-looking demo directory (its config only) for the sweep."""
    import numpy as np
    import soundfile as sf

    tmp = tmp_path_factory.mktemp("user_errors")
    (tmp / "captions.txt").write_text("a dog barks\n")
    (tmp / "pairs_without_rejected.jsonl").write_text('{"prompt": "p", "chosen": "a"}\n')
    (tmp / "audio").mkdir()
    sf.write(tmp / "audio" / "a.wav", (0.1 * np.sin(np.arange(8000) / 5.0)).astype("float32"), 16000)
    (tmp / "prompts.jsonl").write_text('{"id": "a", "prompt": "a tone"}\n')
    (tmp / "demo").mkdir()
    (tmp / "demo" / "demo_config.yaml").write_text(f"out: {tmp / 'demo'}\n")
    return tmp


@pytest.fixture(scope="module")
def batched(inputs) -> dict[str, SimpleNamespace]:
    todo = {name: (entry, args) for name, (entry, args, _, _) in cases(inputs).items()}
    r = run([PY, "-c", DRIVER, json.dumps(todo), str(inputs / "results.json")])
    assert r.code == 0, r.err[-3000:]
    results = json.loads((inputs / "results.json").read_text())
    return {name: SimpleNamespace(code=code, err=err, lines=err.strip().splitlines())
            for name, (code, err) in results.items()}


def check_one_line(r: SimpleNamespace, prog: str, wanted: list[str]) -> None:
    assert r.code == 2, (r.code, r.err[-3000:])
    assert len(r.lines) == 1, r.err[-3000:]
    line = r.lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for text in wanted:
        assert text in line, (text, line)


@pytest.mark.parametrize("case", CASE_IDS)
def test_user_mistake_is_one_line_and_exit_code_2(case, inputs, batched):
    _, _, prog, wanted = cases(inputs)[case]
    check_one_line(batched[case], prog, wanted)


@pytest.mark.parametrize("case", PROCESS_CASES)
def test_user_mistake_as_its_own_process(case, inputs):
    entry, args, prog, wanted = cases(inputs)[case]
    check_one_line(run(argv_of(entry, args)), prog, wanted)


def test_traceback_on_request(inputs):
    """DIFFDPO_TRACEBACK=1 shows where a user mistake was raised (for debugging)."""
    r = run(argv_of(CLI, ["prefs", "build", "--config", str(inputs / "nope.yaml")]), DIFFDPO_TRACEBACK="1")
    assert r.code == 1 and "Traceback" in r.err and "ConfigFileNotFoundError" in r.err


def test_a_bug_in_a_subcommand_keeps_its_traceback():
    code = ("import sys, diffdpo.commands.losses as m, diffdpo.cli as cli\n"
            "def run(args):\n    return {}['no such key']\n"
            "m.run = run\nsys.exit(cli.main(['losses']))\n")
    r = run([PY, "-c", code])
    assert r.code == 1, r.err
    assert "Traceback" in r.err and "KeyError: 'no such key'" in r.err


def test_a_bug_in_a_recipe_keeps_its_traceback(tmp_path):
    """A ValueError that is not a config mistake (here raised by a patched ``train``) is a bug."""
    code = ("import runpy, sys\nimport diffdpo.diffusion.trainer as t\n"
            "def train(cfg, resume=False):\n    raise ValueError('an internal invariant broke')\n"
            "t.train = train\n"
            f"sys.argv = ['recipes/diffusion_dpo.py', '--config', 'recipes/configs/tiny_sd15.yaml', "
            f"'train.output_dir={tmp_path / 'run'}']\n"
            "runpy.run_path('recipes/diffusion_dpo.py', run_name='__main__')\n")
    r = run([PY, "-c", code])
    assert r.code == 1, r.err
    assert "Traceback" in r.err and "ValueError: an internal invariant broke" in r.err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- config loading, in process


def test_config_errors_say_where_the_key_was_set(tmp_path):
    from diffdpo.llm.trainer import LLMDPOConfig

    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  betta: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown config key\(s\) \['loss.betta'\]") as e:
        load_config(LLMDPOConfig, path)
    assert e.value.keys == ["loss.betta"]
    with pytest.raises(ConfigError, match=r"^override 'train.lr=x': train.lr: expected float, got 'x'$"):
        load_config(LLMDPOConfig, None, ["train.lr=x"])
    path.write_text("loss: {beta: [1, 2]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid YAML: .* at line 2"):
        load_config(LLMDPOConfig, path)


def test_config_types_are_checked(tmp_path):
    from diffdpo.diffusion.trainer import DiffusionDPOConfig

    base = ["model.name_or_path=m"]
    for override, message in [("train.max_steps=1.5", "train.max_steps: expected int, got 1.5"),
                              ("train.scale_lr=maybe", "train.scale_lr: expected true or false"),
                              ("train=3", "train: expected a mapping"),
                              ("train.timestep_range=x", "train.timestep_range: expected a list"),
                              ("train.timestep_range=[0.1, low]", r"train.timestep_range\[1\]: expected float"),
                              ("model.name_or_path=[a]", "model.name_or_path: expected a string")]:
        with pytest.raises(ConfigError, match=message):
            load_config(DiffusionDPOConfig, None, [*base, override])
    cfg = load_config(DiffusionDPOConfig, None, [*base, "train.mixed_precision=no", "train.scale_lr=yes",
                                                 "train.lr=1e-5", "train.max_steps=10"])
    assert (cfg.train.mixed_precision, cfg.train.scale_lr, cfg.train.lr, cfg.train.max_steps) == ("no", True, 1e-5, 10)
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ntrain: {mixed_precision: no}\n")  # YAML 1.1: unquoted no is False
    with pytest.raises(ConfigError, match="quote it"):
        load_config(DiffusionDPOConfig, path)


def test_user_error_types_stay_compatible():
    """ConfigError is a ValueError and a missing config a FileNotFoundError, as callers caught before."""
    with pytest.raises(FileNotFoundError):
        load_config(dict, "does/not/exist.yaml")
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)
