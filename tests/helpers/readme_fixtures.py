"""What ``tests/test_readme.py`` puts in place of everything the README downloads, and how it runs
the README's commands.

The README's commands name hub repositories and local folders a user downloads (``hf download ...
--local-dir models/...``). The test runs each command in a temporary working directory (the
*workspace*) whose folders and Hugging Face cache already hold tiny stand-ins in the published
layouts, so the command runs as written:

* ``models/tango-full-ft-audiocaps``: a tiny checkpoint in Tango's own six-file layout
  (``diffdpo.diffusion.tiny.tango_checkpoint``); its ``main_config.json`` names
  ``google/flan-t5-large``, whose config and tokenizer (``tiny.text_encoder_folder``) sit in the hub
  cache under that id;
* ``cvssp/audioldm-s-full-v2``, ``cvssp/audioldm2``, ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
  ``stabilityai/stable-diffusion-xl-base-1.0`` (the configs' hub ids, in the hub cache):
  ``diffdpo.diffusion.hub_layouts.build_from_published``, each repository's exact layout
  (``model_index.json``, sub-folders, published configs) with shrunk widths and random weights;
* ``models/clap-htsat-unfused``, ``models/clip-vit-large-patch14``: a tiny transformers ``ClapModel``
  + ``ClapProcessor`` and ``CLIPModel`` + ``CLIPProcessor`` (``tests/metrics_helpers.py``);
* ``alignment-handbook/zephyr-7b-sft-full`` (hub cache): a 2-layer Llama and a byte-level BPE
  tokenizer with a chat template (``diffdpo.llm.tiny``);
* ``data/audio-alpaca``, ``data/pickapic_v2``: 4 rows each in the published schema and shard names
  (``tests/fixtures/datasets/audio_alpaca.yaml``, ``pickapic_v2.yaml``);
* ``data/ultrafeedback_binarized/data/{train,test}_prefs-00000-of-00001.parquet``: text pairs in
  ``HuggingFaceH4/ultrafeedback_binarized``'s layout (``prompt`` text, ``chosen``/``rejected`` whole
  conversations, ids, scores and ``messages`` beside them);
* ``captions.txt``: four AudioCaps-style captions;
* the evaluation inputs: ``samples/{base,tuned}/`` (two models' audio), ``data/audiocaps-test/``
  (reference clips), ``prompts.jsonl`` (id, prompt), ``samples/{sd15,sd15-dpo}/`` (two models' images);
* ``recipes/`` and ``scripts/``: links to the repository's (the README's paths are relative to it).

The hub cache is the folder ``HF_HUB_CACHE`` points to, laid out as a download leaves it
(``tests/helpers/hub_cache.py``). The commands run offline (``HF_HUB_OFFLINE=1``), with one OpenMP
thread and ``HOME`` inside the workspace.

``hf download`` itself runs too: offline (``HF_HUB_OFFLINE=1``) it returns the existing
``--local-dir`` folder, or the cached snapshot, without touching the network.

Commands are changed in exactly these ways (:func:`prepare`), all printed in the test's output:

* ``accelerate launch --num_processes N`` runs with ``--num_processes 1`` (one CPU, no GPU);
* *speed overrides* are appended to the builder and the training recipes (before a trailing
  ``--resume``; :func:`speed_overrides`): fewer steps and samples, 1 s clips, 32 px images, no
  warm-up, a checkpoint every step (so that ``--resume`` has one to continue from), no trackers;
  the TextWorld online comparison and the online recipe: one seed, SPPO only, a 64-call budget,
  4 steps and one round of 2 prompts;
  the CPU settings of a GPU config (``train.mixed_precision=no``; ``train.optimizer=adamw`` for
  SDXL's 8-bit Adam, which needs bitsandbytes on a GPU); Tango 2's SFT epoch off
  (``loss.sft_epochs=0``: in a 1-step run it would be the whole run); and the builder's gaps at 0
  (a random tiny CLAP scores samples almost alike, so the published gaps would leave no pairs);
* nothing else: a renamed flag, config key or file breaks the test.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
FIXTURES = TESTS / "fixtures" / "datasets"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

CAPTIONS = ["A dog barks followed by a bell ringing", "Rain falls while a siren wails",
            "A clock ticks, then birds chirp", "An engine hums and a man speaks"]
SR = 16000

# ------------------------------------------------------------------ the README's commands


@dataclass
class Block:
    """One fenced ``bash`` block: the section it sits in and its commands (continuations joined,
    comments and blank lines dropped)."""

    section: str
    commands: list[str]
    line: int


def readme_blocks(text: str) -> list[Block]:
    """Every fenced bash block of a markdown text, with the ``##`` section it belongs to."""
    blocks, section, inside, lines, start = [], "", False, [], 0
    for n, raw in enumerate(text.splitlines(), 1):
        if not inside and raw.startswith("## "):
            section = raw[3:].strip()
        elif not inside and raw.strip() in ("```bash", "```sh", "```shell"):
            inside, lines, start = True, [], n
        elif inside and raw.strip() == "```":
            inside = False
            blocks.append(Block(section, _commands(lines), start))
        elif inside:
            lines.append(raw)
    return blocks


def _commands(lines: list[str]) -> list[str]:
    joined, current = [], ""
    for line in lines:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        command = _strip_comment(current).strip()
        if command:
            joined.append(" ".join(command.split()))
        current = ""
    return joined


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


PREFS_OVERRIDES = ["limit=1", "num_samples=2", "generator.num_inference_steps=2", "generator.batch_size=4",
                   "perturbed.num_perturbations=1", "temporal.samples_per_perturbation=1", "multi_sample.min_gap=0",
                   "perturbed.min_gap=0", "--no-progress"]
DIFFUSION_OVERRIDES = ["train.max_steps=1", "train.per_device_batch=1", "train.grad_accum=1", "train.warmup_steps=0",
                       "train.save_every=1", "train.report_to=none", "validation.every=0", "train.mixed_precision=no"]
DIFFUSION_FAMILY_OVERRIDES = {  # by config file name
    "tango2_dpo": ["model.audio_seconds=1", "loss.sft_epochs=0"],
    "audioldm_dpo": ["model.audio_seconds=1", "loss.sft_epochs=0"],
    "audioldm2_dpo": ["model.audio_seconds=1", "loss.sft_epochs=0"],
    "sd15_dpo": ["model.resolution=32"],
    "sdxl_lora_dpo": ["model.resolution=32", "train.optimizer=adamw"],
}
LLM_OVERRIDES = ["train.max_steps=1", "train.batch_size=2", "train.grad_accum=1", "train.eval_every=0",
                 "train.save_every=0", "train.progress=false"]
TEXTWORLD_ONLINE_OVERRIDES = ["--seeds", "1", "--budget", "64", "--steps", "4", "--sft-steps", "1",
                              "--eval-prompts", "2", "--methods", "sppo"]
LLM_ONLINE_OVERRIDES = ["online.rounds=1", "online.prompts_per_round=2", "online.steps_per_round=1",
                        "train.batch_size=2", "train.progress=false"]


def speed_overrides(command: str) -> list[str]:
    """The overrides :func:`prepare` adds to ``command`` (none for commands that run as they are)."""
    words = shlex.split(command)
    if "prefs" in words and "build" in words:
        return list(PREFS_OVERRIDES)
    if "recipes/llm_dpo.py" in words:
        return list(LLM_OVERRIDES)
    if "recipes/textworld_online.py" in words:  # argparse: the last --flag wins
        return list(TEXTWORLD_ONLINE_OVERRIDES)
    if "recipes/llm_online.py" in words:
        return list(LLM_ONLINE_OVERRIDES)
    if "recipes/diffusion_dpo.py" in words or words[:2] == ["diffdpo", "train"]:
        config = Path(words[words.index("--config") + 1]).stem
        overrides = DIFFUSION_OVERRIDES + DIFFUSION_FAMILY_OVERRIDES.get(config, [])
        if "--resume" in words:  # one step further than the run it resumes
            overrides = ["train.max_steps=2" if o == "train.max_steps=1" else o for o in overrides]
        return overrides
    return []


def prepare(command: str) -> str:
    """The command as the test runs it: one process instead of N, speed overrides appended."""
    command = re.sub(r"accelerate launch --num_processes \d+", "accelerate launch --num_processes 1", command)
    extra = " ".join(shlex.quote(e) for e in speed_overrides(command))
    if not extra:
        return command
    if command.endswith(" --resume"):  # --resume takes an optional path: overrides go before it
        return f"{command[:-len(' --resume')]} {extra} --resume"
    return f"{command} {extra}"


# ------------------------------------------------------------------ the loss table


def loss_table() -> str:
    """The README's table of loss types, generated from the registry (``diffdpo.losses.LOSS_TYPES``):
    name, the method and paper (``LossSpec.title``), what it needs, the recipes that can train it (the
    diffusion recipe computes ``diffdpo.diffusion.objective.LOSS_INPUTS``; denoising errors exist for
    diffusion models only), and its options. ``python tests/helpers/readme_fixtures.py`` prints it."""
    from diffdpo.diffusion.objective import LOSS_INPUTS
    from diffdpo.losses import LOSS_TYPES

    denoising = {"chosen_errors", "rejected_errors"}
    rows = ["| `loss.type` | method (paper) | reference | data | recipes | options |", "|---|---|---|---|---|---|"]
    for name, spec in sorted(LOSS_TYPES.items()):
        method = re.sub(r"arXiv:(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", spec.title)
        recipes = [r for r, ok in (("LLM", not denoising & set(spec.needs)),
                                   ("diffusion", set(spec.needs) <= LOSS_INPUTS)) if ok]
        opts = ", ".join(f"`{k}`" for k in spec.options) or "-"
        rows.append(f"| `{name}` | {method} | {'yes' if spec.needs_reference else 'no'} | "
                    f"{'pairs' if spec.paired else 'unpaired'} | {', '.join(recipes)} | {opts} |")
    return "\n".join(rows)


# ------------------------------------------------------------------ the workspace


@dataclass
class Workspace:
    root: Path
    hub: Path
    env: dict[str, str] = field(default_factory=dict)


def build_workspace(root: str | Path) -> Workspace:
    """Write every stand-in of the table in the module docstring under ``root`` (and its hub cache
    ``root/.hf-hub``); returns the workspace with the environment its commands run under."""
    from diffdpo.diffusion import tiny
    from diffdpo.diffusion.hub_layouts import build_from_published
    from helpers.hub_cache import hub_cache_with

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    hub, scratch = root / ".hf-hub", root / ".scratch"
    models = root / "models"
    # Tango: the checkpoint folder as downloaded, FLAN-T5's config and tokenizer in the hub cache
    tiny.tango_checkpoint(models / "tango-full-ft-audiocaps")
    hub_cache_with(hub, "google/flan-t5-large", tiny.text_encoder_folder(scratch / "flan-t5"))
    for repo in ("cvssp/audioldm-s-full-v2", "cvssp/audioldm2", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                 "stabilityai/stable-diffusion-xl-base-1.0"):
        hub_cache_with(hub, repo, build_from_published(repo, scratch / repo))
    _clap(models / "clap-htsat-unfused", scratch / "roberta")
    _clip(models / "clip-vit-large-patch14")
    hub_cache_with(hub, "alignment-handbook/zephyr-7b-sft-full", _llm(scratch / "zephyr"))
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    _audio_alpaca(root / "data" / "audio-alpaca")
    _pickapic(root / "data" / "pickapic_v2")
    _text_pairs(root / "data" / "ultrafeedback_binarized" / "data")
    _eval_media(root)
    shutil.rmtree(scratch)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PYTEST_"))}
    (root / ".home").mkdir()
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(hub),
               HF_HOME=str(root / ".hf-home"), HOME=str(root / ".home"), XDG_CACHE_HOME=str(root / ".cache"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HF_HUB_DISABLE_TELEMETRY="1", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    for name in ("recipes", "scripts"):  # the README's paths are relative to the repository root
        (root / name).symlink_to(ROOT / name)
    return Workspace(root, hub, env)


def _clap(path: Path, tokenizer: Path) -> None:
    from metrics_helpers import write_roberta_tokenizer, write_tiny_clap

    write_tiny_clap(path, tokenizer, write_roberta_tokenizer(tokenizer))


def _clip(path: Path) -> None:
    from metrics_helpers import write_tiny_clip

    write_tiny_clip(path)


def _llm(path: Path) -> Path:
    from diffdpo.llm.tiny import build_tokenizer, tiny_llama

    words = "the cat dog sat ran on a mat red blue big small yes no what is sky color it".split()
    rng = np.random.default_rng(0)
    tok = build_tokenizer([" ".join(rng.choice(words, 8)) for _ in range(200)], vocab_size=300)
    tiny_llama(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _spec(name: str) -> dict:
    import yaml

    return yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())


def _write_shards(root: Path, spec: dict, rows: list[dict], split: str = "train") -> None:
    """``rows`` as one hub shard with the card's Arrow schema (``datasets`` feature metadata included)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features({k: datasets.Audio() if t == "audio" else datasets.Value(t)
                                  for k, t in spec["features"].items()})
    path = root / spec["shard_name"].format(split=split, index=0, shards=1, hash="0123456789abcdef")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=features.arrow_schema), path)


def _tone(freq: float, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav(x: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, SR, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _jpeg(value: int, size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 64, 255 - value)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _audio_alpaca(root: Path) -> None:
    rows = [{"prompt": c, "chosen": {"bytes": _wav(_tone(300 + 50 * i)), "path": f"chosen_{i}.wav"},
             "rejected": {"bytes": _wav(_tone(900 + 50 * i) * 0.5), "path": f"reject_{i}.wav"},
             "strategy": ["multi_sample", "perturbed", "temporal", "perturbed"][i]} for i, c in enumerate(CAPTIONS)]
    _write_shards(root, _spec("audio_alpaca"), rows)


def _pickapic(root: Path) -> None:
    import datetime as dt

    rows = []
    for i, label in enumerate((1.0, 0.0, 1.0, 0.0)):
        rows.append({
            "are_different": True, "best_image_uid": f"uid-{i}-{0 if label == 1 else 1}",
            "caption": f"a watercolor fox number {i}", "created_at": dt.datetime(2023, 5, 1, 12, i),
            "has_label": True, "image_0_uid": f"uid-{i}-0", "image_0_url": f"https://example.org/{i}-0.jpg",
            "image_1_uid": f"uid-{i}-1", "image_1_url": f"https://example.org/{i}-1.jpg",
            "jpg_0": _jpeg(10 * i), "jpg_1": _jpeg(200 + 5 * i), "label_0": label, "label_1": 1.0 - label,
            "model_0": "sdxl-alpha", "model_1": "dreamlike-photoreal", "ranking_id": 1000 + i, "user_id": 77 + i,
            "num_example_per_prompt": 1, "__index_level_0__": i})
    _write_shards(root, _spec("pickapic_v2"), rows)


def _text_pairs(root: Path) -> None:
    """UltraFeedback-binarized's layout: ``prompt`` text, ``chosen`` and ``rejected`` whole conversations
    sharing the user turn, plus ``prompt_id``, ``messages`` and scores, which the importer ignores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def conv(q: str, a: str) -> list[dict]:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    qa = [("what color is the sky", "it is blue", "it is red"), ("is the cat big", "yes it is big", "no"),
          ("what sat on the mat", "the cat sat on the mat", "a dog ran"), ("is it red", "no it is blue", "yes")]
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", qa), ("test", qa[:2])):
        table = [{"prompt": q, "prompt_id": f"{split}{i}", "chosen": conv(q, good), "rejected": conv(q, bad),
                  "messages": conv(q, good), "score_chosen": 8.0, "score_rejected": 2.0}
                 for i, (q, good, bad) in enumerate(rows)]
        pq.write_table(pa.Table.from_pylist(table), root / f"{split}_prefs-00000-of-00001.parquet")


def _eval_media(root: Path) -> None:
    import soundfile as sf
    from PIL import Image

    prompts = []
    for i, caption in enumerate(CAPTIONS):
        for folder, freq in (("samples/base", 300 + 40 * i), ("samples/tuned", 320 + 40 * i),
                             ("data/audiocaps-test", 310 + 40 * i)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            sf.write(root / folder / f"clip{i}.wav", _tone(freq, 1.0), SR)
        for folder, value in (("samples/sd15", 20 * i), ("samples/sd15-dpo", 30 + 20 * i)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (value, 100, 200 - value)).save(root / folder / f"clip{i}.png")
        prompts.append({"id": f"clip{i}", "prompt": caption})
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))


if __name__ == "__main__":
    print(loss_table())
