"""``diffdpo soundworld``: the synthetic text-to-audio world.

    diffdpo soundworld make-data --out data/soundworld --train 2000 --validation 200 --test 200
    diffdpo soundworld sample --caption "A bell rings, then a dog barks" --out bell_dog.wav
    diffdpo soundworld detect clip.wav
    diffdpo soundworld ceiling --clips 600   # real test clips through the model's VAE + vocoder, judged
    diffdpo soundworld reproduce --config recipes/configs/soundworld_reproduce_weak.yaml  # dose-response
    diffdpo soundworld compare --config recipes/configs/soundworld_compare_flow.yaml      # losses side by side
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="soundworld_command", metavar="ACTION", required=True)

    p = sub.add_parser("make-data", help="write train/validation/test splits (wav + JSONL)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training clips")
    p.add_argument("--validation", type=int, default=200, help="validation clips")
    p.add_argument("--test", type=int, default=200, help="test clips")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(_action=_make_data)

    p = sub.add_parser("sample", help="generate audio for captions with a SoundWorld-layout model")
    p.add_argument("--caption", action="append", required=True, help="caption (repeatable)")
    p.add_argument("--out", required=True, help="output wav (one caption) or folder (several)")
    p.add_argument("--model", default=None, help="model folder (default: the shipped base model)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(_action=_sample)

    p = sub.add_parser("detect", help="run the oracle on wav files: events present and their order")
    p.add_argument("wavs", nargs="+")
    p.set_defaults(_action=_detect)

    p = sub.add_parser("ceiling", help="the oracle on real test clips passed through a model's vocoder, and its "
                                       "VAE + vocoder: what a UNet (or DPO on it) can reach at best")
    p.add_argument("--model", default=None, help="model folder (default: the shipped base model)")
    p.add_argument("--clips", type=int, default=600, help="held-out test clips")
    p.add_argument("--seed", type=int, default=0, help="SoundWorld data seed")
    p.set_defaults(_action=_ceiling)

    from diffdpo.worlds.soundworld import reproduce

    p = sub.add_parser("reproduce", help="dose-response: a demo config's method trained on nested subsets of one "
                                         "preference set (0 ... 2000 pairs), oracle and proxy against pairs, report.html")
    reproduce.add_arguments(p)
    p.set_defaults(_action=reproduce.run)

    from diffdpo.worlds.soundworld import compare

    p = sub.add_parser("compare", help="preference losses side by side: each arm trained on one preference set, "
                                       "checkpoints judged by the oracle, paired CIs, report.html")
    compare.add_arguments(p)
    p.set_defaults(_action=compare.run)


def run(args: argparse.Namespace) -> int:
    return args._action(args)


def _make_data(args: argparse.Namespace) -> int:
    from diffdpo.worlds.soundworld.dataset import write_split

    for split in ("train", "validation", "test"):
        n = getattr(args, split)
        if n < 0:
            raise SystemExit(f"--{split} must be >= 0, got {n}")
        path = write_split(args.out, split, n, args.seed)
        print(f"{split}: {n} clips -> {path}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import soundfile as sf

    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld import BASE_MODEL_DIR

    pipe = TangoPipeline.from_pretrained(args.model or BASE_MODEL_DIR)
    audio = pipe(args.caption, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    if len(args.caption) == 1:
        targets = [Path(args.out)]
    else:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        targets = [Path(args.out) / f"sample_{i:03d}.wav" for i in range(len(args.caption))]
    for path, wave in zip(targets, audio):
        sf.write(path, wave, pipe.audio_config.sample_rate)
        print(path)
    return 0


def _detect(args: argparse.Namespace) -> int:
    import soundfile as sf

    from diffdpo.worlds.soundworld.oracle import Oracle

    oracle = Oracle.from_pretrained()
    for path in args.wavs:
        audio, sr = sf.read(path, dtype="float32")
        if sr != oracle.audio_config.sample_rate:
            raise SystemExit(f"{path}: sample rate {sr}, the oracle expects {oracle.audio_config.sample_rate}")
        det = oracle.detect([audio if audio.ndim == 1 else audio.mean(axis=1)])[0]
        print(json.dumps({"path": path, "events": list(det.events), "order": list(det.order)}))
    return 0


def _ceiling(args: argparse.Namespace) -> int:
    from collections import Counter

    import numpy as np

    from diffdpo.worlds.soundworld.dataset import clips
    from diffdpo.worlds.soundworld.evaluate import decoder_ceiling
    from diffdpo.worlds.soundworld.oracle import Oracle
    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld import BASE_MODEL_DIR

    if args.clips < 1:
        raise SystemExit(f"--clips must be >= 1, got {args.clips}")
    scenes, audio = clips(args.seed, "test", args.clips)
    pipe = TangoPipeline.from_pretrained(args.model or BASE_MODEL_DIR)
    result = decoder_ceiling(pipe, Oracle.from_pretrained(), scenes, audio)
    for path, verdict in result.items():
        rows = verdict["rows"]
        extra = Counter(event for r in rows for event in set(r["detected"]) - set(r["events"]))
        print(json.dumps({"path": path, "clips": len(rows),
                          "caption_satisfied": float(np.mean([r["satisfied"] for r in rows])),
                          "presence_f1": verdict["summary"]["all"]["presence_f1"]["mean"],
                          "extra_events": dict(extra.most_common())}))
    return 0
