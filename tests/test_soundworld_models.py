"""SoundWorld's shipped models: the oracle judges fresh clips right, the CLAP is deterministic and
scores matching captions above mismatched ones, the base generator loads and samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffdpo.worlds.soundworld import SEQUENCE, WEIGHTS_DIR, make_clip
from diffdpo.worlds.soundworld.dataset import clips

FRESH_SEED = 987  # a data seed no shipped model was trained on


@pytest.fixture(scope="module")
def fresh():
    return clips(FRESH_SEED, "test", 48)


@pytest.fixture(scope="module")
def oracle():
    from diffdpo.worlds.soundworld.oracle import Oracle

    return Oracle.from_pretrained()


@pytest.fixture(scope="module")
def clap():
    from diffdpo.worlds.soundworld.clap import SoundWorldClap

    return SoundWorldClap()


def test_shipped_weights_are_small_and_described():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 50 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")], "weights must be safetensors"
    manifest = json.loads((WEIGHTS_DIR / "MANIFEST.json").read_text())
    for stage in ("oracle", "clap", "generator", "evaluate"):
        entry = manifest[stage]
        assert {"command", "git_commit", "seed", "wall_minutes", "config", "metrics"} <= set(entry), stage


def test_oracle_on_fresh_clips(oracle, fresh):
    """Against the exact timelines of clips it never saw (presence F1 and order, >= 0.9 on 48 clips)."""
    from diffdpo.worlds.soundworld.oracle import evaluate_oracle

    scenes, audio = fresh
    result = evaluate_oracle(oracle, scenes, audio)["clean"]
    assert result["n_sequences"] >= 10
    assert result["presence_f1"] >= 0.9 and result["order_accuracy"] >= 0.9, result


def test_oracle_order_follows_the_audio(oracle):
    """Rendering the same two events in both orders flips the detected order."""
    from diffdpo.worlds.soundworld.scenes import Scene

    flips = 0
    for i, (a, b) in enumerate([("dog", "bell"), ("siren", "knock"), ("bird", "engine"), ("rain", "clock")]):
        _, ab = make_clip([FRESH_SEED, 9, i], scene=Scene(SEQUENCE, (a, b), f"{a} then {b}"))
        _, ba = make_clip([FRESH_SEED, 9, i], scene=Scene(SEQUENCE, (b, a), f"{b} then {a}"))
        d_ab, d_ba = oracle.detect([ab, ba])
        flips += d_ab.order == (a, b) and d_ba.order == (b, a)
    assert flips >= 3


def test_oracle_scorer_ranks_by_the_oracles_verdict(fresh):
    """The builder's oracle scorer: satisfied (1) + presence F1 for the clip's own caption; a caption
    naming other events scores lower, and audio at another rate is refused."""
    from diffdpo.worlds.soundworld.evaluate import OracleScorer

    scenes, audio = fresh
    scorer = OracleScorer()
    own = scorer.score([s.caption for s in scenes], list(audio), 16000)
    assert np.mean(own == 2.0) >= 0.9
    shifted = [scenes[(i + 1) % len(scenes)].caption for i in range(len(scenes))]
    other = scorer.score(shifted, list(audio), 16000)
    differ = [i for i in range(len(scenes)) if set(scenes[i].events) != set(scenes[(i + 1) % len(scenes)].events)]
    assert np.mean(other[differ] < own[differ]) >= 0.9
    with pytest.raises(ValueError, match="22050 Hz"):
        scorer.score([scenes[0].caption], [audio[0]], 22050)


def test_decoder_ceiling_judges_real_clips_through_each_path(oracle, fresh):
    """A stand-in pipeline whose vocoder returns the real clip a mel came from, and whose VAE
    swaps each mel for the next clip's: the ``vocoder`` path must be judged as the real clips
    and the ``vae_vocoder`` path as the next clips, batch boundaries included."""
    from diffdpo.diffusion.tango.audio import AudioConfig, log_mel
    from diffdpo.worlds.soundworld.evaluate import decoder_ceiling, judge

    scenes, audio = fresh[0][:12], fresh[1][:12]
    mels = log_mel(torch.as_tensor(audio), AudioConfig())

    class Stand:
        audio_config = AudioConfig()

        def _index(self, mel):
            return [int(torch.argmin(((mels - m) ** 2).flatten(1).sum(1))) for m in mel]

        mel_to_latents = staticmethod(lambda mel: mel)

        def latents_to_mel(self, latents):
            return mels[[(i + 1) % len(mels) for i in self._index(latents)]]

        def mel_to_audio(self, mel):
            return torch.as_tensor(audio[self._index(mel)])

    result = decoder_ceiling(Stand(), oracle, scenes, audio, batch_size=5)
    assert result["vocoder"] == judge(scenes, oracle.detect(audio))
    assert result["vae_vocoder"] == judge(scenes, oracle.detect(np.roll(audio, -1, axis=0)))


def test_score_detection_by_hand():
    from diffdpo.worlds.soundworld.oracle import Detection, score_detection
    from diffdpo.worlds.soundworld.scenes import Scene

    want = Scene(SEQUENCE, ("dog", "bell"), "A dog barks, then a bell rings")
    det = lambda *ev: Detection(ev, {e: float(i) for i, e in enumerate(ev)}, np.zeros((8, 64)))
    assert score_detection(want, det("dog", "bell")) == {"presence_f1": 1.0, "events_exact": True,
                                                         "order_correct": True}
    assert score_detection(want, det("bell", "dog"))["order_correct"] is False
    # {dog, rain} vs {dog, bell}: tp = 1, F1 = 2 * 1 / (2 + 2)
    assert score_detection(want, det("dog", "rain"))["presence_f1"] == pytest.approx(0.5)
    assert score_detection(want, det())["presence_f1"] == 0.0


def test_clap_is_deterministic_and_batch_independent(clap, fresh):
    scenes, audio = fresh
    texts = [s.caption for s in scenes[:6]]
    a1, a2 = clap.embed_audio(list(audio[:6])), clap.embed_audio(list(audio[:6]))
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    torch.testing.assert_close(clap.embed_audio([audio[3]])[0], a1[3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clap.embed_text(texts[2:3])[0], clap.embed_text(texts)[2], rtol=1e-5, atol=1e-5)
    assert clap.checkpoint_id != "untrained" and clap.sample_rate == 16_000


def test_clap_embeds_clips_of_different_lengths(clap, fresh):
    """Each clip is cropped or zero-padded to 2 s on its own, so lengths may differ in one call."""
    _, audio = fresh
    short, long = audio[0][:20_000], np.concatenate([audio[1], np.zeros(8_000, np.float32)])
    both = clap.embed_audio([short, long])
    padded = np.concatenate([short, np.zeros(12_000, np.float32)])
    torch.testing.assert_close(both[0], clap.embed_audio([padded])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], clap.embed_audio([audio[1]])[0], rtol=1e-5, atol=1e-5)


def test_clap_hears_order(clap, fresh):
    """On fresh sequences the true caption outscores the same caption with the events reversed
    (trained with reversed-caption negatives; in-batch negatives alone gave 0.52)."""
    from diffdpo.worlds.soundworld.clap import order_awareness

    scenes, audio = fresh
    result = order_awareness(clap, scenes, audio)
    assert result["n_sequences"] >= 10 and result["order_win_rate"] >= 0.8, result


def test_clap_backend_scores_match_a_hand_cosine(clap, fresh):
    from diffdpo.metrics.clap import clap_score, get_clap_backend

    assert type(get_clap_backend("soundworld")).__name__ == "SoundWorldClap"
    scenes, audio = fresh
    texts = [s.caption for s in scenes[:8]]
    got = clap_score(clap, texts, list(audio[:8]), 16_000).per_item
    t, a = clap.embed_text(texts).double().numpy(), clap.embed_audio(list(audio[:8])).double().numpy()
    hand = (t * a).sum(1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(a, axis=1))
    np.testing.assert_allclose(got, hand, rtol=1e-5, atol=1e-6)


def test_clap_prefers_the_right_caption(clap, fresh):
    """The true caption outscores a caption naming none of the clip's events, on most clips."""
    from diffdpo.worlds.soundworld import EVENT_NAMES
    from diffdpo.worlds.soundworld.scenes import SINGLE, compose_caption

    scenes, audio = fresh
    rng = np.random.default_rng(0)
    wrong = [compose_caption(SINGLE, (next(e for e in EVENT_NAMES if e not in s.events),), rng) for s in scenes]
    true = clap.similarity([s.caption for s in scenes], list(audio))
    other = clap.similarity(wrong, list(audio))
    assert np.mean(true > other) >= 0.9


@pytest.fixture(scope="module")
def pipe():
    from diffdpo.diffusion.tango.pipeline import TangoPipeline
    from diffdpo.worlds.soundworld import BASE_MODEL_DIR

    return TangoPipeline.from_pretrained(BASE_MODEL_DIR)


def test_shipped_generator_has_the_layout_and_samples(pipe):
    root = WEIGHTS_DIR / "generator"
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "TangoStylePipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels + 1  # the time ramp
    caps = ["A dog barks, then a bell rings", "Rain falls"]
    audio = pipe(caps, num_inference_steps=2, guidance_scale=3.0, seed=5)
    assert len(audio) == 2 and audio[0].shape == (32_000,) and audio[0].dtype == np.float32
    assert all(np.isfinite(a).all() and np.abs(a).max() > 0 for a in audio)
    # caption i uses noise seed + i whatever else is in the batch
    alone = pipe(caps[1:], num_inference_steps=2, seed=6, output="latent")
    both = pipe(caps, num_inference_steps=2, seed=5, output="latent")
    torch.testing.assert_close(alone[0], both[1], rtol=1e-4, atol=1e-4)


def test_pipeline_round_trips_through_save_pretrained(pipe, tmp_path):
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    pipe.save_pretrained(tmp_path / "copy")
    again = TangoPipeline.from_pretrained(tmp_path / "copy")
    a = pipe(["A siren wails"], num_inference_steps=2, seed=1, output="latent")
    b = again(["A siren wails"], num_inference_steps=2, seed=1, output="latent")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for config in (tmp_path / "copy").glob("*/*config.json"):  # nothing about where it was loaded from
        text = config.read_text()
        assert str(WEIGHTS_DIR) not in text and "_name_or_path" not in text and "local_files_only" not in text, config


def test_missing_model_folder_says_what_is_missing(tmp_path):
    from diffdpo.worlds.soundworld.clap import SoundWorldClap
    from diffdpo.worlds.soundworld.oracle import Oracle
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    with pytest.raises(FileNotFoundError, match="missing"):
        TangoPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no oracle"):
        Oracle.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no SoundWorld CLAP"):
        SoundWorldClap(tmp_path)


def test_time_ramp_channel():
    from diffdpo.diffusion.tango.position import with_time_ramp

    x = torch.zeros(2, 4, 3, 5)
    y = with_time_ramp(x, 5)
    assert y.shape == (2, 5, 3, 5)
    torch.testing.assert_close(y[1, 4, 2], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    assert with_time_ramp(x, 4) is x
    with pytest.raises(ValueError, match="input channels"):
        with_time_ramp(x, 7)


def test_position_features_by_hand():
    """Each query token gets query_time * tau / sqrt(C) (tau -1..1 along time, the fast axis of the
    square grid), each text state key_position * (j / 8 - 1) / sqrt(D); softmax attention computed
    by hand on those shifted inputs, one head."""
    from diffusers.models.attention_processor import Attention

    from diffdpo.diffusion.tango.position import PositionalCrossAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=6, cross_attention_dim=5, heads=1, dim_head=6).eval()
    attn.set_processor(PositionalCrossAttnProcessor(query_time=2.0, key_position=3.0))
    h, states = torch.randn(1, 9, 6), torch.randn(1, 4, 5)  # a 3x3 grid, 4 text tokens
    with torch.no_grad():
        got = attn(h, encoder_hidden_states=states)
        tau = torch.tensor([-1.0, 0.0, 1.0] * 3)
        q = attn.to_q(h + 2.0 * tau[None, :, None] / 6 ** 0.5)
        shifted = states + 3.0 * (torch.arange(4.0) / 8 - 1)[None, :, None] / 5 ** 0.5
        k, v = attn.to_k(shifted), attn.to_v(shifted)
        want = attn.to_out[0](torch.softmax(q @ k.transpose(1, 2) / 6 ** 0.5, dim=-1) @ v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        attn(torch.randn(1, 8, 6), encoder_hidden_states=states)


def test_position_features_round_trip_and_leave_self_attention_alone(pipe, tmp_path):
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    from diffdpo.diffusion.tango.position import position_features, set_position_features
    from diffdpo.diffusion.tango.pipeline import TangoPipeline

    def copy_of_pipe():
        other = copy.copy(pipe)
        other.unet = copy.deepcopy(pipe.unet)
        return other

    plain_pipe, featured = copy_of_pipe(), copy_of_pipe()
    set_position_features(plain_pipe.unet, 0.0, 0.0)
    assert position_features(plain_pipe.unet) is None
    assert set_position_features(featured.unet, 4.0, 2.0) == 7  # every cross-attention, no self-attention
    assert sum(isinstance(p, AttnProcessor2_0) for p in featured.unet.attn_processors.values()) == 7
    featured.save_pretrained(tmp_path / "featured")
    index = json.loads((tmp_path / "featured" / "model_index.json").read_text())
    assert index["position_features"] == {"query_time": 4.0, "key_position": 2.0}
    again = TangoPipeline.from_pretrained(tmp_path / "featured")
    assert position_features(again.unet) == {"query_time": 4.0, "key_position": 2.0}
    a = featured(["A dog barks, then a bell rings"], num_inference_steps=2, seed=3, output="latent")
    b = again(["A dog barks, then a bell rings"], num_inference_steps=2, seed=3, output="latent")
    plain = plain_pipe(["A dog barks, then a bell rings"], num_inference_steps=2, seed=3, output="latent")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - plain).abs().max() > 1e-3
    set_position_features(again.unet, 0.0, 0.0)
    assert position_features(again.unet) is None
    torch.testing.assert_close(again(["A dog barks, then a bell rings"], num_inference_steps=2, seed=3,
                                     output="latent"), plain, rtol=1e-5, atol=1e-5)


def test_cli_sample_then_detect(tmp_path, capsys):
    from diffdpo.cli import main

    wav = tmp_path / "bell.wav"
    assert main(["soundworld", "sample", "--caption", "A bell rings", "--out", str(wav), "--steps", "2"]) == 0
    assert main(["soundworld", "detect", str(wav)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert result["path"] == str(wav) and isinstance(result["order"], list)


def test_cli_ceiling_reports_both_paths(capsys):
    from diffdpo.cli import main

    assert main(["soundworld", "ceiling", "--clips", "4"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [l["path"] for l in lines] == ["vocoder", "vae_vocoder"] and all(l["clips"] == 4 for l in lines)
    assert all(0.0 <= l["caption_satisfied"] <= 1.0 for l in lines)


def test_edited_captions_reverse_and_replace_events():
    import random

    from diffdpo.worlds.soundworld.scenes import scene_from_caption
    from diffdpo.worlds.soundworld.sensitivity import edited_captions

    scene = scene_from_caption("A dog barks, then a bell rings")
    edits = edited_captions(scene, random.Random(0))
    assert edits["reversed"] == "A bell rings, then a dog barks"
    replaced = scene_from_caption(edits["replaced"])
    assert len(set(replaced.events) & {"dog", "bell"}) == 1 and len(replaced.events) == 2
    with pytest.raises(ValueError, match="not a sequence"):
        edited_captions(scene_from_caption("Rain falls"), random.Random(0))


def test_sensitivity_table_by_hand():
    from diffdpo.worlds.soundworld.sensitivity import Sensitivity

    s = Sensitivity([500], np.array([[1.0, 2.0, 3.0]]), {"reversed": np.array([[1.0, 3.0, 2.0]])})
    (row,) = s.table()
    assert row["true_better"] == pytest.approx((0.5 + 1 + 0) / 3)  # a tie counts half
    assert row["relative_gap"] == pytest.approx((0 + 0.5 - 1 / 3) / 3)


def test_caption_sensitivity_errors_by_hand(pipe, fresh):
    """The reported errors are the UNet's denoising MSE (against its own prediction type's target)
    at one shared noise per clip; the shipped base reads which events a caption names (the
    replaced-event control)."""
    from diffusers import DDPMScheduler

    from diffdpo.diffusion.tango.audio import log_mel
    from diffdpo.worlds.soundworld.sensitivity import caption_sensitivity

    scenes, audio = fresh
    result = caption_sensitivity(pipe, scenes, audio, timesteps=(900,), seed=3, batch_size=7)
    picked = [i for i, s in enumerate(scenes) if s.kind == SEQUENCE]
    assert result.true_errors.shape == (1, len(picked)) and len(picked) >= 10
    latents = pipe.mel_to_latents(log_mel(audio[picked], pipe.audio_config))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    steps = torch.full((len(picked),), 900)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    noisy = ddpm.add_noise(latents, noise, steps)
    # the target the model was trained on: the noise, or diffusers' velocity for a v-prediction model
    target = noise if ddpm.config.prediction_type == "epsilon" else ddpm.get_velocity(latents, noise, steps)
    with torch.no_grad():
        states, mask = pipe.encode_text([scenes[i].caption for i in picked])
        hand = (pipe.unet_forward(noisy, steps, states, mask) - target).pow(2).mean(dim=(1, 2, 3))
    np.testing.assert_allclose(result.true_errors[0], hand.numpy(), rtol=1e-4)
    replaced = next(r for r in result.table() if r["variant"] == "replaced")
    assert replaced["true_better"] > 0.7 and replaced["relative_gap"] > 0.05


def test_caption_sensitivity_of_a_flow_base_by_hand(pipe, fresh):
    """On a rectified-flow schedule timestep 900 is s = 0.9: x_t = 0.1 x0 + 0.9 eps, target eps - x0 (by hand)."""
    import copy

    from diffdpo.diffusion.tango.audio import log_mel
    from diffdpo.worlds.soundworld.components import build_scheduler
    from diffdpo.worlds.soundworld.sensitivity import caption_sensitivity

    flow = copy.copy(pipe)
    flow.scheduler = build_scheduler("flow_matching")
    scenes, audio = fresh
    result = caption_sensitivity(flow, scenes, audio, timesteps=(900,), seed=3, batch_size=7)
    picked = [i for i, s in enumerate(scenes) if s.kind == SEQUENCE]
    latents = flow.mel_to_latents(log_mel(audio[picked], flow.audio_config))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        states, mask = flow.encode_text([scenes[i].caption for i in picked])
        pred = flow.unet_forward(0.1 * latents + 0.9 * noise, torch.full((len(picked),), 900.0), states, mask)
    np.testing.assert_allclose(result.true_errors[0], (pred - (noise - latents)).pow(2).mean(dim=(1, 2, 3)).numpy(),
                               rtol=1e-4)


def test_linear_probe_by_hand():
    """A target that is a feature is read exactly; one independent of the features is not."""
    from diffdpo.worlds.soundworld.sensitivity import linear_probe

    rng = np.random.default_rng(0)
    target = rng.uniform(size=400)
    noise = rng.standard_normal((400, 5))
    exact = linear_probe(np.c_[noise, 3 * target - 1], target, n_fit=200, ridge=1e-9)
    assert exact["r2"] == pytest.approx(1.0, abs=1e-6) and exact["half_accuracy"] == 1.0
    blind = linear_probe(noise, target, n_fit=200)
    assert blind["r2"] < 0.05 and 0.35 < blind["half_accuracy"] < 0.65
    # without the ridge it is ordinary least squares: numpy's lstsq fit, scored on the held-out rows
    noisy = noise[:, 0] * 0.3 + target + 0.2 * rng.standard_normal(400)
    features = np.c_[noise, noisy]
    probe = linear_probe(features, target, n_fit=200, ridge=1e-12)
    design = np.c_[features, np.ones(400)]
    weights = np.linalg.lstsq(design[:200], target[:200], rcond=None)[0]
    pred = design[200:] @ weights
    assert probe["r2"] == pytest.approx(1 - ((pred - target[200:]) ** 2).mean() / target[200:].var(), abs=1e-9)
    assert probe["half_accuracy"] == np.mean((pred > 0.5) == (target[200:] > 0.5))


def test_query_time_probe_reads_what_enters_each_cross_attention(pipe, fresh):
    """One row per cross-attention layer and timestep (in the order the forward pass reaches them),
    on the layer's own grid; the probe is fitted to the tokens that enter attn2 (checked against a
    hand capture and fit), and the hooks are removed."""
    from diffdpo.diffusion.tango.audio import log_mel
    from diffdpo.worlds.soundworld.sensitivity import linear_probe, query_time_probe

    scenes, audio = fresh
    captions, audio = [s.caption for s in scenes[:16]], audio[:16]
    rows = query_time_probe(pipe, captions, audio, timesteps=(700,), seed=5)
    layers = [n for n, m in pipe.unet.named_modules() if getattr(m, "attn2", None) is not None]
    assert sorted(r["layer"] for r in rows) == sorted(layers) and {r["grid"] for r in rows} == {"16x16", "8x8"}
    assert all(not m._forward_pre_hooks for m in pipe.unet.modules())

    from diffusers import DDPMScheduler

    first = dict(pipe.unet.named_modules())[layers[0]]
    seen = []
    hook = first.attn2.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                                 with_kwargs=True)
    latents = pipe.mel_to_latents(log_mel(audio, pipe.audio_config))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    steps = torch.full((16,), 700)
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, steps)
    with torch.no_grad():
        pipe.unet_forward(noisy, steps, *pipe.encode_text(captions))
    hook.remove()
    tokens = seen[0].numpy()  # [16, 256, C]: a 16x16 grid, time the fast axis
    position = np.tile(np.tile(np.arange(16) / 15, 16), 16)
    hand = linear_probe(tokens.reshape(-1, tokens.shape[-1]), position, n_fit=8 * 256)
    (row,) = [r for r in rows if r["layer"] == layers[0]]
    assert row["grid"] == "16x16" and row["r2"] == pytest.approx(hand["r2"], abs=1e-6)
    assert row["half_accuracy"] == pytest.approx(hand["half_accuracy"])
