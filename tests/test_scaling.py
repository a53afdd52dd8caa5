"""Scaling out (docs/scaling.md): the accelerate configs in recipes/accelerate/ load with accelerate's own
classes and give the engines they name; under FSDP2 on 2 gloo processes (tests/helpers/cpu_fsdp.py
says why a harness is needed on CPU) the LLM and diffusion recipes make 1 process's update and a
kill -9'd run resumes bit-identically."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def launch_args(config: Path):
    """The args ``accelerate launch --config_file config`` builds, merged with the file as accelerate does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    _validate_launch_command(args)
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_each_config_loads_with_accelerate_and_states_its_launch_line(config):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    launches = [line[1:].split() for line in config.read_text().splitlines()
                if line.startswith(f"#   accelerate launch --config_file recipes/accelerate/{config.name} ")]
    assert launches, f"{config.name}: no launch line in its header"
    for words in launches:  # the recipe and its config exist
        assert all((ROOT / w).is_file() for w in words if w.startswith("recipes/")), words
    cluster = ClusterConfig.from_yaml_file(str(config))  # unknown top-level keys raise here
    # nested keys accelerate copies onto its launch arguments without checking them: a typo is silently ignored
    dests = {a.dest for a in launch_command_parser()._actions}
    nested = [("fsdp_" + k if not k.startswith("fsdp") else k) for k in cluster.fsdp_config]
    nested += list(cluster.deepspeed_config)
    assert not [k for k in nested if k not in dests], f"{config.name}: keys accelerate launch does not know"
    assert launch_args(config).num_processes == cluster.num_processes


def _fsdp_plugin(config: Path, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    for key, value in prepare_multi_gpu_env(launch_args(config)).items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    return FullyShardedDataParallelPlugin()


def test_fsdp_configs_shard_fully_and_wrap_the_blocks_they_name(monkeypatch, tmp_path):
    """The plugin accelerate builds from each FSDP file is FSDP2 with full state dicts, and its wrap
    classes exist in the models the recipes shard (accelerate raises for a class it cannot find)."""
    import llm_helpers as H
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from diffusers import UNet2DConditionModel

    from diffdpo.diffusion.tiny import build_tiny
    from diffdpo.llm.logps import LogpsModel

    tok = H.tokenizer()
    unet = UNet2DConditionModel.from_pretrained(build_tiny("sd15", tmp_path / "sd15") / "unet")
    for name, model in (("fsdp_llama", LogpsModel(H.model(tok))), ("fsdp_unet", unet)):
        plugin = _fsdp_plugin(ROOT / "recipes" / "accelerate" / f"{name}.yaml", monkeypatch)
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert "FULL_STATE_DICT" in str(plugin.state_dict_type) and not plugin.cpu_ram_efficient_loading
        plugin.set_auto_wrap_policy(model)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = {type(m).__name__ for m in model.modules() if policy(m)}
        named = set(yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{name}.yaml").read_text())
                    ["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","))
        assert wrapped == named, name


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_hold_the_settings_the_docs_rely_on(monkeypatch, stage):
    """DeepSpeed is not installed here (it needs CUDA to run): accelerate's own DeepSpeedPlugin, built
    from the environment its launcher writes, checks the fields without it."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    config = ROOT / "recipes" / "accelerate" / f"deepspeed_zero{stage}.yaml"
    args = launch_args(config)
    args.deepspeed_fields_from_accelerate_config = ",".join(yaml.safe_load(config.read_text())["deepspeed_config"])
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    ds = DeepSpeedPlugin().deepspeed_config
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"  # the trainers hash whole initial weights
    if stage == 3:  # accelerate.get_state_dict refuses to gather ZeRO-3 weights without it
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_trainers_refuse_deepspeed_and_fsdp1_with_a_pointer_to_fsdp2():
    from accelerate.utils import DistributedType

    from diffdpo.training.sharding import check_engine

    with pytest.raises(ValueError, match="DeepSpeed is not supported.*FSDP2"):
        check_engine(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_engine(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False))
    check_engine(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True))


# ------------------------------------------------------------------ FSDP2 runs on 2 CPU processes

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
       "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "ACCELERATE_USE_CPU": "1"}


def fsdp_launch(config: str, recipe: str, port: int, args: list[str]) -> list[str]:
    """``accelerate launch`` with a file of recipes/accelerate/, 2 processes, through the CPU harness."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
            str(ROOT / "recipes" / "accelerate" / config), "--num_processes", "2", "--main_process_port", str(port),
            str(ROOT / "tests" / "helpers" / "cpu_fsdp.py"), str(ROOT / "recipes" / recipe), *args]


def run_ok(cmd: list[str]) -> str:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill9_after(cmd: list[str], checkpoint: Path, out: Path) -> None:
    """Start ``cmd`` and SIGKILL the launcher and every worker (torchrun gives each its own session)
    as soon as ``checkpoint`` exists."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in _process_tree(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (out / "final").exists(), "the run was not killed mid-training"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A tiny Llama and preference files on disk, and one uninterrupted 2-process FSDP2 run of
    recipes/llm_dpo.py: 4 steps of 2 pairs x 2 accumulation steps per process, checkpoints at 2 and 4."""
    import llm_helpers as H

    root = tmp_path_factory.mktemp("llm_fsdp")
    tok = H.tokenizer()
    H.model(tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    train_path = H.write_jsonl(H.pair_rows(24), root / "train.jsonl")
    common = [f"model.name_or_path={root / 'model'}", f"data.train_path={train_path}", "train.max_steps=4",
              "train.lr=1e-3", "train.report_to=none", "train.progress=false", "train.max_grad_norm=0.01"]
    fsdp = [*common, "train.batch_size=2", "train.grad_accum=2", "train.save_every=2"]
    run_ok(fsdp_launch("fsdp_llama.yaml", "llm_dpo.py", 29571, [*fsdp, f"train.output_dir={root / 'fsdp'}"]))
    return SimpleNamespace(root=root, common=common, fsdp=fsdp)


def test_llm_fsdp_two_processes_equal_one_process(llm):
    """2 processes x (2 pairs x 2 accumulation steps) under FSDP2 == 1 process x 8 pairs: the
    reference log-probs are scored through the sharded model, gradients are reduce-scattered and
    clipped across shards (clipping is active, so a wrong scale would show)."""
    import json

    from diffdpo.config import load_config
    from diffdpo.llm.trainer import LLMDPOConfig, train

    summary = json.loads((llm.root / "fsdp" / "metrics.json").read_text())
    assert (summary["engine"], summary["processes"]) == ("FSDP2", 2)
    one = train(load_config(LLMDPOConfig, None, [*llm.common, "train.batch_size=8",
                                                 f"train.output_dir={llm.root / 'one'}"]))
    assert one["history"][0]["grad_norm"] > 0.01
    a = load_file(llm.root / "fsdp" / "final" / "model.safetensors")
    b = load_file(llm.root / "one" / "final" / "model.safetensors")
    base = load_file(llm.root / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((b[k] - base[k]).abs().max().item() for k in b) > 1e-3  # 4 Adam steps of lr 1e-3
    # float32 sums in another order (each process sums its half, then the shards are reduced):
    # measured 5.6e-7 after 2 steps; 2e-5 is 2% of one step's move, a scale error moves whole steps
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-5


def test_llm_fsdp_kill9_and_resume_is_bit_identical(llm):
    """SIGKILL after the step-2 checkpoint, relaunch: the whole weights gathered into the checkpoint and
    its optimizer state keyed by parameter name reload into the shards, and every bit matches."""
    import json

    from transformers import AutoModelForCausalLM

    out = llm.root / "killed"
    cmd = fsdp_launch("fsdp_llama.yaml", "llm_dpo.py", 29572, [*llm.fsdp, f"train.output_dir={out}"])
    kill9_after(cmd, out / "checkpoints" / "step_2", out)
    log = run_ok([*cmd[:7], "29573", *cmd[8:]])
    assert "resumed from" in log and "step 2" in log
    straight = load_file(llm.root / "fsdp" / "final" / "model.safetensors")
    resumed = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    history = [json.loads((d / "metrics.json").read_text())["history"] for d in (llm.root / "fsdp", out)]
    assert history[0] == history[1]
    plain = AutoModelForCausalLM.from_pretrained(out / "final")  # ordinary weights: one device, no FSDP
    assert all(torch.equal(p, resumed[n]) for n, p in plain.named_parameters())


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A tiny SD1.5 folder and one uninterrupted 2-process FSDP2 run of recipes/diffusion_dpo.py: full
    fine-tuning with reference: copy (the frozen copy sharded like the policy), plain SGD (Adam's
    update would hide a wrong loss scale), 4 steps of 2 pairs per process, checkpoints at 2 and 4."""
    from diffdpo.diffusion.tiny import build_tiny

    root = tmp_path_factory.mktemp("unet_fsdp")
    model = build_tiny("sd15", root / "sd15")
    common = [f"model.name_or_path={model}", "model.family=sd15", "model.resolution=16", "data.source=toy",
              f"data.path={root / 'toy'}", "data.toy_pairs=8", "train.report_to=none", "train.max_steps=4",
              "train.optimizer=sgd", "train.lr=1e-3", "train.weight_decay=0.0", "train.proportion_empty_prompts=0.25"]
    fsdp = [*common, "train.per_device_batch=2", "train.save_every=2"]
    log = run_ok(fsdp_launch("fsdp_unet.yaml", "diffusion_dpo.py", 29581, [*fsdp, f"train.output_dir={root / 'fsdp'}"]))
    assert "on 2 processes (FSDP2)" in log and "reference copy" in log
    return SimpleNamespace(root=root, model=model, common=common, fsdp=fsdp)


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next((folder / "unet").glob("*.safetensors")))


def assert_same_update(base, expected, got, tolerance=1e-4):
    """Updates (trained - initial) agree to ``tolerance`` of the largest one. What differs is float32
    summation order (each process sums its pairs, then shards are reduced), amplified by beta (2500)
    times a difference of errors: measured 4e-5 of the update for full fine-tuning, 1.2e-4 for LoRA
    (lr 0.05). A wrong loss scale or a pair seen twice or missed is off by a whole fraction of it."""
    scale = max((expected[k] - base[k]).abs().max().item() for k in expected)
    assert scale > 1e-3
    for k in expected:
        torch.testing.assert_close(got[k] - base[k], expected[k] - base[k], rtol=0, atol=tolerance * scale)


def test_unet_fsdp_two_processes_equal_one_process(unet):
    from diffdpo.diffusion.trainer import main

    one = main([*unet.common, "train.per_device_batch=4", f"train.output_dir={unet.root / 'one'}"])
    assert_same_update(unet_weights(unet.model), one["trainable"], unet_weights(unet.root / "fsdp" / "final"))


def test_unet_fsdp_kill9_and_resume_is_bit_identical(unet):
    out = unet.root / "killed"
    cmd = fsdp_launch("fsdp_unet.yaml", "diffusion_dpo.py", 29582, [*unet.fsdp, f"train.output_dir={out}"])
    kill9_after(cmd, out / "checkpoints" / "step_2", out)
    log = run_ok([*cmd[:7], "29583", *cmd[8:], "--resume"])
    assert "at step 2" in log
    straight, resumed = unet_weights(unet.root / "fsdp" / "final"), unet_weights(out / "final")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_unet_fsdp_lora_disabled_reference_and_lora_export(unet, tmp_path):
    """LoRA under FSDP2 with the reference = the sharded policy with its adapters off: the same update
    as 1 process, and LoRA files that ``pipe.load_lora_weights`` loads on one device."""
    from diffusers import StableDiffusionPipeline

    from diffdpo.diffusion.trainer import main

    lora = ["model.lora_rank=4", "reference=lora_disabled", "train.lr=0.05"]
    run_ok(fsdp_launch("fsdp_unet.yaml", "diffusion_dpo.py", 29584,
                       [*unet.common, *lora, "train.per_device_batch=2", f"train.output_dir={tmp_path / 'fsdp'}"]))
    one = main([*unet.common, *lora, "train.per_device_batch=4", f"train.output_dir={tmp_path / 'one'}"])
    pipe = StableDiffusionPipeline.from_pretrained(unet.model, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "fsdp" / "final"))
    loaded = {k.replace(".default_0", ".default"): v for k, v in pipe.unet.state_dict().items() if "lora" in k}
    assert set(loaded) == set(one["trainable"])
    initial = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in one["trainable"].items()}
    assert_same_update(initial, one["trainable"], loaded, tolerance=1e-3)


# ------------------------------------------------------------------ the builder across machines

def test_prefs_build_on_two_machines_equals_one_process(tmp_path):
    """Two torchrun agents with one process each, started as machine 0 and machine 1 of a 2-machine
    job (static rendezvous on this host): the builder takes its share from the global process index,
    so the set equals a one-process build byte for byte; only machine 0 assembles and reports."""
    captions = tmp_path / "captions.txt"
    captions.write_text("A dog barks followed by a man speaking\nRain falls while a bell rings\nA clock ticks\n"
                        "Birds chirp, then a car passes by\nA siren wails after an engine hums\n")

    def build(out: Path) -> list[str]:
        return ["-m", "diffdpo", "prefs", "build", "--no-progress", "--config",
                str(ROOT / "recipes/configs/prefs_tiny.yaml"), f"captions={captions}", f"out={out}", "shard_size=1",
                "generator.kind=helpers.fake_media:make_generator", "scorer.kind=helpers.fake_media:make_scorer"]

    env = {**ENV, "PYTHONPATH": str(ROOT / "tests")}
    subprocess.run([sys.executable, *build(tmp_path / "one")], env=env, check=True, capture_output=True)
    machines = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                  str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                                  "29591", *build(tmp_path / "two")[:1], *build(tmp_path / "two")[1:]],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    outputs = [m.communicate(timeout=240) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert '"pairs"' in outputs[0][0] and '"pairs"' not in outputs[1][0]  # machine 1 knew it was process 1 of 2
    one, two = (tmp_path / "one" / "prefs.jsonl").read_bytes(), (tmp_path / "two" / "prefs.jsonl").read_bytes()
    assert one == two and one
    assert len(list((tmp_path / "two" / "shards").glob("*.json"))) == 5
