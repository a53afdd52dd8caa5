"""Whole weights and optimizer state of a model that ``accelerate`` prepared, whatever the engine.

Under DDP every process holds every tensor; under FSDP2 each holds a shard (a DTensor), so a
``state_dict()`` written by process 0 would hold its shard only, and a reference model called
outside the sharded root would meet sharded weights. These helpers gather to process 0 and load
whole tensors back onto any layout, so checkpoints and exports are ordinary unsharded files that
load on one device and resume under any number of processes. Weights are gathered tensor by
tensor; optimizer states and loading use ``torch.distributed.checkpoint.state_dict`` (full state
dicts), which treats a plain module, DDP and FSDP2 alike. Gathering is a collective: call these on
every process.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

_ENGINE_HELP = "docs/scaling.md; recipes/accelerate/fsdp_*.yaml"


def check_engine(accelerator) -> None:
    """Refuse the engines the trainers do not shard correctly, before any work is done."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("accelerate config: DeepSpeed is not supported by diffdpo's trainers (its engine steps and "
                         f"scales the loss itself); shard with FSDP2 instead ({_ENGINE_HELP})")
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(f"accelerate config: fsdp_version 1 is not supported; set fsdp_version: 2 ({_ENGINE_HELP})")


def engine_name(accelerator) -> str:
    """What ran: NO, MULTI_CPU, MULTI_GPU (DDP), FSDP2, ... (written to run summaries)."""
    return "FSDP2" if accelerator.is_fsdp2 else str(accelerator.distributed_type.value)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _inner(accelerator, model: nn.Module) -> nn.Module:
    """The module whose parameter names the files use: DDP's wrapper removed (FSDP2 shards in place)."""
    return accelerator.unwrap_model(model)


def model_state(accelerator, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Whole tensors copied to CPU on process 0, keyed like ``unwrap_model(model).state_dict()``
    (other processes get an empty dict). Gathered one tensor at a time, so a device holds at most one
    whole tensor beside its shards; ``trainable_only`` skips frozen weights (a LoRA run gathers its
    adapters only)."""
    from torch.distributed.tensor import DTensor

    inner = _inner(accelerator, model)
    items = ([(n, p) for n, p in inner.named_parameters() if p.requires_grad] if trainable_only
             else inner.state_dict().items())
    state = {}
    for name, tensor in items:
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective under FSDP2
        if accelerator.is_main_process:
            state[name] = whole.detach().to("cpu", copy=True)
    return state


def optimizer_state(accelerator, model: nn.Module, optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (portable across process counts and engines)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(_inner(accelerator, model), getattr(optimizer, "optimizer", optimizer),
                                    options=_options(cpu_offload=True))


def load_model_state(accelerator, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy whole tensors (every process passes the same dict) into the model's own layout; a name the
    model lacks, or a trainable parameter the dict lacks, is an error naming ``source``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    inner = _inner(accelerator, model)
    unknown = sorted(set(state) - set(inner.state_dict()))
    missing = sorted(n for n, p in inner.named_parameters() if p.requires_grad and n not in state)
    if unknown or missing:
        raise ValueError(f"{source}: checkpoint does not match the model (unknown tensors {unknown[:3]}, "
                         f"missing trainable {missing[:3]})")
    set_model_state_dict(inner, state, options=_options(strict=False))


def load_optimizer_state(accelerator, model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)
    if not state["state"]:  # a stateless optimizer (SGD without momentum): torch's loader needs a tensor to place
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        return
    set_optimizer_state_dict(_inner(accelerator, model), optimizer, state, options=_options())


def prepare_frozen(accelerator, module: nn.Module) -> nn.Module:
    """A frozen model placed like the policy: under FSDP2 sharded with the same plugin settings (TRL
    does the same for its reference, trl/models/utils.py ``prepare_fsdp``), else whole on the device
    (a model without gradients needs no DDP wrapper)."""
    module.requires_grad_(False).eval()
    if accelerator.is_fsdp2:
        from accelerate.utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, module)
    return module.to(accelerator.device)


@contextmanager
def whole_weights(module: nn.Module, state: dict[str, torch.Tensor]):
    """Inside the block ``module.state_dict()`` returns ``state``, so a library's own ``save_pretrained``
    (diffusers' reads ``state_dict()``) writes the gathered weights instead of this process's shards."""
    module.state_dict = lambda *args, **kwargs: state
    try:
        yield module
    finally:
        del module.state_dict
