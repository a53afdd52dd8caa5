"""Judge generated audio with the oracle against what each caption asks for.

Per caption: :func:`oracle.score_detection` (presence F1, exact event set, order on sequences).
Aggregated by caption type, each with a bootstrap 95% interval:

- ``single``: the one event present and nothing else (``events_exact``);
- ``sequence_2`` / ``sequence_3``: ``events_exact`` (right events, any order), ``order_correct``
  (right events in the right order) and ``order_reversed`` (right events, exactly reversed);
- ``overlap``: ``events_exact``;
- ``all``: ``presence_f1`` and ``events_exact`` over every caption.
"""

from __future__ import annotations

import time

import numpy as np

from diffdpo.metrics.stats import mean_ci
from diffdpo.worlds.soundworld.oracle import Detection, Oracle, score_detection
from diffdpo.worlds.soundworld.scenes import OVERLAP, SEQUENCE, SINGLE, Scene, scene_from_caption


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    out = {"mean": float(v.mean()) if len(v) else None, "n": int(len(v))}
    if len(v) >= 2:
        ci = mean_ci(v)
        out["ci95"] = [ci.low, ci.high]
    return out


def caption_satisfied(result: dict) -> bool:
    """A :func:`score_detection` result meets its caption: exactly its events and, for
    sequences, in its order."""
    return bool(result["events_exact"] and result["order_correct"] is not False)


def judge(scenes: list[Scene], detections: list[Detection]) -> dict:
    """The oracle's aggregate verdict (see module docstring) plus per-item rows."""
    rows = []
    for s, d in zip(scenes, detections):
        r = score_detection(s, d)
        r["order_reversed"] = (bool(r["events_exact"] and d.order == s.events[::-1])
                               if s.kind == SEQUENCE else None)
        rows.append({"caption": s.caption, "kind": s.kind, "events": list(s.events), "detected": list(d.events), **r,
                     "satisfied": caption_satisfied(r)})
    groups = {"single": (SINGLE, 1), "sequence_2": (SEQUENCE, 2), "sequence_3": (SEQUENCE, 3), "overlap": (OVERLAP, 2)}
    out = {"all": {"presence_f1": _summary([r["presence_f1"] for r in rows]),
                   "events_exact": _summary([r["events_exact"] for r in rows])}}
    for name, (kind, n) in groups.items():
        sel = [r for r in rows if r["kind"] == kind and len(r["events"]) == n]
        if not sel:
            continue
        g = {"events_exact": _summary([r["events_exact"] for r in sel])}
        if kind == SEQUENCE:
            g["order_correct"] = _summary([r["order_correct"] for r in sel])
            g["order_reversed"] = _summary([r["order_reversed"] for r in sel])
        out[name] = g
    return {"summary": out, "rows": rows}


def evaluate_generator(pipe, oracle: Oracle, captions: list[str], steps: int = 25, guidance: float = 3.0,
                       seed: int = 0, batch_size: int = 32) -> dict:
    """Generate one clip per caption (caption ``i`` from noise seed ``seed + i``) and judge it."""
    from tqdm import tqdm

    t0 = time.time()
    scenes = [scene_from_caption(c) for c in captions]
    detections = []
    for s in tqdm(range(0, len(captions), batch_size), desc="generate + detect"):
        audio = pipe(captions[s:s + batch_size], num_inference_steps=steps, guidance_scale=guidance, seed=seed + s)
        detections += oracle.detect(audio)
    verdict = judge(scenes, detections)
    return {"settings": {"captions": len(captions), "steps": steps, "guidance": guidance, "seed": seed},
            "minutes": round((time.time() - t0) / 60, 2), **verdict["summary"],
            "examples": verdict["rows"][:12]}


def decoder_ceiling(pipe, oracle: Oracle, scenes: list[Scene], audio: np.ndarray, batch_size: int = 100) -> dict:
    """The oracle on *real* clips rendered back through the generator's own output path:
    ``vocoder`` (log-mel -> vocoder) and ``vae_vocoder`` (log-mel -> VAE encode/decode -> vocoder).

    ``vae_vocoder`` is what a sampler that produced the real clips' latents would be judged:
    a ceiling for anything that trains only the UNet (Diffusion-DPO included), since what the
    decoder adds or loses no denoiser can take back.
    """
    import torch

    from diffdpo.diffusion.tango.audio import log_mel

    paths = {"vocoder": [], "vae_vocoder": []}
    for s in range(0, len(scenes), batch_size):
        with torch.no_grad():
            mel = log_mel(torch.as_tensor(audio[s:s + batch_size]), pipe.audio_config)
            paths["vocoder"] += oracle.detect(np.asarray(pipe.mel_to_audio(mel)))
            decoded = pipe.latents_to_mel(pipe.mel_to_latents(mel))
            paths["vae_vocoder"] += oracle.detect(np.asarray(pipe.mel_to_audio(decoded)))
    return {name: judge(scenes, detections) for name, detections in paths.items()}


class OracleScorer:
    """The oracle as the preference builder's scorer (``scorer.kind:
    diffdpo.worlds.soundworld.evaluate:OracleScorer``): score = caption satisfied (0/1) + presence F1.

    An ablation, not a proxy: pairs labelled by the judge the evaluation uses separate what the
    scorer's labels limit from what Diffusion-DPO itself can learn from a few hundred pairs.
    """

    def __init__(self, config=None):
        self.oracle = Oracle.from_pretrained(getattr(config, "ckpt", None))
        self.id = {"kind": "soundworld-oracle", "events": list(self.oracle.event_names)}

    def score(self, texts: list[str], media: list, sample_rate: int | None = None) -> np.ndarray:
        if sample_rate is not None and sample_rate != self.oracle.audio_config.sample_rate:
            raise ValueError(f"OracleScorer: audio at {sample_rate} Hz, the oracle hears "
                             f"{self.oracle.audio_config.sample_rate} Hz")
        results = [score_detection(scene_from_caption(t), d) for t, d in zip(texts, self.oracle.detect(list(media)))]
        return np.array([float(caption_satisfied(r)) + r["presence_f1"] for r in results])
