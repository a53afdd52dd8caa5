"""Tango-shaped latent text-to-audio models: T5 text states, a mel VAE, a UNet, a vocoder.

:mod:`.pipeline` loads, samples and saves the toolkit's layout (docs/model_layout.md);
:mod:`.checkpoint` reads and writes Tango's own published files; :mod:`.audio` is the mel front
end; :mod:`.position` the optional time-position signals SoundWorld's base model uses.
"""

from diffdpo.diffusion.tango.pipeline import TangoPipeline

__all__ = ["TangoPipeline"]
