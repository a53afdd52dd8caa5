"""The full-size Diffusion-DPO steps of ``bench/bench_full_size.py`` on one CUDA GPU, bf16 autocast.

Same code path as the CPU benchmark (its ``measure``: the toolkit's DPO step under accelerate, the
plain-torch floor, the SFT step), at the published UNet sizes, with the attention diffusers picks
by default (``AttnProcessor2_0`` = ``torch.nn.functional.scaled_dot_product_attention``; checked
and reported). For each family and variant it prints the DPO step time, the peak
``torch.cuda.max_memory_allocated`` of the DPO phase, DPO/floor and SFT/floor, and samples per
second (winner + loser = 2 samples per pair), as a table and as JSON at ``--json`` (default
``$OUT/gpu_check.json`` when ``$OUT`` is set). A time budget (``--budget-s``, default 420 s)
skips what would not fit and says so; SD1.5 and Tango run first.

Without CUDA (or with ``--cpu-reduced``) the same code runs on tiny configs of the same classes on
the CPU, so a test covers it.

    python bench/gpu_check.py [--families sd15 tango audioldm audioldm2 sdxl] [--json PATH]
    python bench/gpu_check.py --cpu-reduced --json /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_full_size as bfs  # noqa: E402

# Variants on the GPU, per family, in the order they run. Full fine-tuning keeps fp32 master weights
# (AdamW states fp32) under bf16 autocast; the frozen copy is cast to bf16 as the trainer does.
GPU_PLAN = {
    "sd15": ["full+copy+bf16", "lora+lora_disabled+bf16", "full+cached+bf16"],
    "tango": ["full+copy+bf16", "lora+lora_disabled+bf16", "full+cached+bf16"],
    "audioldm": ["full+copy+bf16", "lora+lora_disabled+bf16"],
    "audioldm2": ["full+copy+bf16", "full+cached+bf16"],  # its UNet class takes no add_adapter (no LoRA)
    "sdxl": ["lora+lora_disabled+bf16", "lora+lora_disabled+gc+bf16"],
}
# Rough seconds one variant takes on an H100 (model build included), for the budget check.
EXPECTED_S = {"sd15": 35, "tango": 35, "audioldm": 20, "audioldm2": 25, "sdxl": 70}


def run(families: list[str], cpu_reduced: bool, steps: int, warmup: int, budget_s: float,
        variants: list[str] | None = None) -> dict:
    import torch

    device = "cpu" if cpu_reduced else "cuda"
    started = time.time()
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (reduced configs)",
              "reduced": cpu_reduced, "steps": steps, "warmup": warmup, "pairs_per_step": 1,
              "torch": torch.__version__, "budget_s": budget_s, "results": []}
    for family in families:
        for name in variants or GPU_PLAN[family]:
            elapsed = time.time() - started
            expected = 2 if cpu_reduced else EXPECTED_S[family]
            if elapsed + expected > budget_s:
                report["results"].append({"family": family, "variant": name, "status": "skipped",
                                          "reason": f"time budget: {elapsed:.0f}s spent of {budget_s:.0f}s"})
                continue
            unsupported = bfs.unsupported_reason(family, bfs.Variant.parse(name))
            if unsupported:
                report["results"].append({"family": family, "variant": name, "status": "unsupported",
                                          "reason": unsupported})
                continue
            try:
                res = bfs.measure(family, name, steps=steps, warmup=warmup, reduced=cpu_reduced, device=device)
            except torch.cuda.OutOfMemoryError as err:  # a GPU smaller than expected: say so, go on
                res = {"family": family, "variant": name, "status": "out of memory", "reason": str(err)[:200]}
            except Exception as err:  # noqa: BLE001  (one failure must not hide the other families)
                res = {"family": family, "variant": name, "status": "failed",
                       "reason": f"{type(err).__name__}: {str(err)[:300]}"}
            res["wall_s"] = time.time() - started - elapsed
            if res["status"] == "ok":
                res["sdpa"] = res["attention_processors"] == ["AttnProcessor2_0"]
            report["results"].append(res)
            print(line(res), flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    report["total_wall_s"] = time.time() - started
    return report


def line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['family']:9s} {r['variant']:28s} {r['status']}: {r.get('reason', '')}"
    return (f"{r['family']:9s} {r['variant']:28s} DPO {r['dpo_step_s'] * 1e3:8.1f} ms  floor "
            f"{r['floor_step_s'] * 1e3:8.1f} ms  x{r['dpo_over_floor']:.3f}  SFT/floor {r['sft_over_floor']:.3f}  "
            f"{r['samples_per_s']:7.1f} samples/s  peak {r['peak_dpo_gib']:6.2f} GiB")


def table(results: list[dict]) -> str:
    lines = ["| family | variant | DPO ms/step | floor ms/step | DPO/floor | SFT/floor | samples/s | peak GiB "
             "(max_memory_allocated) | attention |", "|" + "---|" * 9]
    for r in results:
        if r["status"] == "ok":
            lines.append(f"| {r['family']} | {r['variant']} | {r['dpo_step_s'] * 1e3:.1f} | "
                         f"{r['floor_step_s'] * 1e3:.1f} | {r['dpo_over_floor']:.3f} | {r['sft_over_floor']:.3f} | "
                         f"{r['samples_per_s']:.1f} | {r['peak_dpo_gib']:.2f} | {'/'.join(r['attention_processors'])} |")
        else:
            lines.append(f"| {r['family']} | {r['variant']} | - | - | - | - | - | - | {r['status']}: "
                         f"{r.get('reason', '')[:120]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(GPU_PLAN), choices=list(GPU_PLAN))
    parser.add_argument("--variants", nargs="+", default=None, help="override GPU_PLAN for every family")
    parser.add_argument("--steps", type=int, default=5, help="timed DPO/floor/SFT steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting variants after this")
    parser.add_argument("--cpu-reduced", action="store_true", help="tiny configs on the CPU (also without CUDA)")
    default_json = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    parser.add_argument("--json", type=Path, default=default_json)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cpu_reduced = args.cpu_reduced or not torch.cuda.is_available()
    if cpu_reduced and not args.cpu_reduced:
        print("no CUDA device: running the reduced configs on the CPU (--cpu-reduced)", flush=True)
    if not cpu_reduced:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = run(args.families, cpu_reduced, args.steps, args.warmup, args.budget_s, args.variants)
    print("\n" + table(report["results"]))
    print(f"\n{report['device']}: {report['total_wall_s']:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
