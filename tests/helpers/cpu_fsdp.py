"""Run a script under accelerate's FSDP on CPU processes (gloo): a test harness, not a launcher.

accelerate 1.15 never selects FSDP on CPU: ``AcceleratorState.__init__`` (accelerate/state.py) turns
``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only inside its branch for accelerator devices
(``MULTI_GPU``, ``MULTI_NPU``, ...); a CPU run is ``MULTI_CPU`` and the FSDP settings are dropped
without a word (the model is wrapped in DDP). This harness switches the state to FSDP after
accelerate has built it, so ``Accelerator.prepare`` runs its real FSDP2 path (``fully_shard`` over
gloo, which torch 2.9.1 supports on CPU) and the trainer code runs as it would on GPUs.

    accelerate launch --config_file recipes/accelerate/fsdp_llama.yaml --num_processes 2 \\
        tests/helpers/cpu_fsdp.py recipes/llm_dpo.py [recipe args]      # with ACCELERATE_USE_CPU=1
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        raise SystemExit("cpu_fsdp.py: launch with an FSDP config (ACCELERATE_USE_FSDP is not set)")
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
