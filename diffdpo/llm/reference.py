"""Reference log-probs: computed once, cached on disk, reused across runs and for eval, never stale.

The cache key is a SHA-256 fingerprint of everything the numbers depend on:

* the reference weights (every tensor's name, dtype, shape and bytes; with peft the LoRA tensors
  are left out because the reference is the LoRA-disabled model) and the model config;
* the data as the model sees it (every example's token ids, after chat template and truncation);
* how log-probs are computed (``LOGPS_VERSION``, logit dtype fp32) and the sequence set (pairs, or
  unpaired completions plus KTO's mismatched KL pairs).

Any change gives a new key, so a stale file is never read; a file whose stored fingerprint or size
disagrees with its name is rejected loudly. Files are ``<cache_dir>/ref_logps_<fingerprint>.safetensors``
written atomically. This answers TRL issues #3985 (save/load precomputed reference log-probs) and
#1148 (eval reference log-probs under precompute: eval sets get their own cache entry).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from diffdpo.llm.batching import collate
from diffdpo.llm.logps import LogpsModel

LOGPS_VERSION = "diffdpo-llm-logps-1 fp32-logsoftmax masked-sum"


def _is_lora(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the reference weights and config (LoRA adapters excluded: the reference disables them)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items(), key=lambda kv: kv[0].replace(".base_layer.", ".")):
        if _is_lora(name):
            continue
        t = tensor.detach().cpu().contiguous()
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")  # peft's wrapping
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sequences_fingerprint(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str:
    h = hashlib.sha256()
    for prompt, completion in sequences:
        h.update(json.dumps([list(prompt), list(completion)]).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(model_fp: str, sequences_fp: str) -> str:
    return hashlib.sha256(f"{LOGPS_VERSION}|{model_fp}|{sequences_fp}".encode()).hexdigest()[:32]


@contextlib.contextmanager
def reference_mode(model: nn.Module, ref_model: nn.Module | None):
    """Yield the module to score the reference with: ``ref_model`` if given, else the policy with its
    LoRA adapters disabled (peft), in eval mode and without gradients. Either may be a
    :class:`LogpsModel` (a sharded policy must be called through its root, which is that wrapper)."""
    target = ref_model if ref_model is not None else model
    was_training = target.training
    target.eval()
    peft = model.model if isinstance(model, LogpsModel) else model
    disable = (peft.disable_adapter() if ref_model is None and hasattr(peft, "disable_adapter")
               else contextlib.nullcontext())
    try:
        with torch.no_grad(), disable:
            yield target
    finally:
        target.train(was_training)


def compute_logps(model: nn.Module, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                  batch_size: int = 16, padding_free: bool = False, chunk_size: int = 1024,
                  device: torch.device | str = "cpu", progress: bool = False) -> Tensor:
    """Summed completion log-probs ``[len(sequences)]`` (float32) under ``torch.no_grad``; ``model`` is a
    causal LM or an already wrapped :class:`LogpsModel`."""
    scorer = model if isinstance(model, LogpsModel) else LogpsModel(model, chunk_size)
    out = []
    starts = range(0, len(sequences), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="reference log-probs", leave=False)
    with torch.no_grad():
        for start in starts:
            batch = collate(sequences[start:start + batch_size], pad_token_id, padding_free).to(device)
            out.append(scorer.batch_logps(batch).logps.float().cpu())
    return torch.cat(out)


def cached_reference_logps(model: nn.Module, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                           pad_token_id: int, cache_dir: str | Path | None, ref_model: nn.Module | None = None,
                           batch_size: int = 16, padding_free: bool = False, chunk_size: int = 1024,
                           device: torch.device | str = "cpu", model_fp: str | None = None,
                           progress: bool = False) -> tuple[Tensor, bool]:
    """Reference log-probs of ``sequences``, from the cache when its key matches; ``(logps, hit)``.

    ``model_fp`` may be passed to avoid re-hashing the weights for several sequence sets.
    """
    if model_fp is None:
        model_fp = model_fingerprint(ref_model if ref_model is not None else model)
    key = cache_key(model_fp, sequences_fingerprint(sequences))
    path = Path(cache_dir) / f"ref_logps_{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        return load_cached(path, key, len(sequences)), True
    with reference_mode(model, ref_model) as scorer:
        logps = compute_logps(scorer, sequences, pad_token_id, batch_size, padding_free, chunk_size, device,
                              progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({"logps": logps.contiguous()}, str(tmp), metadata={"key": key, "count": str(len(sequences)),
                                                                    "logps_version": LOGPS_VERSION})
        os.replace(tmp, path)
    return logps, False


def load_cached(path: Path, key: str, count: int) -> Tensor:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key or meta.get("count") != str(count):
            raise ValueError(f"{path}: reference cache does not match its key (stored key {meta.get('key')!r}, "
                             f"count {meta.get('count')!r}; expected {key!r}, {count}); delete the file")
        logps = f.get_tensor("logps")
    if logps.shape != (count,) or not torch.isfinite(logps).all():
        raise ValueError(f"{path}: corrupt reference cache (shape {tuple(logps.shape)}, expected ({count},))")
    return logps
