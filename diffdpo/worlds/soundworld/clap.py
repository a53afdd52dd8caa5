"""The SoundWorld CLAP: a small contrastive audio-text model, the proxy scorer.

It plays laion-clap's role in preference building and CLAP scoring, and implements the CLAP
backend interface of :mod:`diffdpo.metrics.clap` (backend name ``"soundworld"``). Audio encoder:
convolutions over the log-mel (pooled over frequency, then in time), a one-layer transformer
over the remaining 16 time steps with positional embeddings, mean-pooled per time segment
(``audio_segments``) and concatenated. Text encoder: word
embeddings + positions, a two-layer transformer, mean-pooled over the caption. Trained with the
symmetric InfoNCE loss of CLIP/CLAP on SoundWorld clips and their captions. Trained with in-batch
negatives alone it learned *which* events a clip holds but not their order (order win rate 0.52
on held-out sequences, like laion-clap's known weakness), which left the preference builder's
temporal strategy without a signal. Reversed-caption hard negatives alone (``order_negatives``)
moved that to 0.55 in 10 minutes: a clip-wide mean pool all but erases *when*; pooling per time
segment keeps it. The order it learns is measured (:func:`order_awareness`).
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

from diffdpo.metrics.clap import AudioTextEmbedder
from diffdpo.diffusion.tango.audio import AudioConfig, fit_length, log_mel
from diffdpo.worlds.soundworld.scenes import SEQUENCE, Scene, recast_caption


@dataclass
class ClapArch:
    width: int = field(default=96, metadata={"help": "transformer width of both towers"})
    embed_dim: int = field(default=64, metadata={"help": "joint embedding size"})
    text_layers: int = field(default=2, metadata={"help": "text transformer layers"})
    audio_channels: tuple[int, ...] = field(default=(32, 48, 64), metadata={"help": "audio conv widths"})
    max_tokens: int = field(default=32, metadata={"help": "longest caption in tokens"})
    audio_segments: int = field(default=4, metadata={
        "help": "time segments pooled separately and concatenated (1 = mean over the whole clip)"})


@dataclass
class ClapTrainConfig:
    steps: int = field(default=2000, metadata={"help": "optimizer steps (upper bound)"})
    max_minutes: float = field(default=8.0, metadata={"help": "wall-clock cap; 0 = none"})
    batch_size: int = field(default=128, metadata={"help": "pairs per step (in-batch negatives)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    noise_db: tuple[float, float] = field(default=(-45.0, -15.0), metadata={"help": "added-noise level range"})
    order_negatives: bool = field(default=True, metadata={
        "help": "give each sequence clip its own caption with the events reversed as an extra negative"})


class _AudioTower(nn.Module):
    def __init__(self, n_mels: int, frames: int, arch: ClapArch):
        super().__init__()
        layers, c_in = [], 1
        for i, c in enumerate(arch.audio_channels):
            pool = (2, 2) if i < 2 else (2, 1)
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(pool)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        steps = frames // 4
        self.proj_in = nn.Linear(c_in * (n_mels // 2 ** len(arch.audio_channels)), arch.width)
        self.pos = nn.Parameter(torch.zeros(1, steps, arch.width))
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(arch.width, 4, 2 * arch.width, dropout=0.0, batch_first=True), 1)
        if steps % arch.audio_segments:
            raise ValueError(f"audio_segments {arch.audio_segments} must divide the {steps} encoder time steps")
        self.segments = arch.audio_segments
        self.out = nn.Linear(arch.width * arch.audio_segments, arch.embed_dim)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        x = (logmel - logmel.mean(dim=(1, 2), keepdim=True)) / (logmel.std(dim=(1, 2), keepdim=True) + 1e-5)
        h = self.conv(x.unsqueeze(1))                      # [B, C, F', T']
        h = self.proj_in(h.flatten(1, 2).transpose(1, 2))  # [B, T', W]
        h = self.encoder(h + self.pos)
        # pooled per time segment, so *when* something happens survives into the embedding
        return self.out(h.reshape(len(h), self.segments, -1, h.shape[-1]).mean(2).flatten(1))


class _TextTower(nn.Module):
    def __init__(self, vocab: int, arch: ClapArch):
        super().__init__()
        self.tok = nn.Embedding(vocab, arch.width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, arch.max_tokens, arch.width))
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(arch.width, 4, 2 * arch.width, dropout=0.0, batch_first=True), arch.text_layers)
        self.out = nn.Linear(arch.width, arch.embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.tok(ids) + self.pos[:, : ids.shape[1]], src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).float()
        return self.out((h * m).sum(1) / m.sum(1))


class ClapNet(nn.Module):
    def __init__(self, vocab: int, audio_config: AudioConfig, arch: ClapArch):
        super().__init__()
        self.audio = _AudioTower(audio_config.n_mels, audio_config.frames, arch)
        self.text = _TextTower(vocab, arch)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))


class SoundWorldClap(AudioTextEmbedder):
    """CLAP backend ``"soundworld"``. ``SoundWorldClap()`` loads the shipped weights."""

    name = "soundworld"

    def __init__(self, path: str | Path | None = None, *, _parts: tuple | None = None):
        if _parts is None:
            _parts = self._load(path)
        self.net, self.tokenizer, self.arch, self.audio_config, self.checkpoint_id = _parts
        self.net.eval()
        self.sample_rate = self.audio_config.sample_rate

    @classmethod
    def build(cls, arch: ClapArch, captions: list[str], audio_config: AudioConfig = AudioConfig()) -> "SoundWorldClap":
        from diffdpo.worlds.soundworld.components import train_tokenizer

        tok = train_tokenizer(captions)
        return cls(_parts=(ClapNet(len(tok), audio_config, arch), tok, arch, audio_config, "untrained"))

    @staticmethod
    def _load(path):
        from safetensors.torch import load_file

        from diffdpo.metrics.fingerprint import sha256_dir
        from diffdpo.worlds.soundworld import WEIGHTS_DIR
        from diffdpo.diffusion.tango.pipeline import load_tokenizer

        path = Path(path) if path is not None else WEIGHTS_DIR / "clap"
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no SoundWorld CLAP (expected config.json, model.safetensors, "
                                    "tokenizer/; built by recipes/soundworld_pretrain.py stages=[clap])")
        cfg = json.loads((path / "config.json").read_text())
        # folders written before audio_segments existed used one clip-wide mean pool
        arch = ClapArch(**{"audio_segments": 1, **cfg["arch"], "audio_channels": tuple(cfg["arch"]["audio_channels"])})
        audio = AudioConfig(**cfg["audio"])
        tok = load_tokenizer(path / "tokenizer")
        net = ClapNet(len(tok), audio, arch)
        net.load_state_dict(load_file(path / "model.safetensors"))
        return net, tok, arch, audio, sha256_dir(path)

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.parent / f".tmp_{path.name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"arch": asdict(self.arch), "audio": asdict(self.audio_config)},
                                                    indent=2))
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)

    # ------------------------------------------------------------ AudioTextEmbedder
    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.arch.max_tokens,
                             return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def text_forward(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.net.text(*self._tokens(texts)), dim=-1)

    def audio_forward(self, logmel: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.audio(logmel), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return self.text_forward(texts)

    @torch.no_grad()
    def embed_audio(self, audios: list[np.ndarray]) -> torch.Tensor:
        """Clips are cropped or zero-padded to ``clip_seconds`` (2 s), deterministically."""
        if isinstance(audios, (list, tuple)):
            n = self.audio_config.samples
            audios = torch.stack([fit_length(torch.as_tensor(np.asarray(a, np.float32)), n) for a in audios])
        return self.audio_forward(log_mel(audios, self.audio_config))

    def similarity(self, texts: list[str], audios) -> np.ndarray:
        """Cosine of ``texts[i]`` with ``audios[i]``."""
        return (self.embed_text(texts) * self.embed_audio(audios)).sum(-1).numpy()


def train_clap(model: SoundWorldClap, scenes: list[Scene], audio: np.ndarray, cfg: ClapTrainConfig, seed: int = 0,
               log=lambda step, m: None, captions: list[str] | None = None,
               order_negatives: list[str] | None = None) -> dict:
    """Symmetric InfoNCE over in-batch pairs (+ each sequence's reversed caption, audio -> text).

    ``captions`` are the texts paired with the clips (default: each scene's own caption; the
    pretraining recipe passes weak captions, :mod:`.weak_captions`), and ``order_negatives`` each
    clip's extra reversed-order negative, "" for none (default: each sequence scene's caption with
    its events reversed). Pass both or neither.
    """
    from diffdpo.worlds.soundworld.oracle import _noisy

    if (captions is None) != (order_negatives is None):
        raise ValueError("train_clap: pass both captions and order_negatives, or neither")
    for name, texts in (("captions", captions), ("order_negatives", order_negatives)):
        if texts is not None and len(texts) != len(scenes):
            raise ValueError(f"train_clap: {len(texts)} {name} for {len(scenes)} clips")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    mels = log_mel(_noisy(audio, rng, cfg.noise_db), model.audio_config)
    if captions is None:
        ids, mask = model._tokens([s.caption for s in scenes])
        reversed_caps = [recast_caption(s.caption, s.events[::-1]) if s.kind == SEQUENCE else "" for s in scenes]
        is_sequence = torch.tensor([s.kind == SEQUENCE for s in scenes])
    else:
        ids, mask = model._tokens(list(captions))
        reversed_caps = list(order_negatives)
        is_sequence = torch.tensor([bool(n) for n in reversed_caps])
    reversed_ids, reversed_mask = model._tokens(reversed_caps)
    opt = torch.optim.AdamW(model.net.parameters(), lr=cfg.lr, weight_decay=0.01)
    model.net.train()
    gen = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    bar = tqdm(total=cfg.steps, desc="clap")
    while step < cfg.steps and not (cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes):
        idx = torch.randperm(len(mels), generator=gen)[: cfg.batch_size]
        a = F.normalize(model.net.audio(mels[idx]), dim=-1)
        width = int(mask[idx].sum(1).max())
        t = F.normalize(model.net.text(ids[idx, :width], mask[idx, :width]), dim=-1)
        scale = model.net.logit_scale.clamp(max=np.log(100)).exp()
        logits = scale * a @ t.T
        target = torch.arange(len(idx))
        audio_to_text = logits
        if cfg.order_negatives:
            # one extra column per clip: its caption with the events reversed (-inf where there is none)
            rows = idx[is_sequence[idx]]
            extra = torch.full((len(idx), 1), float("-inf"))
            if len(rows):
                sel = is_sequence[idx]
                w = int(reversed_mask[rows].sum(1).max())
                tn = F.normalize(model.net.text(reversed_ids[rows, :w], reversed_mask[rows, :w]), dim=-1)
                extra[sel, 0] = scale * (a[sel] * tn).sum(-1)
            audio_to_text = torch.cat([logits, extra], dim=1)
        loss = 0.5 * (F.cross_entropy(audio_to_text, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log(step, {"clap/infonce": loss.item()})
    bar.close()
    model.net.eval()
    return {"steps": step, "minutes": round((time.time() - t0) / 60, 2), "final_infonce": loss.item(),
            "clips": len(scenes)}


def retrieval_accuracy(model: SoundWorldClap, scenes: list[Scene], audio: np.ndarray) -> dict:
    """Audio -> text top-1 among the held-out captions: exact caption, and same structure
    (relation + events in order; many captions share one)."""
    sims = model.embed_audio(list(audio)) @ model.embed_text([s.caption for s in scenes]).T
    best = sims.argmax(1).numpy()
    exact = float(np.mean(best == np.arange(len(scenes))))
    struct = float(np.mean([(scenes[b].kind, scenes[b].events) == (s.kind, s.events)
                            for s, b in zip(scenes, best)]))
    return {"audio_to_text_top1": exact, "audio_to_text_top1_same_structure": struct, "n": len(scenes)}


def order_awareness(model: SoundWorldClap, scenes: list[Scene], audio: np.ndarray) -> dict:
    """On sequences: score of the true caption vs the same caption with the events in reverse
    order (:func:`recast_caption`), on the same audio. Share where the true one wins, mean margin."""
    seq = [(s, a) for s, a in zip(scenes, audio) if s.kind == SEQUENCE]
    if not seq:
        return {"order_win_rate": None, "n_sequences": 0}
    true = model.similarity([s.caption for s, _ in seq], [a for _, a in seq])
    swapped = model.similarity([recast_caption(s.caption, s.events[::-1]) for s, _ in seq], [a for _, a in seq])
    return {"order_win_rate": float(np.mean(true > swapped)), "order_margin_mean": float(np.mean(true - swapped)),
            "true_caption_cosine_mean": float(np.mean(true)), "n_sequences": len(seq)}
