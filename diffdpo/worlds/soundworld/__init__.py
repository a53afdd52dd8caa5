"""SoundWorld: a synthetic text-to-audio world whose truth is known.

Eight procedural sound events, AudioCaps-style captions with temporal relations and exact
timelines (:mod:`.scenes`), log-mel features (:mod:`.audio`), dataset splits (:mod:`.dataset`),
and the shipped models under ``weights/``: an event-detecting oracle (:mod:`.oracle`), a small
CLAP used as the proxy scorer (:mod:`.clap`, CLAP backend ``"soundworld"``) and a Tango-shaped
base generator (``BASE_MODEL_DIR``, run by :class:`diffdpo.diffusion.tango.TangoPipeline`; preference
generator ``"soundworld"``). See docs/soundworld.md.
"""

from pathlib import Path

from diffdpo.worlds.soundworld.events import EVENT_NAMES, EVENTS, SAMPLE_RATE
from diffdpo.worlds.soundworld.scenes import (CLIP_SECONDS, KINDS, OVERLAP, SEQUENCE, SINGLE, Scene,
                                             TimelineEntry, compose_caption, make_clip, parse_caption,
                                             sample_scene, scene_from_caption)

WEIGHTS_DIR = Path(__file__).parent / "weights"
BASE_MODEL_DIR = WEIGHTS_DIR / "generator"
# The shipped bases, each a generator and the proxy CLAP trained on the same captions: "clean" learnt
# from captions as written, "weak" from weakly labelled ones (docs/soundworld_weak_captions.md). Both
# share one VAE and are judged by one oracle (WEIGHTS_DIR / "oracle"). weights_flow/generator is the weak
# base's rectified-flow variant (same captions, so the weak CLAP scores it): a demo config names it with
# ``base: weak`` and ``base_model`` (recipes/configs/soundworld_demo_flow.yaml).
BASES = {"clean": WEIGHTS_DIR, "weak": Path(__file__).parent / "weights_weak"}


def base_generator(config):
    """The preference builder's ``"soundworld"`` generator: the shipped base unless ``generator.path``."""
    from diffdpo.prefs.backends import TangoLayoutGenerator

    return TangoLayoutGenerator(config.path or str(BASE_MODEL_DIR), config.num_inference_steps,
                                config.guidance_scale, config.batch_size)

# The CLAP backend is registered lazily (a "module:attr" string): nothing heavy is imported here.
from diffdpo.metrics.clap import register_clap_backend  # noqa: E402

register_clap_backend("soundworld", "diffdpo.worlds.soundworld.clap:SoundWorldClap")

__all__ = ["CLIP_SECONDS", "EVENTS", "EVENT_NAMES", "KINDS", "OVERLAP", "SAMPLE_RATE", "SEQUENCE", "SINGLE",
           "Scene", "TimelineEntry", "WEIGHTS_DIR", "BASE_MODEL_DIR", "BASES", "base_generator", "compose_caption", "make_clip", "parse_caption",
           "sample_scene", "scene_from_caption"]
