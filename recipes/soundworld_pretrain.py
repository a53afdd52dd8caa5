"""Pretrain SoundWorld's models from scratch on CPU and write the shipped weights.

    python recipes/soundworld_pretrain.py --config recipes/configs/soundworld_pretrain.yaml
    python recipes/soundworld_pretrain.py --config recipes/configs/soundworld_pretrain.yaml stages=[oracle]

Stages (run in this order; each can run alone, later ones load what earlier ones wrote):
  oracle     per-frame event detector (log-mel CNN), validated on held-out clips
  clap       the SoundWorld CLAP (contrastive audio/text), the proxy scorer
  generator  mel VAE, then UNet + T5 text encoder jointly (EMA weights ship) in the Tango layout
  decoder    the generator's VAE decoder fine-tuned with its encoder frozen: better mels from the
             same latent space, so the UNet is untouched (<output_dir>/generator, in place)
  evaluate   the base generator judged by the oracle on held-out captions, and whether its
             likelihood reads a caption's order (diffdpo.worlds.soundworld.sensitivity)
``generator_init=<a saved generator>`` continues training one (its tokenizer and VAE kept) instead
of starting from scratch; the manifest keeps the earlier run's entry under ``continued_from``.
Data is synthesised in memory from ``data.seed`` (train split for training, validation split for
the numbers). Every stage records command, seed, git commit, wall time and metrics in
``<output_dir>/MANIFEST.json``.

Weak captions: the ``weak_captions:`` section (:class:`~diffdpo.worlds.soundworld.weak_captions.WeakCaptionConfig`;
all rates 0, the clean captions, by default) corrupts the captions the clap and generator stages learn
from — events left out, order words dropped, vague words, captions of other clips — the same weak
caption for a clip in both stages; the audio, the timelines and the oracle stay the truth. Both stages
record the settings and the per-corruption counters in the manifest
(recipes/configs/soundworld_pretrain_weak.yaml, docs/soundworld_weak_captions.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffdpo.config import load_config, run_main
from diffdpo.diffusion.tango.audio import AudioConfig, log_mel
from diffdpo.worlds.soundworld.clap import ClapArch, ClapTrainConfig
from diffdpo.worlds.soundworld.components import GeneratorArch
from diffdpo.worlds.soundworld.dataset import SPLIT_IDS, clips
from diffdpo.worlds.soundworld.events import EVENTS
from diffdpo.worlds.soundworld.oracle import OracleArch, OracleTrainConfig
from diffdpo.worlds.soundworld.train import GeneratorConfig, LoopConfig, VAEConfig
from diffdpo.worlds.soundworld.weak_captions import WeakCaptionConfig, weaken_captions

STAGES = ("oracle", "clap", "generator", "decoder", "evaluate")


@dataclass
class DataConfig:
    seed: int = field(default=0, metadata={"help": "SoundWorld data seed (clip i of split s = make_clip([seed, s, i]))"})
    oracle_clips: int = field(default=6000, metadata={"help": "training clips for the oracle"})
    clap_clips: int = field(default=8000, metadata={"help": "training clips for the CLAP"})
    generator_clips: int = field(default=8000, metadata={"help": "training clips for VAE and generator"})
    decoder_clips: int = field(default=6000, metadata={"help": "training clips for the decoder fine-tune"})
    validation_clips: int = field(default=600, metadata={"help": "held-out clips for oracle/CLAP/VAE numbers"})


@dataclass
class EvalConfig:
    captions: int = field(default=400, metadata={"help": "held-out captions (test split) to generate"})
    steps: int = field(default=25, metadata={"help": "DDIM steps"})
    guidance: float = field(default=3.0, metadata={"help": "CFG scale"})
    seed: int = field(default=1234, metadata={"help": "first noise seed (caption i uses seed + i)"})
    sensitivity_clips: int = field(default=600, metadata={
        "help": "held-out test clips whose sequences measure whether the generator reads order (0 = skip)"})


@dataclass
class PretrainConfig:
    output_dir: str = field(default="diffdpo/worlds/soundworld/weights", metadata={"help": "where weights go"})
    work_dir: str = field(default="runs/soundworld_pretrain", metadata={"help": "logs and snapshots"})
    stages: list[str] = field(default_factory=lambda: list(STAGES), metadata={"help": f"subset of {STAGES}"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    seed: int = field(default=0, metadata={"help": "model initialisation / training seed"})
    generator_init: str = field(default="", metadata={
        "help": "a saved SoundWorld generator to continue training (its tokenizer and VAE are kept, not "
                "retrained; UNet and text encoder start from its weights); empty = from scratch"})
    vae_init: str = field(default="", metadata={
        "help": "a saved SoundWorld generator whose VAE (and latent shift/scale) is reused, frozen; tokenizer, "
                "text encoder and UNet start from scratch: two bases that differ only in their captions"})
    data: DataConfig = field(default_factory=DataConfig)
    oracle_arch: OracleArch = field(default_factory=OracleArch)
    oracle: OracleTrainConfig = field(default_factory=OracleTrainConfig)
    clap_arch: ClapArch = field(default_factory=ClapArch)
    clap: ClapTrainConfig = field(default_factory=ClapTrainConfig)
    arch: GeneratorArch = field(default_factory=GeneratorArch)
    vae: VAEConfig = field(default_factory=VAEConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    decoder: LoopConfig = field(default_factory=lambda: LoopConfig(steps=2000, max_minutes=5, lr=3e-4, warmup=20))
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    weak_captions: WeakCaptionConfig = field(default_factory=WeakCaptionConfig, metadata={
        "help": "caption corruption for the clap and generator stages' training pairs (all 0 = clean captions)"})

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; valid: {list(STAGES)}")
        if self.generator_init and self.vae_init:
            raise ValueError("generator_init and vae_init: give one (a continued generator keeps its own VAE)")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def update_manifest(output_dir: Path, name: str, entry: dict) -> None:
    """Merge ``entry`` under ``name`` into MANIFEST.json (atomic write)."""
    path = output_dir / "MANIFEST.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest[name] = entry
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def mels_of(seed: int, split: str, n: int, cfg: AudioConfig):
    scenes, audio = clips(seed, split, n)
    return scenes, audio, log_mel(audio, cfg)


def training_captions(cfg: PretrainConfig, scenes) -> tuple[list[str], list[str], dict]:
    """The captions the clap and generator stages train on, each clip's reversed-order CLAP negative
    ("" for none) and the manifest record (settings and per-corruption counters).

    Clip ``i`` of the training split gets the same weak caption in every stage (its draw depends on
    ``weak_captions.seed``, ``data.seed``, the split and ``i`` only). With every rate 0 the captions
    are the scenes' own, exactly.
    """
    weak, counts = weaken_captions(scenes, cfg.weak_captions, key=(cfg.data.seed, SPLIT_IDS["train"]))
    record = {"enabled": cfg.weak_captions.enabled, "counts": counts.as_dict()}
    return [w.text for w in weak], [w.order_negative() for w in weak], record


def stage_oracle(cfg: PretrainConfig, out: Path, log) -> dict:
    from diffdpo.worlds.soundworld.oracle import Oracle, evaluate_oracle, train_oracle

    acfg = AudioConfig()
    scenes, audio, mels = mels_of(cfg.data.seed, "train", cfg.data.oracle_clips, acfg)
    oracle = Oracle.build(cfg.oracle_arch, acfg)
    train_metrics = train_oracle(oracle, scenes, audio, cfg.oracle, seed=cfg.seed, log=log)
    v_scenes, v_audio = clips(cfg.data.seed, "validation", cfg.data.validation_clips)
    metrics = {"train": train_metrics, "validation_clean": evaluate_oracle(oracle, v_scenes, v_audio)}
    oracle.save_pretrained(out / "oracle")
    return metrics


def stage_clap(cfg: PretrainConfig, out: Path, log) -> dict:
    from diffdpo.worlds.soundworld.clap import SoundWorldClap, order_awareness, retrieval_accuracy, train_clap

    acfg = AudioConfig()
    scenes, audio = clips(cfg.data.seed, "train", cfg.data.clap_clips)
    captions, negatives, weak = training_captions(cfg, scenes)
    if cfg.weak_captions.enabled:
        # the vocabulary also covers the clean wording, so held-out (clean) captions tokenize fully
        model = SoundWorldClap.build(cfg.clap_arch, captions + [s.caption for s in scenes], acfg)
        train_metrics = train_clap(model, scenes, audio, cfg.clap, seed=cfg.seed, log=log, captions=captions,
                                   order_negatives=negatives)
    else:
        model = SoundWorldClap.build(cfg.clap_arch, [s.caption for s in scenes], acfg)
        train_metrics = train_clap(model, scenes, audio, cfg.clap, seed=cfg.seed, log=log)
    v_scenes, v_audio = clips(cfg.data.seed, "validation", cfg.data.validation_clips)
    metrics = {"train": train_metrics, "validation": {**retrieval_accuracy(model, v_scenes, v_audio),
                                                      **order_awareness(model, v_scenes, v_audio)},
               "weak_captions": weak}
    model.save_pretrained(out / "clap")
    return metrics


def stage_generator(cfg: PretrainConfig, out: Path, work: Path, log) -> dict:
    from diffdpo.worlds.soundworld.components import build_scheduler, build_text_encoder, build_unet, build_vae, train_tokenizer
    from diffdpo.diffusion.tango.position import set_position_features
    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld.train import (copy_ema, encode_mels, reconstruction_l1, train_generator,
                                                 train_vae)

    acfg = AudioConfig()
    scenes, _, mels = mels_of(cfg.data.seed, "train", cfg.data.generator_clips, acfg)
    _, _, v_mels = mels_of(cfg.data.seed, "validation", cfg.data.validation_clips, acfg)
    captions, _, weak = training_captions(cfg, scenes)

    torch.manual_seed(cfg.seed)
    if cfg.generator_init:
        base = TangoPipeline.from_pretrained(cfg.generator_init)
        tokenizer, vae, text_encoder, unet = base.tokenizer, base.vae, base.text_encoder, base.unet
        shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
        latents = encode_mels(vae, mels)
        vae_metrics = {"kept_from": str(cfg.generator_init)}
    else:
        if cfg.vae_init:
            vae = TangoPipeline.from_pretrained(cfg.vae_init).vae
            shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
            latents = encode_mels(vae, mels)
            vae_metrics = {"kept_from": str(cfg.vae_init)}
        else:
            vae = build_vae(acfg.n_mels, cfg.arch)
            vae_metrics = train_vae(vae, mels, cfg.vae, seed=cfg.seed, log=log)
            latents = encode_mels(vae, mels)
            shift, scale = latents.mean().item(), 1.0 / latents.std().item()
            vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        # every phrase of every event, so no word a template can produce is missing from the vocabulary
        phrases = [p for e in EVENTS.values() for p in (*e.sentences, *e.nouns)]
        # with weak captions the clean wording joins the vocabulary (held-out captions are clean)
        clean = [s.caption for s in scenes] if cfg.weak_captions.enabled else []
        tokenizer = train_tokenizer(captions + phrases + clean)
        text_encoder = build_text_encoder(len(tokenizer), cfg.arch)
        unet = build_unet(latents.shape[-1], cfg.arch)
    if cfg.arch.query_time or cfg.arch.key_position:  # the order saddle's way out (docs/soundworld.md)
        set_position_features(unet, cfg.arch.query_time, cfg.arch.key_position)
    vae_metrics["validation_logmel_l1"] = reconstruction_l1(vae, v_mels)
    vae_metrics.update(latent_shift=shift, latent_scale=scale)
    print(f"vae: {vae_metrics}", flush=True)
    scheduler = build_scheduler(cfg.generator.prediction_type, cfg.generator.timestep_spacing)

    def pipeline_with(ema_unet, ema_text) -> TangoPipeline:
        import copy

        u, t = copy.deepcopy(unet), copy.deepcopy(text_encoder)
        copy_ema(ema_unet, u)
        copy_ema(ema_text, t)
        return TangoPipeline(tokenizer, t.eval(), vae, u.eval(), scheduler, acfg)

    def snapshot(step: int, ema_unet, ema_text) -> None:
        pipeline_with(ema_unet, ema_text).save_pretrained(work / "generator_snapshot")
        print(f"snapshot at step {step} -> {work / 'generator_snapshot'}", flush=True)

    if cfg.weak_captions.enabled:  # a continued generator's tokenizer may not know a weak caption's words
        unk = tokenizer.unk_token_id
        weak["captions_with_unknown_words"] = sum(unk in ids for ids in tokenizer(captions).input_ids)
    gen_metrics, ema_unet, ema_text = train_generator(
        unet, text_encoder, tokenizer, scheduler, (latents - shift) * scale, captions, cfg.generator,
        seed=cfg.seed, log=log, snapshot=snapshot)
    pipeline_with(ema_unet, ema_text).save_pretrained(out / "generator")
    params = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet))}
    metrics = {"vae": vae_metrics, "generator": gen_metrics, "parameters": params, "vocab_size": len(tokenizer),
               "weak_captions": weak}
    earlier = Path(cfg.generator_init).parent / "MANIFEST.json"
    if cfg.generator_init and earlier.exists():  # keep how the starting point was made
        metrics["continued_from"] = json.loads(earlier.read_text()).get("generator")
    vae_source = Path(cfg.vae_init).parent / "MANIFEST.json"
    if cfg.vae_init and vae_source.exists():  # how the reused VAE was made (its decoder stage included)
        made = json.loads(vae_source.read_text())
        metrics["vae_from"] = {k: made.get(k, {}).get("command") for k in ("generator", "decoder")}
    return metrics


def stage_decoder(cfg: PretrainConfig, out: Path, log) -> dict:
    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld.train import reconstruction_l1, train_decoder

    pipe = TangoPipeline.from_pretrained(out / "generator")
    acfg = pipe.audio_config
    _, _, mels = mels_of(cfg.data.seed, "train", cfg.data.decoder_clips, acfg)
    _, _, v_mels = mels_of(cfg.data.seed, "validation", cfg.data.validation_clips, acfg)
    before = reconstruction_l1(pipe.vae, v_mels)
    metrics = train_decoder(pipe.vae, mels, cfg.decoder, seed=cfg.seed, log=log)
    metrics.update(validation_logmel_l1_before=before, validation_logmel_l1=reconstruction_l1(pipe.vae, v_mels))
    print(f"decoder: {metrics}", flush=True)
    pipe.save_pretrained(out / "generator")  # atomic; every other component as it was loaded
    return metrics


def stage_evaluate(cfg: PretrainConfig, out: Path, log) -> dict:
    from diffdpo.worlds.soundworld.evaluate import evaluate_generator
    from diffdpo.worlds.soundworld.oracle import Oracle
    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld.sensitivity import caption_sensitivity

    pipe = TangoPipeline.from_pretrained(out / "generator")
    oracle = Oracle.from_pretrained(out / "oracle")
    ev = cfg.evaluate
    scenes, audio = clips(cfg.data.seed, "test", max(ev.captions, ev.sensitivity_clips))  # synthesised once
    verdict = evaluate_generator(pipe, oracle, [s.caption for s in scenes[:ev.captions]], steps=ev.steps,
                                 guidance=ev.guidance, seed=ev.seed)
    if ev.sensitivity_clips:  # does the likelihood read the caption's events and their order?
        n = ev.sensitivity_clips
        verdict["caption_sensitivity"] = caption_sensitivity(pipe, scenes[:n], audio[:n], seed=ev.seed).table()
    return verdict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generator.steps=100")
    args = parser.parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    torch.set_num_threads(cfg.threads)
    out, work = Path(cfg.output_dir), Path(cfg.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "metrics.jsonl", "a")

    def log(step: int, metrics: dict) -> None:
        log_file.write(json.dumps({"time": time.time(), "step": step, **metrics}) + "\n")
        log_file.flush()

    command = " ".join([Path(sys.executable).name, *sys.argv])
    for stage in [s for s in STAGES if s in cfg.stages]:
        t0 = time.time()
        print(f"== stage {stage}", flush=True)
        if stage == "generator":
            metrics = stage_generator(cfg, out, work, log)
        else:
            metrics = {"oracle": stage_oracle, "clap": stage_clap, "decoder": stage_decoder,
                       "evaluate": stage_evaluate}[stage](cfg, out, log)
        section = {"oracle": {"arch": cfg.oracle_arch, "train": cfg.oracle},
                   "clap": {"arch": cfg.clap_arch, "train": cfg.clap, "weak_captions": cfg.weak_captions},
                   "generator": {"arch": cfg.arch, "vae": cfg.vae, "train": cfg.generator,
                                 "weak_captions": cfg.weak_captions},
                   "decoder": {"train": cfg.decoder},
                   "evaluate": {"eval": cfg.evaluate}}[stage]
        update_manifest(out, stage, {
            "command": command, "git_commit": git_commit(), "seed": cfg.seed, "data_seed": cfg.data.seed,
            "threads": cfg.threads, "wall_minutes": round((time.time() - t0) / 60, 2),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": {"data": asdict(cfg.data), **{k: asdict(v) for k, v in section.items()}},
            "metrics": metrics})
        print(f"== {stage} done in {(time.time() - t0) / 60:.1f} min: {json.dumps(metrics)[:2000]}", flush=True)
    print(f"weights: {out} (MANIFEST.json: command, commit, metrics of each stage); logs: {work / 'metrics.jsonl'}")


if __name__ == "__main__":
    run_main(main)
