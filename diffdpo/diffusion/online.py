"""A diffusion model as the online loop's policy (:class:`diffdpo.online.loop.OnlinePolicy`): CRPO rounds.

TangoFlux's CLAP-ranked preference optimisation (Hung et al. 2024, arXiv:2412.21037; code
declare-lab/TangoFlux: ``generate_crpo_dataset.py`` -> ``label_crpo.py`` -> ``train_dpo.py``, repeated)
is the loop with this policy: sample ``K`` outputs per prompt from the current model, rank them with a
preference model (CLAP through :func:`diffdpo.preference_model.scorer_reward`), pair the best with the
worst, train Diffusion-DPO plus the winners' denoising loss (``loss.sft_weight``), repeat.

* **Sampling** runs the model's own pipeline. A Tango-layout pipeline (``sample_latents``) hands back
  the denoised latents, which are kept with each sample, so training reads exactly what was sampled
  and nothing is re-encoded; other families sample media and encode it with the VAE, as offline
  training does. Every sample has its own noise seed (a hash of the round's seed, the prompt and the
  sample), so a sample does not depend on what else is in the batch and a resumed run redraws it.
  Each sample's media is written under ``media_dir/round_NNNN/``; :meth:`text` is that path
  relative to ``media_dir``, which is what the round files record and what the preference model is
  handed (:func:`media_reward` resolves it to the media).
* **Sampler**: ``current`` (CRPO) or ``reference`` (the round-0 model: one offline round). The
  geometric mixture of IPO-MD is defined token by token for LLMs; there is no such product of two
  diffusion samplers here, so ``mixture`` is refused.
* **Reference**: a frozen copy. ``initial`` keeps the round-0 model; ``previous_round`` copies the
  policy at the start of each round. TangoFlux's ``train_dpo.py`` deep-copies the transformer right
  after loading ``--load_from_checkpoint``, and each CRPO iteration is a new run from the previous
  iteration's weights: its reference is the previous round's model (``previous_round``), with a fresh
  AdamW each iteration (``reset_optimizer: true``).
* **Training** is the offline trainer's step (:func:`diffdpo.diffusion.objective.diffusion_dpo_step`):
  one noise and timestep per pair from :func:`diffdpo.diffusion.logratios.pair_seed`, shared by winner
  and loser, per-pair prompt dropout, the loss core with ``sft_weight`` times the winner's error added
  to every pair (TangoFlux: ``-logsigmoid(-0.5 * 2000 * (model_diff - ref_diff)) + mse_w``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from diffdpo.diffusion.encode import stack_conditions
from diffdpo.diffusion.logratios import draw_pairs, num_train_steps, pair_seed, prediction_kind, timestep_buckets
from diffdpo.diffusion.models import Backbone
from diffdpo.diffusion.objective import LOSS_INPUTS, DPOStep, diffusion_dpo_step, guided
from diffdpo.diffusion.reference import FrozenCopyReference
from diffdpo.losses import loss_spec, required_inputs

SAMPLERS = ("current", "reference")


@dataclass
class OnlineDiffusionTrain:
    """Optimisation and sampling settings of an online diffusion run (the offline trainer's names)."""

    lr: float = 5e-5
    per_device_batch: int = field(default=8, metadata={"help": "pairs per gradient step"})
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None
    reset_optimizer: bool = field(default=True, metadata={
        "help": "a fresh AdamW every round (TangoFlux: each CRPO iteration is a new train_dpo.py run)"})
    proportion_empty_prompts: float = 0.0
    timestep_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    timestep_sampling: str = field(default="uniform", metadata={"help": "uniform | logit_normal (TangoFlux)"})
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_inference_steps: int = field(default=10, metadata={"help": "sampler steps when generating a round"})
    guidance_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance when generating"})
    sample_batch_size: int = 64

    def __post_init__(self):
        if self.per_device_batch < 1:
            raise ValueError(f"train.per_device_batch must be >= 1, got {self.per_device_batch}")
        span = self.timestep_range
        if len(span) != 2 or not 0 <= span[0] < span[1] <= 1:
            raise ValueError(f"train.timestep_range: {span} is not [low, high] with 0 <= low < high <= 1")


def check_online_loss(loss) -> None:
    """The loss can train from pairs of sampled latents: paired, fed by errors / log-ratios, and its
    beta not converted from another loss's convention (the offline recipe's rules)."""
    try:
        spec = loss_spec(loss.type)
    except ValueError as e:
        raise ValueError(f"loss.type: {e}") from None
    if not spec.paired:
        raise ValueError(f"loss.type: {loss.type!r} is unpaired; the online loop makes pairs (best vs worst)")
    missing = [k for k in required_inputs(spec, loss.options) if k not in LOSS_INPUTS]
    if missing:
        raise ValueError(f"loss.type: {loss.type!r} reads {missing}, which a diffusion model does not have")
    if not spec.needs_reference and loss.beta_convention != "core":
        raise ValueError(f"loss.beta_convention: {loss.type!r} takes its own beta; set loss.beta_convention=core")
    if loss.guidance_scale <= 0:
        raise ValueError(f"loss.guidance_scale: {loss.guidance_scale} must be > 0 (1 = no guidance)")


def check_sampler(sampler: str) -> None:
    if sampler == "mixture":
        raise ValueError("online.sampler: 'mixture' (IPO-MD's geometric mixture of policy and reference) is "
                         "defined token by token for LLMs; a diffusion policy samples 'current' or 'reference'")
    if sampler not in SAMPLERS:
        raise ValueError(f"online.sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Noise seed of sample ``sample_index`` of prompt ``prompt_index`` in the round seeded ``seed``."""
    key = f"sample/{seed}/{prompt_index}/{sample_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass
class Sample:
    """One sampled output: its media file (``path``, relative to the policy's ``media_dir``), the
    latents training reads, and the media itself while its round is being judged."""

    prompt: str
    seed: int
    path: str
    latents: Tensor
    media: Any = None


@contextmanager
def _denoiser(pipe, module):
    """The pipeline samples with ``module`` as its UNet / transformer for the duration of the block."""
    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    old = getattr(pipe, name)
    was = module.training
    setattr(pipe, name, module)
    module.eval()
    try:
        yield
    finally:
        module.train(was)
        setattr(pipe, name, old)


class DiffusionOnlinePolicy:
    """Policy (the backbone's denoiser), frozen reference and optimizer of an online diffusion run."""

    def __init__(self, backbone: Backbone, loss, train: OnlineDiffusionTrain, media_dir: str | Path,
                 reference: str = "initial", sampler: str = "current"):
        check_online_loss(loss)
        check_sampler(sampler)
        if reference not in ("initial", "previous_round"):
            raise ValueError(f"online.reference: expected initial or previous_round, got {reference!r}")
        self.backbone, self.loss, self.train_cfg = backbone, loss, train
        self.media_dir = Path(media_dir)
        self.reference_mode = reference
        self.unet = backbone.unet
        pipe = backbone.pipe
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "projection_model", "language_model",
                     "vocoder"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self.unet.requires_grad_(True).train()
        self.device = next(self.unet.parameters()).device
        spec = loss_spec(loss.type)
        self.reference = FrozenCopyReference(self.unet) if spec.needs_reference else None
        if sampler == "reference":
            keep = self.reference is not None and reference == "initial"
            self.initial = self.reference.unet if keep else FrozenCopyReference(self.unet).unet
        else:
            self.initial = None
        from diffusers import DDPMScheduler

        # the training (noising) schedule, apart from the pipeline's: sampling's set_timesteps rewrites that one
        scheduler = pipe.scheduler
        train_cls = type(scheduler) if prediction_kind(scheduler) == "flow_matching" else DDPMScheduler
        self.scheduler = train_cls.from_config(scheduler.config)
        self.noise_steps = num_train_steps(self.scheduler)
        self._conds: dict[str, dict[str, Tensor]] = {}
        self.predict = guided(backbone.predict, self.condition(""), loss.guidance_scale)
        self.optimizer = self._new_optimizer()
        self.rounds_sampled = 0
        self.steps_done = 0
        self.log: list[dict] = []
        self._media: dict[str, Any] = {}

    # ---------------------------------------------------------------- pieces
    def _new_optimizer(self):
        from diffdpo.diffusion.trainer import TrainConfig, make_optimizer

        t = self.train_cfg
        cfg = TrainConfig(optimizer="adamw", weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
                          adam_beta2=t.adam_beta2, adam_eps=t.adam_eps)
        return make_optimizer([p for p in self.unet.parameters() if p.requires_grad], cfg, t.lr)

    def condition(self, prompt: str) -> dict[str, Tensor]:
        """The denoiser's condition of one prompt (``[1, ...]``), encoded once per run."""
        if prompt not in self._conds:
            self._conds[prompt] = {k: v.to(self.device) for k, v in self.backbone.encode_prompt(prompt).items()}
        return self._conds[prompt]

    @property
    def media_kind(self) -> str:
        return self.backbone.media

    # ---------------------------------------------------------------- sampling
    def sample(self, prompts: Sequence[str], k: int, sampler: str, mixture_weight: float, seed: int) -> list[list[Sample]]:
        """``k`` samples per prompt from the current model (or the round-0 model, ``sampler='reference'``);
        their media are written to ``media_dir/round_NNNN/``."""
        check_sampler(sampler)
        module = self.initial if sampler == "reference" else self.unet
        folder = f"round_{self.rounds_sampled:04d}"
        (self.media_dir / folder).mkdir(parents=True, exist_ok=True)
        flat = [(i, j, p) for i, p in enumerate(prompts) for j in range(k)]
        seeds = [sample_seed(seed, i, j) for i, j, _ in flat]
        paths = [f"{folder}/p{i:04d}_s{j}.{'wav' if self.media_kind == 'audio' else 'png'}" for i, j, _ in flat]
        with _denoiser(self.backbone.pipe, module):
            latents, media = self._generate([p for _, _, p in flat], seeds)
        for path, item in zip(paths, media):
            self._write(self.media_dir / path, item)
        if latents is None:  # a pipeline that does not hand back latents: encode what was written
            with torch.no_grad():
                latents = torch.cat([self.backbone.media_to_latents(
                    self.backbone.load_media(self.media_dir / path)[None].to(self.device)).cpu() for path in paths])
        self._media = dict(zip(paths, media))
        self.rounds_sampled += 1
        out = [Sample(p, s, path, lat, m) for (_, _, p), s, path, lat, m in zip(flat, seeds, paths, latents, media)]
        return [out[i * k:(i + 1) * k] for i in range(len(prompts))]

    @torch.no_grad()
    def _generate(self, prompts: list[str], seeds: list[int]) -> tuple[Tensor | None, list]:
        t, pipe = self.train_cfg, self.backbone.pipe
        if hasattr(pipe, "sample_latents"):  # a Tango-layout pipeline: latents, then the decoder
            latents, media = [], []
            for s in range(0, len(prompts), t.sample_batch_size):
                lat = pipe.sample_latents(prompts[s:s + t.sample_batch_size], t.num_inference_steps, t.guidance_scale,
                                          seed=seeds[s:s + t.sample_batch_size], batch_size=t.sample_batch_size)
                audio = pipe.mel_to_audio(pipe.latents_to_mel(lat).cpu())
                latents.append(lat.float().cpu())
                media += [w.cpu().numpy().astype(np.float32) for w in audio]
            return torch.cat(latents), media
        return None, [self.backbone.sample([p], t.num_inference_steps, t.guidance_scale, s)[0]
                      for p, s in zip(prompts, seeds)]

    def _write(self, path: Path, item) -> None:
        if self.media_kind == "audio":
            import soundfile as sf

            sf.write(path, np.asarray(item, dtype=np.float32).reshape(-1), self.backbone.sample_rate, subtype="FLOAT")
        else:
            item.save(path)

    def text(self, output: Sample) -> str:
        return output.path

    def media_of(self, path: str):
        """The media of a sample path: held in memory for the round being judged, else read from disk."""
        if path in self._media:
            return self._media[path]
        if self.media_kind == "audio":
            import soundfile as sf

            return sf.read(self.media_dir / path, dtype="float32")[0]
        from PIL import Image

        return Image.open(self.media_dir / path).convert("RGB")

    # ---------------------------------------------------------------- training
    def reset_reference(self) -> None:
        """The reference becomes the current policy (the loop calls this each round for ``previous_round``)."""
        if self.reference is None:
            return
        if self.reference.unet is self.initial:  # keep the round-0 model for the reference sampler
            self.reference.unet = copy.deepcopy(self.initial)
        self.reference.unet.load_state_dict(self.unet.state_dict())
        self.reference.unet.requires_grad_(False).eval()

    def draws(self, seeds: list[int], latent_shape: tuple[int, ...]):
        """Each pair's noise, timestep and prompt dropout, drawn from its seed (the offline trainer's draws)."""
        t = self.train_cfg
        return draw_pairs(seeds, tuple(latent_shape), self.noise_steps, t.proportion_empty_prompts, self.device,
                          step_range=tuple(t.timestep_range), sampling=t.timestep_sampling,
                          logit_mean=t.logit_mean, logit_std=t.logit_std)

    def pair_loss(self, chosen: Tensor, rejected: Tensor, prompts: list[str], draws,
                  indices: list[int] | None = None) -> DPOStep:
        """The configured loss of one batch of pairs (``[b, C, H, W]`` latents) under ``draws``
        (:meth:`draws`): winner and loser share a pair's noise and timestep, a dropped prompt is empty for both."""
        cond = stack_conditions([self.condition("" if d else p) for p, d in zip(prompts, draws.drop_prompt.tolist())])
        return diffusion_dpo_step(self.predict, self.unet, self.reference, self.scheduler, chosen.to(self.device),
                                  rejected.to(self.device), cond, draws, indices or list(range(len(prompts))),
                                  self.loss.type, self.loss.core_beta(), self.loss.sft_weight, False,
                                  self.loss.options)

    def batch_of(self, n: int, seed: int, step: int) -> list[tuple[int, int]]:
        """``(pair index, epoch)`` of the pairs of step ``step`` over ``n`` pairs: a fresh permutation
        per epoch, drawn from ``(seed, epoch)``."""
        b = self.train_cfg.per_device_batch
        out = []
        for pos in range(step * b, step * b + min(b, n)):
            epoch = pos // n
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            out.append((int(order[pos % n]), epoch))
        return out

    def train_round(self, records: list[dict], steps: int, seed: int,
                    on_step: Callable[[int], None] | None = None) -> dict[str, float]:
        from diffdpo.diffusion.trainer import _step_metrics

        if self.train_cfg.reset_optimizer:
            self.optimizer = self._new_optimizer()
        n = len(records)
        chosen = torch.stack([r["chosen_output"].latents for r in records])
        rejected = torch.stack([r["rejected_output"].latents for r in records])
        prompts = [r["prompt"] for r in records]
        rnd = records[0].get("round") if records else None
        self.unet.train()
        sums: dict[str, float] = {}
        for step in range(steps):
            batch = self.batch_of(n, seed, step)
            idx = [i for i, _ in batch]
            draws = self.draws([pair_seed(seed, i, epoch) for i, epoch in batch], chosen.shape[1:])
            out = self.pair_loss(chosen[idx], rejected[idx], [prompts[i] for i in idx], draws, idx)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.train_cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.train_cfg.max_grad_norm)
            self.optimizer.step()
            per_pair = out.per_pair()
            per_pair["loss"] = out.loss.detach().float().reshape(1)
            per_pair["bucket"] = timestep_buckets(draws.step_index, self.noise_steps).float()
            metrics = _step_metrics(per_pair, 4)
            self.steps_done += 1
            self.log.append({"step": self.steps_done, "round": rnd, **metrics})
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            if on_step is not None:
                on_step(step + 1)
        return {k: v / steps for k, v in sums.items()} if steps else {}

    # ---------------------------------------------------------------- resume
    def save(self, folder: Path) -> None:
        """Policy weights, optimizer, counters and the step log; a ``previous_round`` reference is
        rebuilt from the policy when the next round starts, an ``initial`` one is the base."""
        from safetensors.torch import save_file

        folder = Path(folder)
        save_file({k: v.detach().contiguous() for k, v in self.unet.state_dict().items()},
                  folder / "policy.safetensors")
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        (folder / "policy_state.json").write_text(json.dumps(
            {"rounds_sampled": self.rounds_sampled, "steps_done": self.steps_done, "log": self.log}))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        self.unet.load_state_dict(load_file(folder / "policy.safetensors"))
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        state = json.loads((folder / "policy_state.json").read_text())
        self.rounds_sampled, self.steps_done, self.log = state["rounds_sampled"], state["steps_done"], state["log"]


def media_reward(policy: DiffusionOnlinePolicy, reward: Callable[[Sequence[str], Sequence], Sequence[float]]):
    """A reward over media (e.g. :func:`diffdpo.preference_model.scorer_reward` of CLAP) as a reward over the
    sample paths the loop hands the preference model (:meth:`DiffusionOnlinePolicy.text`)."""
    def over_paths(prompts: Sequence[str], paths: Sequence[str]):
        return reward(prompts, [policy.media_of(p) for p in paths])
    return over_paths
