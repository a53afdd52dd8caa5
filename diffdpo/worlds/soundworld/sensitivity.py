"""Does a SoundWorld generator read its caption's events, and their order?

    python -m diffdpo.worlds.soundworld.sensitivity [--model DIR] [--clips 600] [--threads 2]

On real sequence clips (2-3 events one after another), the generator's denoising error with the
true caption is compared with two edited captions at the same noisy input:

- ``reversed``: the same words, events in reverse order (:func:`recast_caption`);
- ``replaced``: one event swapped for another (the control: how much the model reads text at all).

A model whose conditioning carries order has a lower error with the true caption than with the
reversed one more often than not; it shows most at the noisiest timestep (990), where a sample's
layout is decided and only the caption can say which event comes first. Sampling and the oracle
say *what* a model renders; this says whether the model tells the captions apart in the first
place. If it does not because the text encoder gives both captions nearly the same states,
Diffusion-DPO (which trains the UNet with the text encoder frozen) has almost nothing to learn
order from.

The other half of reading order is on the audio side: :func:`query_time_probe` asks how well a
linear probe reads a query token's position in time from what enters each cross-attention, since
a query that does not know whether it is early or late cannot pick the caption's first event.
It reads the UNet's own features, before any time features that
:class:`~diffdpo.worlds.soundworld.components.PositionalCrossAttnProcessor` adds to the queries.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import numpy as np
import torch

from diffdpo.diffusion.tango.audio import log_mel
from diffdpo.worlds.soundworld.events import EVENT_NAMES
from diffdpo.worlds.soundworld.scenes import SEQUENCE, Scene, recast_caption

VARIANTS = ("reversed", "replaced")


def edited_captions(scene: Scene, rng: random.Random) -> dict[str, str]:
    """The ``reversed`` and ``replaced`` captions of a sequence scene."""
    if scene.kind != SEQUENCE:
        raise ValueError(f"caption {scene.caption!r}: not a sequence, its order cannot be reversed")
    events = list(scene.events)
    slot = rng.randrange(len(events))
    events[slot] = rng.choice([e for e in EVENT_NAMES if e not in scene.events])
    return {"reversed": recast_caption(scene.caption, tuple(scene.events[::-1])),
            "replaced": recast_caption(scene.caption, tuple(events))}


@dataclass
class Sensitivity:
    """Per timestep, per clip: denoising MSE with the true caption and with each edited one."""

    timesteps: list[int]
    true_errors: np.ndarray               # [T, N]
    edited_errors: dict[str, np.ndarray]  # variant -> [T, N]

    def table(self) -> list[dict]:
        """Per timestep and variant: share of clips where the true caption has the lower error
        (ties count half) and the mean relative gap ``(edited - true) / true``."""
        rows = []
        for k, t in enumerate(self.timesteps):
            true = self.true_errors[k]
            for name, errors in self.edited_errors.items():
                gap = errors[k] - true
                rows.append({"timestep": t, "variant": name,
                             "true_better": float(np.mean((gap > 0) + 0.5 * (gap == 0))),
                             "relative_gap": float(np.mean(gap / true))})
        return rows


def _noised(pipe, audio: np.ndarray, timesteps, seed: int):
    """For each timestep in turn: ``(k, noisy, steps, target)`` for the clips' latents, one fresh
    noise draw per timestep from a generator seeded with ``seed``. Timesteps count up with noise
    (DDPM's 0..999; rectified flow's 1000 x sigma), so one list fits both kinds of base."""
    from diffdpo.diffusion.logratios import noisy_and_target, num_train_steps, prediction_kind

    noising = type(pipe.scheduler).from_config(pipe.scheduler.config)  # fresh: untouched by set_timesteps
    flow = prediction_kind(noising) == "flow_matching"  # its index 0 is the noisiest timestep
    latents = pipe.mel_to_latents(log_mel(np.asarray(audio), pipe.audio_config))
    generator = torch.Generator().manual_seed(seed)
    for k, t in enumerate(timesteps):
        noise = torch.randn(latents.shape, generator=generator)
        index = num_train_steps(noising) - int(t) if flow else int(t)
        yield (k, *noisy_and_target(noising, latents, noise, torch.full((len(latents),), index)))


@torch.no_grad()
def caption_sensitivity(pipe, scenes: list[Scene], audio: np.ndarray, timesteps=(100, 300, 500, 700, 900, 990),
                        seed: int = 0, batch_size: int = 50) -> Sensitivity:
    """Errors of ``pipe`` on the sequence clips among ``scenes``/``audio``; one noise per (clip,
    timestep), shared by every caption of that clip."""
    from diffdpo.diffusion.logratios import per_sample_mse

    picked = [i for i, s in enumerate(scenes) if s.kind == SEQUENCE]
    if not picked:
        raise ValueError("no sequence clips among the scenes given")
    rng = random.Random(seed)
    captions = {"true": [scenes[i].caption for i in picked]}
    edits = [edited_captions(scenes[i], rng) for i in picked]
    captions.update({v: [e[v] for e in edits] for v in VARIANTS})
    parts = [slice(start, start + batch_size) for start in range(0, len(picked), batch_size)]
    conditions = {name: [pipe.encode_text(texts[part]) for part in parts] for name, texts in captions.items()}
    errors = {name: np.zeros((len(timesteps), len(picked))) for name in captions}
    for k, noisy, steps, target in _noised(pipe, np.asarray(audio)[picked], timesteps, seed):
        for name, per_part in conditions.items():
            for part, (states, mask) in zip(parts, per_part):
                pred = pipe.unet_forward(noisy[part], steps[part], states, mask)
                errors[name][k, part] = per_sample_mse(pred, target[part]).numpy()
    return Sensitivity(list(timesteps), errors["true"], {v: errors[v] for v in VARIANTS})


def linear_probe(features: np.ndarray, target: np.ndarray, n_fit: int, ridge: float = 1e-2) -> dict:
    """Ridge regression of ``target [N]`` on ``features [N, C]``, fitted on the first ``n_fit`` rows
    and scored on the rest: ``r2`` and ``half_accuracy`` (is the target above or below 0.5)."""
    mean = features[:n_fit].mean(0)
    design = np.c_[features - mean, np.ones(len(features))]
    fit, held = design[:n_fit], design[n_fit:]
    weights = np.linalg.solve(fit.T @ fit + ridge * np.eye(fit.shape[1]), fit.T @ target[:n_fit])
    pred, truth = held @ weights, target[n_fit:]
    return {"r2": float(1 - ((pred - truth) ** 2).mean() / truth.var()),
            "half_accuracy": float(np.mean((pred > 0.5) == (truth > 0.5)))}


@torch.no_grad()
def query_time_probe(pipe, captions: list[str], audio: np.ndarray, timesteps=(300, 700, 900),
                     seed: int = 0) -> list[dict]:
    """Per cross-attention layer (in forward order) and timestep: :func:`linear_probe` of each
    query token's time position (0 = clip start, 1 = end) from the token features entering that
    layer's ``attn2``, fitted on the first half of the clips and scored on the second (each clip
    with its caption)."""
    if len(audio) < 4 or len(captions) != len(audio):
        raise ValueError(f"query_time_probe needs at least 4 clips, one caption each (got {len(audio)} clips, "
                         f"{len(captions)} captions)")
    captured, hooks = {}, []
    for name, module in pipe.unet.named_modules():
        if hasattr(module, "attn2") and module.attn2 is not None:
            def keep(mod, args, kwargs, name=name):
                captured[name] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hooks.append(module.attn2.register_forward_pre_hook(keep, with_kwargs=True))
    if not hooks:
        raise ValueError("the UNet has no cross-attention layers to probe")
    states, mask = pipe.encode_text(captions)
    rows, n_fit = [], len(audio) // 2
    try:
        for k, noisy, steps, _ in _noised(pipe, audio, timesteps, seed):
            pipe.unet_forward(noisy, steps, states, mask)
            for name, tokens in captured.items():  # [B, H*W, C], row-major over (frequency, time)
                n, hw, c = tokens.shape
                width = int(round((hw * noisy.shape[-1] / noisy.shape[-2]) ** 0.5))
                position = np.tile(np.arange(width) / (width - 1), hw // width)
                probe = linear_probe(tokens.reshape(n * hw, c).float().numpy(), np.tile(position, n), n_fit * hw)
                rows.append({"timestep": int(timesteps[k]), "layer": name, "grid": f"{hw // width}x{width}", **probe})
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    from diffdpo.worlds.soundworld.dataset import clips
    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld import BASE_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="SoundWorld model folder (default: the shipped base)")
    parser.add_argument("--clips", type=int, default=600, help="held-out test clips to draw the sequences from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scenes, audio = clips(0, "test", args.clips)
    pipe = TangoPipeline.from_pretrained(args.model or BASE_MODEL_DIR)
    result = caption_sensitivity(pipe, scenes, audio, seed=args.seed)
    rows = result.table()
    print(f"{result.true_errors.shape[1]} sequence clips; true caption vs edited, same noise")
    print("| timestep | variant | true caption better | mean relative gap |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['timestep']} | {r['variant']} | {r['true_better']:.2f} | {r['relative_gap']:+.4f} |")
    n_probe = min(args.clips, 160)
    print(f"\ncross-attention queries: time position read by a linear probe ({n_probe // 2} clips fit, "
          f"{n_probe - n_probe // 2} held out, true captions)")
    print("| timestep | layer | grid | R^2 | first/second half right |\n|---|---|---|---|---|")
    for r in query_time_probe(pipe, [s.caption for s in scenes[:n_probe]], audio[:n_probe], seed=args.seed):
        print(f"| {r['timestep']} | {r['layer']} | {r['grid']} | {r['r2']:.2f} | {r['half_accuracy']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
