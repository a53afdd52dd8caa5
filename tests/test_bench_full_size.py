"""bench/bench_full_size.py and bench/gpu_check.py in their reduced modes (tiny configs of the same
UNet classes, CPU): the JSON they write, the step they time, and the reference they use."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_full_size as bfs  # noqa: E402
import gpu_check  # noqa: E402

RESULT_KEYS = {"family", "variant", "status", "dpo_step_s", "sft_step_s", "floor_step_s", "dpo_over_floor",
               "sft_over_floor", "peak_dpo_gib", "params", "trainable_params", "param_change_after_dpo", "losses"}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """The benches run accelerate in-process here, with mixed precision in some variants; its state is
    process-wide, so reset it for the tests that come after (an Accelerator with another precision
    would refuse to start)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_published_unet_configs_are_the_hub_files():
    """The four carried configs: their classes and the facts the bench's shapes rest on; SDXL's
    bytes hash to the git-lfs oid of the hub file and AudioLDM2's size is the hub's 1,514 bytes."""
    unets = bfs.UNETS
    sd15, sdxl = json.loads((unets / "sd15.json").read_text()), json.loads((unets / "sdxl.json").read_text())
    ldm, ldm2 = json.loads((unets / "audioldm.json").read_text()), json.loads((unets / "audioldm2.json").read_text())
    assert sd15["_class_name"] == "UNet2DConditionModel" and sd15["cross_attention_dim"] == 768
    assert sdxl["cross_attention_dim"] == 2048 and sdxl["addition_time_embed_dim"] == 256
    assert sdxl["projection_class_embeddings_input_dim"] == 6 * 256 + 1280  # time ids + pooled text
    assert ldm["class_embed_type"] == "simple_projection" and ldm["projection_class_embeddings_input_dim"] == 512
    assert ldm2["_class_name"] == "AudioLDM2UNet2DConditionModel" and ldm2["cross_attention_dim"][0] == [None, 768, 1024]
    assert hashlib.sha256((unets / "sdxl.json").read_bytes()).hexdigest() == \
        "30ebc70750223e59006f7f2b4e1e6c102570aa19a9c4ae3e1fbe7591332dbae6"
    assert (unets / "audioldm2.json").stat().st_size == 1514
    assert "huggingface.co" in (unets / "SOURCES.md").read_text()
    for family, spec in bfs.FAMILIES.items():  # each family's latent channels match its denoiser's
        packed = 4 if family == "flux" else 1  # Flux reads 2x2 patches packed into channels
        channels = spec.latent[-1] if family == "tangoflux" else spec.latent[0]  # tangoflux: [frames, channels]
        assert json.loads(spec.config.read_text())["in_channels"] == packed * channels, family


@pytest.mark.parametrize("family", list(bfs.FAMILIES))
def test_reduced_step_of_every_family_trains_and_is_timed(family):
    """The measured DPO step moves the policy's weights; every timing and ratio is finite and
    positive; the loss starts at log 2 (policy = reference at step 0)."""
    variant = "full+copy"
    r = bfs.measure(family, variant, steps=1, warmup=0, reduced=True)
    assert RESULT_KEYS <= set(r) and r["status"] == "ok"
    for key in ("dpo_step_s", "sft_step_s", "floor_step_s", "dpo_over_floor", "sft_over_floor", "peak_dpo_gib"):
        assert _positive(r[key]), (key, r[key])
    assert r["param_change_after_dpo"] > 0
    assert r["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert r["latent"] == list(bfs.FAMILIES[family].reduced_latent)


@pytest.mark.parametrize("family", ["sd15", "tango"])  # epsilon and v-prediction targets
def test_lora_disabled_reference_equals_frozen_copy_and_an_independent_computation(family):
    from peft import LoraConfig

    from diffdpo.diffusion.encode import repeat_for_pair
    from diffdpo.diffusion.logratios import draw_pairs, pair_errors, pair_inputs, pair_seed
    from diffdpo.diffusion.reference import FrozenCopyReference, LoraDisabledReference

    unet = bfs.build_unet(family, reduced=True)
    base = copy.deepcopy(unet).eval()  # the weights before any adapter: the independent reference
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=bfs.LORA_RANK, lora_alpha=bfs.LORA_RANK, init_lora_weights="gaussian",
                                target_modules=bfs.LORA_TARGETS))
    scheduler, predict = bfs.make_scheduler(family), bfs.predictor(family)
    shape = bfs.latent_shape(family, reduced=True)
    g = torch.Generator().manual_seed(3)
    w, l = torch.randn(1, *shape, generator=g), torch.randn(1, *shape, generator=g)
    cond = bfs.condition(family, 1, reduced=True)
    draws = draw_pairs([pair_seed(0, 0, None)], shape, 1000, 0.0)
    inputs = pair_inputs(scheduler, w, l, draws)

    def run(model):
        return pair_errors(lambda x, t, c: predict(model, x, t, c), inputs, repeat_for_pair(cond))

    frozen = FrozenCopyReference(unet).errors(run, [0])
    disabled = LoraDisabledReference(unet).errors(run, [0])

    # independent: x_t and the target from the schedule's alphas, the base UNet called directly
    a = scheduler.alphas_cumprod[draws.step_index.long()].view(-1, 1, 1, 1)
    expected = []
    for x0 in (w, l):
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * draws.noise
        target = draws.noise if family == "sd15" else a.sqrt() * draws.noise - (1 - a).sqrt() * x0
        kwargs = bfs.backbone_shim(family).unet_kwargs(cond)
        with torch.no_grad():
            pred = base(x_t, draws.step_index.long(), **kwargs).sample
        expected.append(((pred - target) ** 2).mean(dim=(1, 2, 3)))
    for got in (frozen, disabled):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(disabled[0], frozen[0], rtol=1e-6, atol=1e-7)


def test_reduced_bench_writes_json_with_ratios_and_labels(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    report = bfs.main(["--reduced", "--families", "sd15", "--variants", "lora+copy", "lora+lora_disabled",
                       "lora+lora_disabled+fp16", "--steps", "1", "--warmup", "0", "--json", str(out),
                       "--md", str(md)])
    data = json.loads(out.read_text())
    assert data["reduced"] is True and data["date"] and data["machine"]["cpus"] >= 1
    assert data["pairs_per_step"] == 1 and set(data["shapes"]) == {"sd15"}
    rows = {r["variant"]: r for r in data["results"]}
    for name in ("lora+copy", "lora+lora_disabled"):
        r = rows[name]
        assert r["status"] == "ok" and RESULT_KEYS <= set(r)
        assert all(_positive(r[k]) for k in ("dpo_over_floor", "sft_over_floor", "peak_dpo_gib"))
        assert r["param_change_after_dpo"] > 0
        assert r["trainable_params"] < r["params"]  # only the adapters train
    assert rows["lora+lora_disabled+fp16"]["status"] == "GPU only"
    ratio = data["lora_disabled_vs_copy"]["sd15:lora+lora_disabled"]
    assert _positive(ratio["peak_ratio"]) and ratio["vs"] == "lora+copy"
    assert "| sd15 | lora+copy |" in md.read_text() and report["results"] == data["results"]


def test_unsupported_and_oversized_variants_are_named_not_run():
    v = bfs.Variant.parse("lora+lora_disabled+gc+bf16")
    assert (v.train, v.reference, v.gc, v.precision) == ("lora", "lora_disabled", True, "bf16")
    with pytest.raises(ValueError):
        bfs.Variant.parse("full+lora_disabled")
    assert "add_adapter" in bfs.unsupported_reason("audioldm2", bfs.Variant.parse("lora+copy"))
    assert bfs.unsupported_reason("audioldm2", bfs.Variant.parse("full+copy")) is None
    assert "gradient checkpointing" in bfs.unsupported_reason("audioldm2", bfs.Variant.parse("full+copy+gc"))
    # SDXL's 2.57B-parameter UNet, fully fine-tuned with a frozen copy: weights x2 + grads + AdamW
    # states alone are about 48 GiB, before any activation; the same with LoRA is its weights
    counts = bfs.count_params("sdxl")
    assert counts["params"] == 2_567_463_684 and 0 < counts["lora"] < counts["params"] // 100
    assert bfs.static_gib(counts["params"], counts["lora"], bfs.Variant.parse("full+copy")) > 22
    assert bfs.static_gib(counts["params"], counts["lora"], bfs.Variant.parse("lora+lora_disabled")) < 12
    v = bfs.Variant.parse("lora+lora_disabled+gc@512")
    assert v.side == 512 and v.base == "lora+lora_disabled+gc" and bfs.latent_shape("sdxl", side=512) == (4, 64, 64)
    assert "image families only" in bfs.unsupported_reason("tangoflux", v)  # an audio sequence has no side


def test_flow_transformers_at_published_size_what_fits_24_gib():
    """SD3-medium's transformer (2.03B) trains with LoRA within 24 GiB before activations; a full fine-tune
    with a frozen copy does not; FLUX.1-dev's (11.9B, the size its bf16 weight index gives: 23.8 GB) does not
    fit even its fp32 weights. Counted on the meta device from the published configs."""
    sd3, flux = bfs.count_params("sd3"), bfs.count_params("flux")
    assert sd3["params"] == 2_028_328_000 and flux["params"] == 11_901_408_320
    assert abs(flux["params"] * 2 - 23_802_816_640) < 0.001 * 23_802_816_640
    lora = bfs.Variant.parse("lora+lora_disabled+gc")
    assert bfs.static_gib(sd3["params"], sd3["lora"], lora) < 10
    assert bfs.static_gib(sd3["params"], sd3["lora"], bfs.Variant.parse("full+copy")) > 24
    assert bfs.static_gib(flux["params"], flux["lora"], lora) > 44
    assert bfs.latent_shape("sd3", side=512) == (16, 64, 64)
    assert "flux" in {f for f, _ in bfs.DEFAULT_PLAN} and bfs.make_scheduler("sd3").config.shift == 3.0


def test_gpu_check_cpu_reduced_writes_its_table(tmp_path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--cpu-reduced", "--families", "sd15", "audioldm2", "--steps", "1", "--warmup", "0",
                             "--variants", "lora+lora_disabled+bf16", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = {(r["family"], r["variant"]): r for r in data["results"]}
    r = rows[("sd15", "lora+lora_disabled+bf16")]
    assert r["status"] == "ok" and r["sdpa"] is True and r["attention_processors"] == ["AttnProcessor2_0"]
    assert all(_positive(r[k]) for k in ("dpo_step_s", "dpo_over_floor", "samples_per_s", "peak_dpo_gib"))
    assert r["param_change_after_dpo"] > 0
    assert rows[("audioldm2", "lora+lora_disabled+bf16")]["status"] == "unsupported"
    assert report["reduced"] is True and "| sd15 | lora+lora_disabled+bf16 |" in gpu_check.table(data["results"])
