"""Loading from a local folder or the Hugging Face hub, failing at once and helpfully offline.

Offline (``HF_HUB_OFFLINE=1``) a lookup of a model that is neither a local folder nor in the cache
raises :class:`OfflineModelError` with the command that downloads it, instead of the long wait
and generic error a failed hub lookup gives.
"""

from __future__ import annotations

import os
from pathlib import Path


class OfflineModelError(FileNotFoundError):
    """A hub model is not available locally and the hub cannot be reached."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def from_pretrained(cls, name_or_path: str, setting: str = "model.name_or_path", **kwargs):
    """``cls.from_pretrained`` for a local folder or a hub id; offline without a local copy it
    fails at once, saying what to download and which ``setting`` to point at the folder."""
    if Path(name_or_path).is_dir():
        return cls.from_pretrained(name_or_path, **kwargs)
    try:
        return cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if _offline():
            raise OfflineModelError(
                f"model {name_or_path!r} is neither a local folder nor in the Hugging Face cache, and the hub is "
                f"offline (HF_HUB_OFFLINE=1). Download it on a connected machine with\n"
                f"    hf download {name_or_path} --local-dir models/{name_or_path.split('/')[-1]}\n"
                f"copy that folder here and point {setting} at it (models/{name_or_path.split('/')[-1]})") from err
    return cls.from_pretrained(name_or_path, **kwargs)
