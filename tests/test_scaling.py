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
