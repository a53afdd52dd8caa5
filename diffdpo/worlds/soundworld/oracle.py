"""The oracle: which SoundWorld events a clip holds, and in which order.

A small CNN reads the clip's log-mel (standardised per clip, so loudness does not matter),
pools over frequency only, and predicts per-frame activity of every event. An event is present
when it is active for at least ``min_frames`` frames (125 ms); the order is the order of the
events' first active frames. It is trained on synthesised clips with their exact timelines,
partly after a Griffin-Lim round trip (the artefacts generated audio carries), and plays the
human judge: :func:`score_detection` compares a detection with what a caption asks for.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from diffdpo.diffusion.tango.audio import AudioConfig, griffin_lim, log_mel
from diffdpo.worlds.soundworld.events import EVENT_NAMES
from diffdpo.worlds.soundworld.scenes import SEQUENCE, Scene


@dataclass
class OracleArch:
    channels: tuple[int, ...] = field(default=(32, 48, 64), metadata={"help": "conv widths (each halves the mel axis)"})
    hidden: int = field(default=96, metadata={"help": "width of the temporal conv head"})
    threshold: float = field(default=0.5, metadata={"help": "activity probability that counts as active"})
    min_frames: int = field(default=4, metadata={"help": "active frames an event needs to count as present"})


@dataclass
class OracleTrainConfig:
    steps: int = field(default=1500, metadata={"help": "optimizer steps (upper bound)"})
    max_minutes: float = field(default=8.0, metadata={"help": "wall-clock cap; 0 = none"})
    batch_size: int = field(default=64, metadata={"help": "clips per step"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate"})
    griffin_lim_share: float = field(default=0.3, metadata={"help": "share of training clips also seen after a "
                                                                    "Griffin-Lim round trip"})
    noise_db: tuple[float, float] = field(default=(-45.0, -15.0), metadata={"help": "added-noise level range, dB "
                                                                                    "re clip RMS"})


class OracleNet(nn.Module):
    def __init__(self, n_mels: int, n_events: int, arch: OracleArch):
        super().__init__()
        layers, c_in = [], 1
        for c in arch.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d((2, 1))]
            c_in = c
        self.conv = nn.Sequential(*layers)
        flat = c_in * (n_mels // 2 ** len(arch.channels))
        self.head = nn.Sequential(nn.Conv1d(flat, arch.hidden, 5, padding=2), nn.ReLU(),
                                  nn.Conv1d(arch.hidden, arch.hidden, 5, padding=4, dilation=2), nn.ReLU(),
                                  nn.Conv1d(arch.hidden, n_events, 1))

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """``[B, n_mels, frames]`` -> activity logits ``[B, n_events, frames]``."""
        x = (logmel - logmel.mean(dim=(1, 2), keepdim=True)) / (logmel.std(dim=(1, 2), keepdim=True) + 1e-5)
        h = self.conv(x.unsqueeze(1))
        return self.head(h.flatten(1, 2))


@dataclass(frozen=True)
class Detection:
    """``events`` in order of first activity (the detected temporal order)."""

    events: tuple[str, ...]
    onsets: dict[str, float]
    activity: np.ndarray  # [n_events, frames] probabilities

    @property
    def order(self) -> tuple[str, ...]:
        return self.events


class Oracle:
    def __init__(self, net: OracleNet, arch: OracleArch, audio_config: AudioConfig,
                 events: tuple[str, ...] = EVENT_NAMES):
        self.net, self.arch, self.audio_config, self.event_names = net.eval(), arch, audio_config, tuple(events)

    @classmethod
    def build(cls, arch: OracleArch, audio_config: AudioConfig = AudioConfig()) -> "Oracle":
        return cls(OracleNet(audio_config.n_mels, len(EVENT_NAMES), arch), arch, audio_config)

    # ------------------------------------------------------------ io
    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.parent / f".tmp_{path.name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"arch": asdict(self.arch), "audio": asdict(self.audio_config),
                                                     "events": list(self.event_names)}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "Oracle":
        from safetensors.torch import load_file

        from diffdpo.worlds.soundworld import WEIGHTS_DIR

        path = Path(path) if path is not None else WEIGHTS_DIR / "oracle"
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no oracle (expected config.json + model.safetensors; "
                                    "built by recipes/soundworld_pretrain.py stages=[oracle])")
        cfg = json.loads((path / "config.json").read_text())
        arch = OracleArch(**{**cfg["arch"], "channels": tuple(cfg["arch"]["channels"])})
        audio = AudioConfig(**cfg["audio"])
        net = OracleNet(audio.n_mels, len(cfg["events"]), arch)
        net.load_state_dict(load_file(path / "model.safetensors"))
        return cls(net, arch, audio, tuple(cfg["events"]))

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def activity(self, logmel: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        return torch.cat([torch.sigmoid(self.net(logmel[s:s + batch_size].float()))
                          for s in range(0, len(logmel), batch_size)])

    def detect_mels(self, logmel: torch.Tensor) -> list[Detection]:
        probs = self.activity(logmel).numpy()
        frame_s = self.audio_config.hop_length / self.audio_config.sample_rate
        out = []
        for p in probs:
            active = p > self.arch.threshold
            onsets = {}
            for k, name in enumerate(self.event_names):
                if active[k].sum() >= self.arch.min_frames:
                    onsets[name] = float(np.argmax(active[k]) * frame_s)
            out.append(Detection(tuple(sorted(onsets, key=lambda e: (onsets[e], e))), onsets, p))
        return out

    def detect(self, audios) -> list[Detection]:
        """Detections for mono float arrays at ``audio_config.sample_rate`` (list or ``[B, samples]``)."""
        if isinstance(audios, (list, tuple)):
            audios = np.stack([np.asarray(a, dtype=np.float32) for a in audios]) if len(audios) else np.zeros((0, 1))
        return self.detect_mels(log_mel(audios, self.audio_config))


def score_detection(scene: Scene, det: Detection) -> dict:
    """How well a detection matches what ``scene`` asks for.

    ``presence_f1``: F1 of the detected event set against the scene's; ``events_exact``: the sets
    are equal; ``order_correct`` (sequences only, else None): the sets are equal *and* the
    detected order is the scene's order.
    """
    want, got = set(scene.events), set(det.events)
    tp = len(want & got)
    f1 = 2 * tp / (len(want) + len(got)) if want or got else 1.0
    exact = want == got
    order = None
    if scene.kind == SEQUENCE:
        order = bool(exact and det.order == scene.events)
    return {"presence_f1": f1, "events_exact": exact, "order_correct": order}


def activity_targets(scenes: list[Scene], frames: int, cfg: AudioConfig) -> torch.Tensor:
    """``[N, n_events, frames]``: 1 where a frame's centre lies inside the event's timeline span."""
    centres = np.arange(frames) * cfg.hop_length / cfg.sample_rate
    index = {e: k for k, e in enumerate(EVENT_NAMES)}
    y = np.zeros((len(scenes), len(EVENT_NAMES), frames), dtype=np.float32)
    for i, scene in enumerate(scenes):
        for e in scene.timeline:
            y[i, index[e.event]] = np.maximum(y[i, index[e.event]], (centres >= e.start) & (centres <= e.end))
    return torch.from_numpy(y)


def _noisy(audio: np.ndarray, rng: np.random.Generator, noise_db: tuple[float, float]) -> np.ndarray:
    rms = np.sqrt(np.mean(audio**2, axis=1, keepdims=True))
    level = 10 ** (rng.uniform(*noise_db, size=(len(audio), 1)) / 20)
    return (audio + rms * level * rng.standard_normal(audio.shape)).astype(np.float32)


def train_oracle(oracle: Oracle, scenes: list[Scene], audio: np.ndarray, cfg: OracleTrainConfig, seed: int = 0,
                 log=lambda step, m: None) -> dict:
    """Per-frame BCE against timeline activity; noisy and Griffin-Lim'd copies for robustness."""
    acfg = oracle.audio_config
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_gl = int(cfg.griffin_lim_share * len(scenes))
    mels = log_mel(_noisy(audio, rng, cfg.noise_db), acfg)
    gl = torch.cat([log_mel(griffin_lim(log_mel(audio[s:min(s + 64, n_gl)], acfg), acfg, seed=s), acfg)
                    for s in tqdm(range(0, n_gl, 64), desc="griffin-lim copies")]) if n_gl else mels[:0]
    x = torch.cat([mels, gl])
    y = activity_targets(scenes, acfg.frames, acfg)
    y = torch.cat([y, y[:n_gl]])
    opt = torch.optim.AdamW(oracle.net.parameters(), lr=cfg.lr)
    oracle.net.train()
    t0, step = time.time(), 0
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=cfg.steps, desc="oracle")
    while step < cfg.steps and not (cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(oracle.net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        if step % 50 == 0:
            bar.set_postfix(bce=f"{loss.item():.4f}")
            log(step, {"oracle/bce": loss.item()})
    bar.close()
    oracle.net.eval()
    return {"steps": step, "minutes": round((time.time() - t0) / 60, 2), "final_bce": loss.item(),
            "clips": len(scenes), "griffin_lim_copies": n_gl}


def evaluate_oracle(oracle: Oracle, scenes: list[Scene], audio: np.ndarray) -> dict:
    """Presence F1 (micro over clips), exact event-set accuracy and order accuracy on sequences, on
    the clean audio and after a Griffin-Lim round trip."""
    out = {}
    clean = oracle.detect(audio)
    roundtrip = oracle.detect_mels(log_mel(griffin_lim(log_mel(audio, oracle.audio_config), oracle.audio_config),
                                           oracle.audio_config))
    for name, dets in (("clean", clean), ("griffin_lim", roundtrip)):
        scores = [score_detection(s, d) for s, d in zip(scenes, dets)]
        tp = sum(len(set(s.events) & set(d.events)) for s, d in zip(scenes, dets))
        n_want = sum(len(s.events) for s in scenes)
        n_got = sum(len(d.events) for d in dets)
        orders = [x["order_correct"] for x in scores if x["order_correct"] is not None]
        out[name] = {"presence_f1": 2 * tp / (n_want + n_got), "events_exact": float(np.mean([x["events_exact"]
                                                                                              for x in scores])),
                     "order_accuracy": float(np.mean(orders)), "n": len(scenes), "n_sequences": len(orders)}
    return out
