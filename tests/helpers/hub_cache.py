"""A Hugging Face hub cache holding local folders under hub ids: how tests stand in for a download.

``HF_HUB_CACHE=<dir>`` plus ``HF_HUB_OFFLINE=1`` makes ``from_pretrained("org/name")`` resolve to
the folder placed here, through the same lookup a real download goes through (a ``models--org--name``
entry with ``refs/main`` and a snapshot), so code that names the real id is tested unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SNAPSHOT = "0" * 40


def hub_cache_with(cache: str | Path, repo_id: str, folder: str | Path) -> Path:
    """Copy ``folder`` into the hub cache at ``cache`` as ``repo_id``'s main revision; returns ``cache``."""
    cache = Path(cache)
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / SNAPSHOT, dirs_exist_ok=True)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(SNAPSHOT)
    return cache
