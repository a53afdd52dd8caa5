"""recipes/soundworld_profile.py: both shipped bases on the same captions and seeds, one CLAP for every
row, and the decoder's ceiling beside them; its numbers are the per-caption rows it wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_profile_of_both_bases_and_the_ceiling(tmp_path):
    sys.path.insert(0, str(ROOT / "recipes"))
    import soundworld_profile

    from diffdpo.errors import ConfigError

    report = soundworld_profile.main([f"out={tmp_path}", "evaluate.captions=10", "evaluate.steps=2",
                                      "evaluate.bootstrap=50", "threads=1"])
    table = {row["key"]: row for row in report["table"]}
    assert set(table["satisfied"]["models"]) == {"clean", "weak"}
    for base in ("clean", "weak"):
        rows = json.loads((tmp_path / "validation_10" / base / "rows.json").read_text())["rows"]
        assert table["satisfied"]["models"][base]["mean"] == pytest.approx(np.mean([r["satisfied"] for r in rows]))
        single = [r["events_exact"] for r in rows if r["kind"] == "single"]
        if len(single) >= 2:
            assert table["single_event"]["models"][base]["mean"] == pytest.approx(np.mean(single))
    assert table["satisfied"]["ceiling"]["mean"] >= 0.5  # real clips through the decoder mostly stay right
    assert "ceiling" not in table["clap"] and "ceiling" not in table["fad"]
    assert (tmp_path / "profile.md").read_text().count("\n") == len(report["table"]) + 2
    with pytest.raises(ConfigError, match="bases"):
        soundworld_profile.main([f"out={tmp_path}", "bases=[noisy]"])
