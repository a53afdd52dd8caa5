"""The README runs as written.

**Executed.** Every command of every fenced ``bash`` block in the README's task sections (all ``##``
sections after "Set up") runs, in README order, with ``bash -c`` in one temporary working directory
that ``tests/helpers/readme_fixtures.py`` prepares (its docstring lists each stand-in):

* what the README downloads is already there, tiny and in the published layout: the Tango checkpoint
  folder ``models/tango-full-ft-audiocaps`` (Tango's six files, ``main_config.json`` naming
  ``google/flan-t5-large``, whose config and tokenizer sit in the Hugging Face cache), the AudioLDM,
  AudioLDM2, SD 1.5 and SDXL repositories in the cache under their hub ids
  (``hub_layouts.build_from_published``), ``models/clap-htsat-unfused`` and
  ``models/clip-vit-large-patch14`` (tiny transformers CLAP / CLIP), the Zephyr SFT model id (a
  2-layer Llama), ``data/audio-alpaca`` and ``data/pickapic_v2`` (a few rows in the published schema
  and shard names), ``data/pairs/*.parquet`` (TRL-layout text pairs), ``captions.txt``, and the
  inputs the evaluation commands name (``samples/...``, ``prompts.jsonl``, ``data/audiocaps-test``);
* ``hf download`` runs too: offline (``HF_HUB_OFFLINE=1``) it returns the existing ``--local-dir``
  folder or the cached snapshot;
* ``recipes/`` and ``scripts/`` are links to the repository's.

**Changed**, and nothing else (``readme_fixtures.prepare``; every prepared command is printed):
``accelerate launch --num_processes N`` runs with one process (no GPU here, so the 16- and 8-GPU
commands are checked with one CPU process); the builder and the two training recipes get speed
overrides appended (before a trailing ``--resume``): ``readme_fixtures.PREFS_OVERRIDES``,
``DIFFUSION_OVERRIDES`` (+ ``DIFFUSION_FAMILY_OVERRIDES`` per config, + ``train.max_steps=2`` on a
resume, one step past the run it continues) and ``LLM_OVERRIDES``. So a renamed flag, config key,
file or folder breaks this test.

**Checked, not executed:** the two set-up commands (``bash scripts/run.sh demo`` is the 12-14 minute
demo that ``tests/test_soundworld_demo.py`` covers at small size; ``bash scripts/run.sh test`` is this
suite): they must be the README's first commands and cases of ``scripts/run.sh``.

Also: ``diffdpo --help`` and each subcommand's help name exactly the commands the README lists, the
loss table equals the one generated from ``diffdpo.losses``, and every relative link (and anchor)
resolves.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.readme_fixtures import (
    DIFFUSION_OVERRIDES,
    LLM_ONLINE_OVERRIDES,
    LLM_OVERRIDES,
    PREFS_OVERRIDES,
    TEXTWORLD_ONLINE_OVERRIDES,
    build_workspace,
    loss_table,
    prepare,
    readme_blocks,
)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = readme_blocks(README)
SETUP = "Set up"
TASK_SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS if not b.section.startswith(SETUP)))

# What each section's commands must leave behind (paths relative to the workspace).
OUTPUTS = {
    "Build": ["runs/prefs/prefs.jsonl", "runs/prefs/manifest.json"],
    "Fine-tune": ["runs/tango2_dpo/final/model_index.json", "models/tango2-mine/pytorch_model_main.bin",
                  "models/tango-diffusers/vocoder/config.json", "runs/tango2_mine/final/model_index.json",
                  "runs/audioldm_dpo/final/model_index.json", "runs/audioldm2_dpo/final/model_index.json",
                  "runs/sets/pickapic/prefs.jsonl", "runs/sd15_dpo/final/model_index.json",
                  "runs/sdxl_lora_dpo/final/pytorch_lora_weights.safetensors"],
    "Evaluate": ["clap_score.json", "fad.json", "image_score.json", "results.md"],
    "Align": ["data/train_prefs.jsonl", "runs/zephyr_dpo/final/config.json", "llm_eval.json"],
    "Scale out": ["runs/sdxl_lora_dpo/checkpoints/step_2"],
}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Runs every task section's commands once, in README order; returns {section: failure or None}."""
    ws = build_workspace(tmp_path_factory.mktemp("readme") / "ws")
    results: dict[str, str | None] = {}
    for section in TASK_SECTIONS:
        results[section] = None
        for block in (b for b in BLOCKS if b.section == section):
            for command in block.commands:
                prepared = prepare(command)
                start = time.monotonic()
                run = subprocess.run(["bash", "-c", prepared], cwd=ws.root, env=ws.env, capture_output=True,
                                     text=True, timeout=600)
                print(f"[{time.monotonic() - start:5.1f} s] README line {block.line}: {prepared}", flush=True)
                if run.returncode != 0:
                    results[section] = (f"README block at line {block.line}: `{prepared}` exited {run.returncode}\n"
                                        f"{run.stdout[-1500:]}\n{run.stderr[-3000:]}")
                    break
            if results[section]:
                break
    return ws, results


@pytest.mark.parametrize("section", TASK_SECTIONS)
def test_section_commands_run(executed, section):
    ws, results = executed
    assert results[section] is None, results[section]
    key = next((k for k in OUTPUTS if section.startswith(k)), None)
    assert key is not None, f"new README section {section!r}: say in OUTPUTS what its commands write"
    missing = [p for p in OUTPUTS[key] if not (ws.root / p).exists()]
    assert not missing, f"{section}: expected outputs missing: {missing}"


def test_outputs_hold_what_the_readme_says(executed):
    """A few contents, not just files: pairs were built, the comparison file holds both runs, FAD-inf
    was computed, the Tango model went back to Tango's six files, the resumed run reached step 2."""
    import json

    ws, results = executed
    if any(results.values()):
        pytest.skip("a section failed (reported by its own test)")
    root = ws.root
    assert json.loads((root / "runs/prefs/manifest.json").read_text())["pairs"] >= 1
    assert (root / "results.md").read_text().count("CLAP score") == 2
    assert json.loads((root / "fad.json").read_text()).get("fad_inf") is not None
    assert sorted(p.name for p in (root / "models/tango2-mine").glob("*.bin")) == \
        ["pytorch_model_main.bin", "pytorch_model_stft.bin", "pytorch_model_vae.bin"]
    assert sorted(p.name for p in (root / "runs/sdxl_lora_dpo/checkpoints").iterdir()) == ["step_1", "step_2"]


def test_setup_commands_come_first_and_are_run_sh_cases():
    first = BLOCKS[0]
    assert first.section.startswith(SETUP)
    assert first.commands == ["bash scripts/run.sh demo", "bash scripts/run.sh test"]
    run_sh = (ROOT / "scripts" / "run.sh").read_text()
    assert re.search(r"^\s*demo\)", run_sh, re.M) and re.search(r"^\s*test\)", run_sh, re.M)
    assert all(not b.section.startswith(SETUP) for b in BLOCKS[1:]), "one set-up block, first"


def test_prepare_only_adds_the_documented_changes():
    for block in BLOCKS:
        for command in block.commands:
            prepared = prepare(command)
            base = re.sub(r"accelerate launch --num_processes \d+", "accelerate launch --num_processes 1", command)
            head = base[:-len(" --resume")] if base.endswith(" --resume") else base
            assert prepared.startswith(head), (command, prepared)
            added = prepared[len(head):].replace(" --resume", "").split()
            allowed = set(PREFS_OVERRIDES) | set(DIFFUSION_OVERRIDES) | set(LLM_OVERRIDES) | \
                set(TEXTWORLD_ONLINE_OVERRIDES) | set(LLM_ONLINE_OVERRIDES) | {
                "model.audio_seconds=1", "loss.sft_epochs=0", "model.resolution=32", "train.optimizer=adamw",
                "train.max_steps=2"}
            assert set(added) <= allowed, (command, added)


# ------------------------------------------------------------------ help and README name the same commands


def _help(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "diffdpo", *args, "--help"], capture_output=True, text=True,
                          check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout


def _subcommands(help_text: str) -> list[str]:
    """The sub-parser choices argparse lists under 'positional arguments' (4-space indent)."""
    section = help_text.split("positional arguments:", 1)[1].split("options:", 1)[0] \
        if "positional arguments:" in help_text else ""
    return [m.group(1) for m in re.finditer(r"^    ([a-z][\w-]*)(?:\s|$)", section, re.M)]


def _readme_listing() -> dict[str, set[str]]:
    """The command list in the set-up paragraph: `diffdpo prefs {build,...}`, `train`, ..."""
    para = README.split("source .venv/bin/activate`", 1)[1].split("\n\n", 1)[0]
    listed: dict[str, set[str]] = {}
    for span in re.findall(r"`([^`]+)`", para):
        m = re.fullmatch(r"(?:diffdpo )?([a-z][\w-]*)(?: \{([\w,-]+)\})?", span)
        if m:
            listed[m.group(1)] = set(m.group(2).split(",")) if m.group(2) else set()
    return listed


def test_help_and_readme_name_the_same_commands():
    top = _subcommands(_help())
    listed = _readme_listing()
    assert set(listed) == set(top), f"README lists {sorted(listed)}; diffdpo --help: {sorted(top)}"
    for name in top:
        actions = set(_subcommands(_help(name)))
        assert listed[name] == actions, f"diffdpo {name}: README lists {sorted(listed[name])}, help {sorted(actions)}"
    # and every `diffdpo X [Y]` the README's code (blocks and inline spans) uses exists
    code = "\n".join(re.findall(r"```\w*\n(.*?)```", README, re.S) + re.findall(r"`([^`\n]+)`", README))
    for name, action in re.findall(r"\bdiffdpo ([a-z][\w-]*)(?: ([a-z][\w-]*))?", code):
        assert name in listed, f"README uses `diffdpo {name}`, which diffdpo --help does not list"
        if listed[name] and action:
            assert action in listed[name], f"README uses `diffdpo {name} {action}`"


# ------------------------------------------------------------------ the generated loss table, links


def test_loss_table_is_the_generated_one():
    m = re.search(r"<!-- loss-table:[^\n]*-->\n(.*?)\n<!-- /loss-table -->", README, re.S)
    assert m, "README: the loss table markers are missing"
    assert m.group(1) == loss_table(), "regenerate with: python tests/helpers/readme_fixtures.py"


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        assert file.exists(), f"README links {target}: no {file}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, f"README links {target}: no such heading in {path}"
