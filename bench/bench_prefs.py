"""Preference-builder overhead over raw batched sampling, as a ratio, in one run.

Both sides generate exactly the same samples (same prompts, same seeds, same batches) with the
same generator; the builder additionally perturbs captions, scores every sample, selects pairs
and writes media, shards and the manifest. A ratio near 1 means sampling dominates.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_prefs.py [--captions 24] [--steps 4] [--family tango]

``--demo [--base clean|weak]`` measures the demo's own build instead: the shipped SoundWorld base, the
demo's prefs section (recipes/configs/soundworld_demo.yaml) and SoundWorld training captions, and says
where the builder's time goes (denoising loop, VAE decode + vocoder, scoring, the rest) and what the
demo's budget allows (pairs per minute).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from diffdpo.config import load_config
from diffdpo.diffusion.tiny import build_tiny
from diffdpo.prefs.backends import ClapScorer, make_generator
from diffdpo.prefs.build import BuildConfig, _plan, build_preferences, unique_captions
from diffdpo.prefs.perturb import Perturber

EVENTS = ["a dog barks", "a bell rings", "rain falls", "a siren wails", "birds chirp", "an engine hums"]
LINKS = ["followed by", "while", "then"]


def captions(n: int) -> list[str]:
    out = []
    for i in range(n):
        a, b = EVENTS[i % len(EVENTS)], EVENTS[(i // len(EVENTS) + i + 1) % len(EVENTS)]
        out.append(f"{a} {LINKS[i % len(LINKS)]} {b}" if a != b else a)
    return out


class Timed:
    """Wall seconds spent inside one callable (the bench's view of where a build's time goes)."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def demo_bench(args) -> None:
    from diffdpo.prefs.backends import make_generator, make_scorer
    from diffdpo.prefs.build import _default_vocab
    from diffdpo.prefs.perturb import make_perturber
    from diffdpo.worlds.soundworld.dataset import split_scenes
    from diffdpo.worlds.soundworld.demo import DemoConfig, prefs_config

    demo = load_config(DemoConfig, Path(__file__).parents[1] / "recipes/configs/soundworld_demo.yaml",
                       [f"base={args.base}"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scenes = split_scenes(demo.data_seed, "train", args.captions, demo.train_kinds)
        (tmp / "train_captions.txt").write_text("".join(s.caption + "\n" for s in scenes))
        config = prefs_config(demo, tmp)
        generator, scorer = make_generator(config.generator), make_scorer(config.scorer)
        unique, _ = unique_captions([s.caption for s in scenes])
        shards = [unique[s:s + config.shard_size] for s in range(0, len(unique), config.shard_size)]
        perturber = make_perturber(config.perturb.backend, config.perturb.vocabulary or _default_vocab(), config.seed)
        plans = [_plan(config, shard, perturber)[0] for shard in shards]
        generator.generate(["A dog barks"], [0])  # warm up
        pipe = generator.pipe
        denoise, decode = Timed(pipe.sample_latents), Timed(pipe.latents_to_mel)
        vocode, score = Timed(pipe.mel_to_audio), Timed(scorer.score)
        pipe.sample_latents, pipe.latents_to_mel, pipe.mel_to_audio, scorer.score = denoise, decode, vocode, score
        raws, builds, parts = [], [], []
        for r in range(args.repeats):  # alternate the sides so a busy machine hurts both alike
            start = time.perf_counter()
            for jobs in plans:
                generator.generate([j.prompt for j in jobs], [j.seed for j in jobs])
            raws.append(time.perf_counter() - start)
            for t in (denoise, decode, vocode, score):
                t.seconds = 0.0
            config.out = str(tmp / f"set{r}")
            start = time.perf_counter()
            manifest = build_preferences(config, generator=generator, scorer=scorer, progress=False)
            builds.append(time.perf_counter() - start)
            parts.append((denoise.seconds, decode.seconds, vocode.seconds, score.seconds))
    raw, built = min(raws), min(builds)
    best = parts[builds.index(built)]
    samples, pairs = sum(len(p) for p in plans), manifest["pairs"]
    print(f"demo build, base={args.base}: captions={len(unique)} samples={samples} pairs={pairs} "
          f"steps={config.generator.num_inference_steps} batch={config.generator.batch_size} threads={torch_threads()}")
    print(f"raw batched sampling: {raw:.1f} s ({raw / samples:.3f} s a sample)")
    print(f"preference builder:   {built:.1f} s ({60 * pairs / built:.1f} pairs a minute, {samples / pairs:.2f} samples a pair)")
    print(f"builder / raw sampling = {built / raw:.3f}  (min of {args.repeats} alternating runs; "
          f"raw {[round(x, 1) for x in raws]}, builder {[round(x, 1) for x in builds]})")
    rest = built - sum(best)
    print("builder time: " + ", ".join(f"{name} {sec:.1f} s ({sec / built:.0%})" for name, sec in zip(
        ("denoising loop", "VAE decode", "vocoder", "scoring", "rest (perturb, select, write)"), (*best, rest))))
    print(f"2,000 pairs at this rate: {2000 * built / pairs / 60:.1f} minutes of building")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the minimum counts")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--family", default="tango")
    parser.add_argument("--demo", action="store_true", help="the demo's build on the shipped SoundWorld base")
    parser.add_argument("--base", default="clean", help="--demo: the shipped base (clean or weak)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.demo:
        return demo_bench(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny(args.family, tmp / "model")
        (tmp / "captions.txt").write_text("\n".join(captions(args.captions)))
        config = load_config(BuildConfig, Path(__file__).parents[1] / "recipes/configs/prefs_tiny.yaml", [
            f"captions={tmp / 'captions.txt'}", f"out={tmp / 'set'}", f"generator.kind={args.family}",
            f"generator.path={model}", f"generator.num_inference_steps={args.steps}", "shard_size=8",
            "scorer.kind=clap:soundworld"])
        generator = make_generator(config.generator)
        try:
            scorer = ClapScorer("soundworld")
        except FileNotFoundError:  # no shipped SoundWorld CLAP yet: same class, random weights
            from diffdpo.worlds.soundworld.clap import ClapArch, SoundWorldClap
            scorer = ClapScorer.__new__(ClapScorer)
            scorer.embedder, scorer.batch_size = SoundWorldClap.build(ClapArch(), captions(args.captions)), 32
            scorer.id = {"kind": "clap", **scorer.embedder.describe()}
        unique, _ = unique_captions(captions(args.captions))
        shards = [unique[s:s + config.shard_size] for s in range(0, len(unique), config.shard_size)]
        perturber = Perturber(seed=config.seed)
        plans = [_plan(config, shard, perturber)[0] for shard in shards]
        generator.generate(["warm up"], [0])

        raws, builds = [], []
        for r in range(args.repeats):  # alternate the sides so a busy machine hurts both alike
            start = time.perf_counter()
            for jobs in plans:  # the builder calls generate once per shard: do the same
                generator.generate([j.prompt for j in jobs], [j.seed for j in jobs])
            raws.append(time.perf_counter() - start)
            config.out = str(tmp / f"set{r}")
            start = time.perf_counter()
            manifest = build_preferences(config, generator=generator, scorer=scorer, progress=False)
            builds.append(time.perf_counter() - start)
        raw, built = min(raws), min(builds)

    samples = sum(len(p) for p in plans)
    print(f"family={args.family} captions={len(unique)} samples={samples} steps={args.steps} pairs={manifest['pairs']}")
    print(f"raw batched sampling: {raw:.2f} s ({samples / raw:.1f} samples/s)")
    print(f"preference builder:   {built:.2f} s ({manifest['pairs'] / built:.2f} pairs/s)")
    print(f"builder / raw sampling = {built / raw:.3f}  (min of {args.repeats} alternating runs; "
          f"raw {[round(x, 2) for x in raws]}, builder {[round(x, 2) for x in builds]})")


if __name__ == "__main__":
    main()
