"""Diffusion-DPO fine-tuning recipe (the implementation is :mod:`diffdpo.diffusion.trainer`).

    python recipes/diffusion_dpo.py --config recipes/configs/tango2_dpo.yaml [key.sub=value ...] [--resume]
    accelerate launch recipes/diffusion_dpo.py --config recipes/configs/sd15_dpo.yaml
"""

from diffdpo.diffusion.trainer import DiffusionDPOConfig, main, train  # noqa: F401  (tests import these here)
from diffdpo.errors import run_main

if __name__ == "__main__":
    run_main(main)  # a user mistake (config, key, value, missing file): one line on stderr, exit code 2
