"""Sources are cited by what a reader can open: no tracked text file names a path outside the repository.

A citation such as ``/work/shared/ANCHORS.md`` or ``../shared/notes.md`` points into the machine the file
was written on; cite the paper (arXiv id or URL), the repository file URL or the model/dataset card
instead. The few legitimate mentions of such paths are listed below with the reason, per file and per
pattern, so a new one has to be argued for here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# name -> regex; each names a place outside the repository. /tmp/ is a fine place for a command in an
# example or a benchmark to write to (``--json /tmp/x.json``); only a /tmp/ path given as a source
# ("see /tmp/notes.md", "(/tmp/...)") is flagged.
PATTERNS = {
    "/work/": r"(?<![\w.-])/work/",
    "/root/": r"(?<![\w.-])/root/",
    "/home/": r"(?<![\w.-])/home/[A-Za-z_]",
    "/Users/": r"(?<![\w.-])/Users/[A-Za-z_]",
    "../shared": r"\.\./shared\b",
    "shared/ANCHORS": r"shared/ANCHORS",
    "ANCHORS.md": r"\bANCHORS\.md\b",  # a notes file that is not in the repository
    "/tmp/ as a source": r"(?i)(?:\b(?:see|cf\.|from|source:?|according to|after|per)\s+[`'\"(\[]?|\()/tmp/",
}

# path -> {pattern name: why it is legitimate there}
ALLOWED: dict[str, dict[str, str]] = {
    "tests/test_repository_hygiene.py": {name: "this test names the patterns it looks for" for name in PATTERNS},
    "diffdpo/worlds/soundworld/weights/MANIFEST.json": {
        "/work/": "the recorded command lines and output folders of the runs that made the shipped weights "
                  "(provenance written by recipes/soundworld_pretrain.py, not a citation)",
    },
    "diffdpo/worlds/soundworld/weights_weak/MANIFEST.json": {
        "/work/": "the recorded command lines of the runs that made the clean base's VAE, which the weak base "
                  "reuses (provenance written by recipes/soundworld_pretrain.py, not a citation)",
    },
    "diffdpo/worlds/soundworld/weights_flow/MANIFEST.json": {
        "/work/": "the recorded command lines of the runs that made the clean base's VAE, which the flow base "
                  "reuses (provenance written by recipes/soundworld_pretrain.py, not a citation)",
    },
}

def tracked_mentions() -> list[tuple[str, int, str, str]]:
    """``(path, line, pattern name, text)`` for every match in a tracked text file (git grep -I skips binaries)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    combined = "|".join(f"(?:{p})" for p in PATTERNS.values())
    out = subprocess.run(["git", "grep", "-I", "-n", "-P", combined], cwd=ROOT, capture_output=True, text=True)
    if out.returncode not in (0, 1):  # 1 = no match
        raise RuntimeError(f"git grep failed: {out.stderr}")
    found = []
    for row in out.stdout.splitlines():
        path, line, text = row.split(":", 2)
        for name, pattern in PATTERNS.items():
            if re.search(pattern, text):
                found.append((path, int(line), name, text.strip()))
    return found


def test_no_tracked_file_names_a_path_outside_the_repository():
    bad = [f"{path}:{line}: {name!r} in {text[:160]!r}" for path, line, name, text in tracked_mentions()
           if name not in ALLOWED.get(path, {})]
    assert not bad, ("paths outside the repository (cite the paper, repository file URL or model card; or, "
                     "if legitimate, list it in ALLOWED with the reason):\n" + "\n".join(bad))


def test_the_allow_lists_name_files_that_exist():
    """An entry for a file that is gone (or renamed) would silently allow the pattern for a new file."""
    missing = [path for path in ALLOWED if not (ROOT / path).is_file()]
    assert not missing, missing
    unknown = {path: names for path, entries in ALLOWED.items()
               if (names := set(entries) - set(PATTERNS))}
    assert not unknown, unknown


@pytest.mark.parametrize("text, name", [
    ("see /work/shared/ANCHORS.md", "/work/"),
    ("(ANCHORS.md)", "ANCHORS.md"),
    ("notes in ../shared/x.md", "../shared"),
    ("numbers from /tmp/run/out.json", "/tmp/ as a source"),
    ("(see /tmp/notes.md)", "/tmp/ as a source"),
    ("the table (/tmp/bench.md) says", "/tmp/ as a source"),
    ("cache in /root/.cache/x", "/root/"),
])
def test_the_patterns_catch_what_they_are_for(text, name):
    assert re.search(PATTERNS[name], text)


@pytest.mark.parametrize("text", ["https://github.com/SalesforceAIResearch/DiffusionDPO/blob/main/train.py",
                                  "tmp_path / 'pap/data/x.parquet'", "dataset_root/tmp/x", "runs/tiny/work/",
                                  "python bench/gpu_check.py --json /tmp/gpu_check.json",
                                  "diffdpo demo out=/tmp/runs/round2", '"json": "/tmp/bench/llm_dpo3.json"'])
def test_the_patterns_leave_ordinary_paths_alone(text):
    hits = [name for name, pattern in PATTERNS.items() if re.search(pattern, text)]
    assert not hits, hits
