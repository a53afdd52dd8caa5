"""The shared preference-loss core: pure tensor functions of per-sample log-ratios.

Every direct-preference method scores a sample by an implicit reward ``beta * logratio``:

* LLM:        ``logratio = log pi_theta(y|x) - log pi_ref(y|x)``
* diffusion:  ``logratio = -(err_theta - err_ref)``, errors at a shared noise and timestep

so one loss written here serves both model kinds; adapters only produce log-ratios.

Notation in the docstrings: ``r_w``/``r_l`` chosen/rejected log-ratios, ``h = r_w - r_l``,
``l(z) = -log sigmoid(z)``, ``pbar`` a length-averaged policy log-prob.

Conventions that differ between published code are explicit here:

* **beta.** ``preference_loss('sigmoid', r_w, r_l, beta=b)`` is ``l(b * h)``. Salesforce
  DiffusionDPO, Tango 2 and the diffusers SDXL example (``train_diffusion_dpo_sdxl.py``, B = 5000)
  write ``l(-0.5 * B * (model_diff - ref_diff))``, which is ours at ``b = B / 2``; the diffusers
  SD1.5 example (``train_diffusion_dpo.py``, B = 2500) writes ``l(B * (ref_diff - model_diff))``,
  ours at ``b = B``.
  Worked example: Salesforce's SD1.5 setting B = 5000 and the diffusers SD1.5 example's B = 2500 are the
  same loss, ``b = 2500`` here; Tango 2's README B = 2000 is ``b = 1000``, and so is TangoFlux's CRPO
  B = 2000 (``tangoflux/model.py``: the same ``-0.5 * B`` form on flow-matching velocity errors). Use
  :func:`diffusion_beta` to convert so a recipe can state the published number it reproduces.
* **accuracy.** ``rewards/accuracies`` counts a tie (equal rewards) as 0.5; TRL counts it as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSS_TYPES",
    "LossSpec",
    "PreferenceLossOutput",
    "RunningRewardMean",
    "LOGIC_PREFIX",
    "diffusion_beta",
    "loss_spec",
    "preference_loss",
    "required_inputs",
]


def _l(z: Tensor) -> Tensor:
    """-log sigmoid(z), stable for any |z|."""
    return -F.logsigmoid(z)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: its function, the options it takes and what it needs."""

    name: str
    fn: Callable[..., Tensor]
    options: dict[str, object]
    needs_reference: bool = True
    paired: bool = True
    needs: tuple[str, ...] = ()
    doc: str = field(default="", repr=False)

    @property
    def title(self) -> str:
        """The method and its paper: the docstring's first paragraph up to its formula (the first ':'
        outside parentheses), as ``diffdpo losses`` and the README's table show it."""
        text, depth = " ".join(self.doc.split("\n\n")[0].split()), 0
        for i, ch in enumerate(text):
            depth += (ch == "(") - (ch == ")")
            if ch == ":" and depth == 0:
                return text[:i].strip().rstrip(",")
        return text.strip()


def required_inputs(spec: LossSpec, options: dict | None = None) -> tuple[str, ...]:
    """Every tensor argument of :func:`preference_loss` that ``spec`` reads under ``options``: the two
    log-ratios when it uses a reference, its ``needs``, and IPO's lengths unless ``length_normalize``
    is off. A recipe that cannot produce one of them cannot train the loss."""
    options = {**spec.options, **(options or {})}
    needed = (["chosen_logratios", "rejected_logratios"] if spec.needs_reference else []) + list(spec.needs)
    if spec.name == "ipo" and options["length_normalize"]:
        needed += ["chosen_lengths", "rejected_lengths"]
    return tuple(needed)


LOSS_TYPES: dict[str, LossSpec] = {}

# ``logic:<structure>`` names a loss compiled from a preference structure (diffdpo/loss_logic.py).
LOGIC_PREFIX = "logic:"


def loss_spec(name: str) -> LossSpec:
    """The registered loss ``name``, or the one a ``logic:<structure>`` name compiles to."""
    if name in LOSS_TYPES:
        return LOSS_TYPES[name]
    if name.startswith(LOGIC_PREFIX):
        from diffdpo.loss_logic import compiled_spec

        return compiled_spec(name)
    raise ValueError(f"unknown {name!r}; valid are {sorted(LOSS_TYPES)} or '{LOGIC_PREFIX}<structure>'")


def _register(name: str, *, options: dict[str, object] | None = None, needs_reference: bool = True,
              paired: bool = True, needs: tuple[str, ...] = ()):
    def wrap(fn):
        LOSS_TYPES[name] = LossSpec(name, fn, dict(options or {}), needs_reference, paired, needs,
                                    (fn.__doc__ or "").strip())
        return fn
    return wrap


@dataclass
class _Inputs:
    """Everything a loss function may read; missing values are None."""

    chosen: Tensor | None
    rejected: Tensor | None
    beta: float
    chosen_logps: Tensor | None
    rejected_logps: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    chosen_win_probs: Tensor | None
    rejected_win_probs: Tensor | None
    kl_logratios: Tensor | None
    chosen_errors: Tensor | None = None
    rejected_errors: Tensor | None = None

    def avg_logps(self) -> tuple[Tensor, Tensor]:
        return self.chosen_logps / self.chosen_lengths, self.rejected_logps / self.rejected_lengths


# ---------------------------------------------------------------- losses that use a reference


@_register("sigmoid", options={"label_smoothing": 0.0})
def _sigmoid(x: _Inputs, label_smoothing: float) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): ``l(beta h)``.

    With ``label_smoothing = eps`` it is cDPO (Mitchell 2023): ``(1-eps) l(beta h) + eps l(-beta h)``.
    """
    z = x.beta * (x.chosen - x.rejected)
    return (1 - label_smoothing) * _l(z) + label_smoothing * _l(-z)


@_register("robust", options={"label_smoothing": 0.0})
def _robust(x: _Inputs, label_smoothing: float) -> Tensor:
    """rDPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under a label-flip rate eps < 0.5:

    ``[(1-eps) l(beta h) - eps l(-beta h)] / (1 - 2 eps)``; eps is ``label_smoothing`` (TRL's name).
    """
    z = x.beta * (x.chosen - x.rejected)
    eps = label_smoothing
    return ((1 - eps) * _l(z) - eps * _l(-z)) / (1 - 2 * eps)


@_register("hinge")
def _hinge(x: _Inputs) -> Tensor:
    """SLiC-HF (Zhao et al. 2023, arXiv:2305.10425) / RSO hinge-norm (Liu et al. 2023): ``max(0, 1 - beta h)``."""
    return torch.relu(1 - x.beta * (x.chosen - x.rejected))


@_register("ipo", options={"length_normalize": True})
def _ipo(x: _Inputs, length_normalize: bool) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): ``(h - 1/(2 beta))^2``, minimal at ``h = 1/(2 beta)``.

    With ``length_normalize`` (default, as TRL does) each log-ratio is divided by its completion
    length first, which needs ``chosen_lengths``/``rejected_lengths``; the paper itself uses the
    summed log-ratio (``length_normalize=False``). Diffusion log-ratios are already per-element means.
    """
    chosen, rejected = x.chosen, x.rejected
    if length_normalize:
        chosen, rejected = chosen / x.chosen_lengths, rejected / x.rejected_lengths
    return (chosen - rejected - 1 / (2 * x.beta)) ** 2


@_register("exo_pair", options={"label_smoothing": 1e-3})
def _exo_pair(x: _Inputs, label_smoothing: float) -> Tensor:
    """EXO, pairwise (Ji et al. 2024, arXiv:2402.00856, eq. 16), a reverse-KL between the model's
    and the (eps-smoothed) label distribution over the pair:

    ``s(beta h) [log s(beta h) - log(1-eps)] + s(-beta h) [log s(-beta h) - log eps]``, eps > 0.
    """
    z = x.beta * (x.chosen - x.rejected)
    eps = label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


@_register("nca_pair")
def _nca_pair(x: _Inputs) -> Tensor:
    """NCA, pairwise (Chen et al. 2024, arXiv:2402.05369): ``l(beta r_w) + 0.5 l(-beta r_w) + 0.5 l(-beta r_l)``."""
    cw, cl = x.beta * x.chosen, x.beta * x.rejected
    return _l(cw) + 0.5 * _l(-cw) + 0.5 * _l(-cl)


@_register("bco_pair", options={"reward_shift": 0.0})
def _bco_pair(x: _Inputs, reward_shift: float | Tensor) -> Tensor:
    """BCO, pairwise (Jung et al. 2024, arXiv:2404.04656): ``l(beta r_w - delta) + l(-(beta r_l - delta))``.

    ``reward_shift`` is delta, the running mean of rewards the paper uses; keep it with
    :class:`RunningRewardMean` (TRL 0.28 does the same; newer TRL drops delta, i.e. delta = 0).
    """
    delta = torch.as_tensor(reward_shift, dtype=x.chosen.dtype, device=x.chosen.device).detach()
    return _l(x.beta * x.chosen - delta) + _l(-(x.beta * x.rejected - delta))


@_register("sppo_hard")
def _sppo_hard(x: _Inputs) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, as in TRL):
    ``(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2`` — win probabilities 1 and 0."""
    half = 0.5 / x.beta
    return (x.chosen - half) ** 2 + (x.rejected + half) ** 2


@_register("sppo", needs=("chosen_win_probs", "rejected_win_probs"))
def _sppo(x: _Inputs) -> Tensor:
    """SPPO with soft win probabilities (Wu et al. 2024, eq. 4.7, eta = 1/beta):

    ``0.5 [(r_w - (P_w - 1/2)/beta)^2 + (r_l - (P_l - 1/2)/beta)^2]``; ``P`` is each sample's estimated
    probability of beating the current policy (``chosen_win_probs``/``rejected_win_probs``).
    At ``P_w = 1, P_l = 0`` it is half of ``sppo_hard``.
    """
    return 0.5 * ((x.chosen - (x.chosen_win_probs - 0.5) / x.beta) ** 2
                  + (x.rejected - (x.rejected_win_probs - 0.5) / x.beta) ** 2)


@_register("apo_zero")
def _apo_zero(x: _Inputs) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): ``(1 - s(beta r_w)) + s(beta r_l)``."""
    return (1 - torch.sigmoid(x.beta * x.chosen)) + torch.sigmoid(x.beta * x.rejected)


@_register("apo_down")
def _apo_down(x: _Inputs) -> Tensor:
    """APO-down (arXiv:2408.06266, eq. 8): ``s(beta r_w) + (1 - s(beta h))``."""
    return torch.sigmoid(x.beta * x.chosen) + (1 - torch.sigmoid(x.beta * (x.chosen - x.rejected)))


@_register("discopop", options={"discopop_tau": 0.05})
def _discopop(x: _Inputs, discopop_tau: float) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, eq. 5):
    ``m = s(beta h / tau)``, ``(1 - m) l(beta h) + m exp(-beta h)``.

    The exponential term is evaluated as ``exp(-beta h + log m)`` so that a large negative margin
    gives a large finite loss instead of ``inf * 0 = nan``.
    """
    z = x.beta * (x.chosen - x.rejected)
    m = torch.sigmoid(z / discopop_tau)
    return (1 - m) * _l(z) + torch.exp(-z + F.logsigmoid(z / discopop_tau))


@_register("aot", options={"label_smoothing": 0.0}, needs=("chosen_logps", "rejected_logps"))
def _aot(x: _Inputs, label_smoothing: float) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): DPO on the sorted policy log-ratio
    differences minus the sorted reference ones, i.e. ``l(beta (sort(h_pi) - sort(h_ref)))``.

    Needs the policy/reference split, so it reads ``chosen_logps``/``rejected_logps`` (policy) and
    recovers the reference from the log-ratios.
    """
    pi = x.chosen_logps - x.rejected_logps
    ref = pi - (x.chosen - x.rejected)
    z = x.beta * (torch.sort(pi, dim=0).values - torch.sort(ref, dim=0).values)
    return (1 - label_smoothing) * _l(z) + label_smoothing * _l(-z)


@_register("aot_unpaired", options={"label_smoothing": 0.0})
def _aot_unpaired(x: _Inputs, label_smoothing: float) -> Tensor:
    """AOT, unpaired (arXiv:2406.05882): ``l(beta (sort(r_w) - sort(r_l)))``."""
    z = x.beta * (torch.sort(x.chosen, dim=0).values - torch.sort(x.rejected, dim=0).values)
    return (1 - label_smoothing) * _l(z) + label_smoothing * _l(-z)


@_register("kto", options={"desirable_weight": 1.0, "undesirable_weight": 1.0, "reference_point": None},
           paired=False)
def _kto(x: _Inputs, desirable_weight: float, undesirable_weight: float,
         reference_point: float | Tensor | None) -> Tensor:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7) and Diffusion-KTO (Li et al. 2024,
    arXiv:2404.04465), unpaired: desirable samples get ``w_D (1 - s(beta (r - z0)))``, undesirable
    ones ``w_U (1 - s(beta (z0 - r)))``.

    ``z0`` is detached and clamped at 0. It is ``reference_point`` when given; otherwise the mean of
    ``kl_logratios`` (log-ratios of mismatched prompt/completion pairs, as TRL does) when given;
    otherwise the mean of this batch's own log-ratios. The last is Diffusion-KTO's reference point
    (github.com/jacklishufan/diffusion-kto ``train_kto_sd_v1.5.py``: the batch mean of
    ``g = err_ref - err_theta`` over both labels, averaged over processes, clamped at 0; beta 1000 and
    ``w_D = w_U = 1`` there, with the sigmoid utility it trains by default).
    Returns ``cat(desirable losses, undesirable losses)``: the two sides may differ in size.
    """
    z0 = _kto_reference_point(x, reference_point)
    chosen = desirable_weight * (1 - torch.sigmoid(x.beta * (x.chosen - z0)))
    rejected = undesirable_weight * (1 - torch.sigmoid(x.beta * (z0 - x.rejected)))
    return torch.cat([chosen, rejected])


def _kto_reference_point(x: _Inputs, reference_point) -> Tensor:
    ref = x.chosen if x.chosen.numel() else x.rejected
    if reference_point is not None:
        z0 = torch.as_tensor(reference_point, dtype=ref.dtype, device=ref.device)
    elif x.kl_logratios is not None:
        z0 = x.kl_logratios.mean()
    else:
        z0 = torch.cat([x.chosen, x.rejected]).mean()
    return z0.detach().clamp(min=0)


# ---------------------------------------------------------------- reference-free losses


@_register("simpo", options={"simpo_gamma": 0.5, "label_smoothing": 0.0}, needs_reference=False,
           needs=("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"))
def _simpo(x: _Inputs, simpo_gamma: float, label_smoothing: float) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734): ``l(beta (pbar_w - pbar_l) - gamma)``, no reference;
    ``label_smoothing`` mixes in ``l(-...)`` as TRL's CPOTrainer does."""
    pw, pl = x.avg_logps()
    z = x.beta * (pw - pl) - simpo_gamma
    return (1 - label_smoothing) * _l(z) + label_smoothing * _l(-z)


@_register("cpo", options={"cpo_alpha": 1.0, "label_smoothing": 0.0}, needs_reference=False,
           needs=("chosen_logps", "rejected_logps", "chosen_lengths"))
def _cpo(x: _Inputs, cpo_alpha: float, label_smoothing: float) -> Tensor:
    """CPO (Xu et al. 2024, arXiv:2401.08417): ``l(beta (log pi_w - log pi_l)) + alpha NLL_w``.

    NLL here is the length-averaged negative log-likelihood of each chosen sequence; TRL's
    CPOTrainer pools the NLL over all chosen tokens of the batch, which equals this mean only when
    every chosen sequence has the same length.
    """
    z = x.beta * (x.chosen_logps - x.rejected_logps)
    nll = -x.chosen_logps / x.chosen_lengths
    return (1 - label_smoothing) * _l(z) + label_smoothing * _l(-z) + cpo_alpha * nll


@_register("orpo", needs_reference=False,
           needs=("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"))
def _orpo(x: _Inputs) -> Tensor:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 4 and 7): ``NLL_w - beta log s(log odds_w - log odds_l)``
    with ``odds = p / (1 - p)``, ``p = exp(pbar)``; beta is the paper's lambda (TRL's beta, 0.1).
    NLL is the length-averaged chosen NLL (see ``cpo`` on TRL's token pooling)."""
    pw, pl = x.avg_logps()
    log_odds = (pw - pl) - (_log1mexp(pw) - _log1mexp(pl))
    return -pw - x.beta * F.logsigmoid(log_odds)


@_register("asft", needs_reference=False,
           needs=("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"))
def _asft(x: _Inputs) -> Tensor:
    """Absolute-likelihood loss (ASFT-style, no reference): ``-log p_w - log(1 - p_l)``, ``p = exp(pbar)``.

    Each side is pushed in absolute terms (chosen up, rejected down) instead of through their
    difference; beta only scales the reported rewards.
    """
    pw, pl = x.avg_logps()
    return -pw - _log1mexp(pl)


@_register("mapo", options={"mapo_snr": 0.5, "mapo_timesteps": 1000}, needs_reference=False,
           needs=("chosen_errors", "rejected_errors"))
def _mapo(x: _Inputs, mapo_snr: float, mapo_timesteps: float) -> Tensor:
    """MaPO (Hong et al. 2024, arXiv:2406.06424), diffusion only, no reference:
    ``e_w - beta log s(T (f(c e_w) - f(c e_l)))`` with ``f(u) = u / (e^u - 1)``.

    ``e_w``/``e_l`` are the policy's per-sample denoising MSEs (``chosen_errors``/``rejected_errors``)
    at a shared noise and timestep; ``f`` maps an error to a bounded score in (0, 1], lower error
    higher score. ``c`` is ``mapo_snr`` (0.5) and ``T`` is ``mapo_timesteps`` (1000, the scheduler's
    ``num_train_timesteps``); beta (0.1) weights the margin term against the winners' denoising loss.
    This is the formula of the authors' code (github.com/mapo-t2i/mapo ``utils.py`` ``compute_loss``,
    which names the score difference ``log_odds``), the code behind the published checkpoints.
    """
    fw = _error_score(mapo_snr * x.chosen_errors)
    fl = _error_score(mapo_snr * x.rejected_errors)
    return x.chosen_errors - x.beta * F.logsigmoid(mapo_timesteps * (fw - fl))


def _error_score(u: Tensor) -> Tensor:
    """``u / (e^u - 1)`` for ``u >= 0`` (1 at 0), written ``u e^-u / (1 - e^-u)`` so that large ``u``
    gives 0 with finite gradients; below 1e-4 its Taylor series ``1 - u/2 + u^2/12``."""
    small = u < 1e-4
    safe = torch.where(small, torch.ones_like(u), u)
    return torch.where(small, 1 - u / 2 + u * u / 12, safe * torch.exp(-safe) / -torch.expm1(-safe))


# ---------------------------------------------------------------- the public function


@dataclass
class PreferenceLossOutput:
    """Per-pair losses and detached implicit rewards (``beta * logratio``, or ``beta * log pi``
    for reference-free losses)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor | None = None
    rejected_logps: Tensor | None = None

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """TRL's metric vocabulary; ``rewards/accuracies`` counts a tie as 0.5 (TRL counts it 0).

        For unpaired losses (KTO) margins and accuracies are only defined when both sides have
        the same length, and are left out otherwise.
        """
        cr, rr = self.chosen_rewards.float(), self.rejected_rewards.float()
        out = {"loss": self.losses.float().mean().item()}
        if cr.numel():
            out["rewards/chosen"] = cr.mean().item()
        if rr.numel():
            out["rewards/rejected"] = rr.mean().item()
        if cr.shape == rr.shape and cr.numel():
            out["rewards/margins"] = (cr - rr).mean().item()
            out["rewards/accuracies"] = ((cr > rr).float() + 0.5 * (cr == rr).float()).mean().item()
        if self.chosen_logps is not None and self.chosen_logps.numel():
            out["logps/chosen"] = self.chosen_logps.detach().float().mean().item()
        if self.rejected_logps is not None and self.rejected_logps.numel():
            out["logps/rejected"] = self.rejected_logps.detach().float().mean().item()
        return {prefix + k: v for k, v in out.items()}


_TENSOR_ARGS = ("chosen_logratios", "rejected_logratios", "chosen_logps", "rejected_logps", "chosen_lengths",
                "rejected_lengths", "chosen_win_probs", "rejected_win_probs", "kl_logratios", "chosen_nll",
                "weights", "chosen_errors", "rejected_errors")


def preference_loss(
    loss_type: str | Sequence[str],
    chosen_logratios: Tensor | None = None,
    rejected_logratios: Tensor | None = None,
    beta: float = 0.1,
    *,
    loss_weights: Sequence[float] | None = None,
    chosen_logps: Tensor | None = None,
    rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    chosen_win_probs: Tensor | None = None,
    rejected_win_probs: Tensor | None = None,
    kl_logratios: Tensor | None = None,
    chosen_errors: Tensor | None = None,
    rejected_errors: Tensor | None = None,
    sft_weight: float = 0.0,
    sft_reduction: Literal["sum", "mean"] = "mean",
    chosen_nll: Tensor | None = None,
    weights: Tensor | None = None,
    **options,
) -> PreferenceLossOutput:
    """Per-pair preference losses for one batch; reduce (mean) outside.

    Args:
        loss_type: a name in :data:`LOSS_TYPES` or ``logic:<structure>`` (a loss compiled from a
            preference structure, :mod:`diffdpo.loss_logic`), or a list of names summed with
            ``loss_weights`` (TRL's multi-loss form, e.g. MPO).
        chosen_logratios, rejected_logratios: ``[B]`` log pi_theta - log pi_ref (LLM) or
            ``-(err_theta - err_ref)`` (diffusion). Not needed by reference-free losses.
        beta: inverse temperature in *this* module's convention (see module doc, :func:`diffusion_beta`).
        chosen_logps, rejected_logps: ``[B]`` summed policy log-probs (reference-free losses, ``aot``,
            the SFT term and ``logps/*`` metrics).
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (length normalisation).
        chosen_win_probs, rejected_win_probs: ``[B]`` estimated win probabilities (``sppo``).
        kl_logratios: log-ratios of mismatched completions (``kto``'s reference point).
        chosen_errors, rejected_errors: ``[B]`` the policy's per-sample denoising MSEs (diffusion;
            ``mapo``, which reads no log-ratios).
        sft_weight: weight ``eta`` of an SFT/NLL term on the chosen samples added to every pair's
            loss (RPO = DPO + eta NLL; CRPO / Tango 2 "SFT first" for diffusion).
        sft_reduction: ``"sum"`` uses ``-chosen_logps`` (summed NLL, RPO paper's main form),
            ``"mean"`` uses ``-chosen_logps / chosen_lengths`` (RPO's averaged variant, TRL's rpo_alpha).
        chosen_nll: ``[B]`` an explicit NLL for the SFT term instead of the two above; for diffusion
            pass the winner's policy denoising error.
        weights: ``[B]`` per-pair weights multiplied into the losses.
        **options: loss-specific options (``label_smoothing``, ``reward_shift``, ...); each loss's
            accepted options and defaults are in ``LOSS_TYPES[name].options``.

    Raises:
        ValueError: unknown loss type, an option no selected loss takes, missing or mismatched
            inputs, NaN/inf inputs, or an out-of-range option — naming the argument.
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise ValueError("loss_type: give at least one loss type")
    unknown = [n for n in names if n not in LOSS_TYPES and not n.startswith(LOGIC_PREFIX)]
    if unknown:
        raise ValueError(f"loss_type: unknown {unknown}; valid types are {sorted(LOSS_TYPES)} "
                         f"or '{LOGIC_PREFIX}<structure>'")
    specs = [loss_spec(n) for n in names]
    if loss_weights is None:
        loss_weights = [1.0] * len(names)
    if len(loss_weights) != len(names):
        raise ValueError(f"loss_weights: {len(loss_weights)} weights for {len(names)} loss types")
    accepted = set().union(*(s.options for s in specs))
    extra = sorted(set(options) - accepted)
    if extra:
        raise ValueError(f"{extra[0]}: not an option of loss type(s) {names}; they take {sorted(accepted) or 'none'}")
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta: must be a positive finite number, got {beta}")
    if sft_reduction not in ("sum", "mean"):
        raise ValueError(f"sft_reduction: must be 'sum' or 'mean', got {sft_reduction!r}")

    given = dict(chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
                 chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
                 rejected_lengths=rejected_lengths, chosen_win_probs=chosen_win_probs,
                 rejected_win_probs=rejected_win_probs, kl_logratios=kl_logratios, chosen_nll=chosen_nll,
                 weights=weights, chosen_errors=chosen_errors, rejected_errors=rejected_errors)
    paired = all(s.paired for s in specs)
    if not paired and len(specs) > 1:
        raise ValueError(f"loss_type: unpaired loss types cannot be combined with others, got {names}")
    if not paired and (sft_weight or weights is not None):
        raise ValueError(f"{'sft_weight' if sft_weight else 'weights'}: not supported by unpaired loss type {names[0]!r}")
    t = _check_tensors(given, paired=paired)
    _check_requirements(specs, names, t, options, sft_weight, sft_reduction)

    x = _Inputs(t["chosen_logratios"], t["rejected_logratios"], float(beta), t["chosen_logps"],
                t["rejected_logps"], t["chosen_lengths"], t["rejected_lengths"], t["chosen_win_probs"],
                t["rejected_win_probs"], t["kl_logratios"], t["chosen_errors"], t["rejected_errors"])
    if x.chosen is None:  # reference-free only: rewards are beta * policy log-probs (TRL's CPO/ORPO),
        # or beta * -error (a diffusion model's log-likelihood surrogate) where only errors are given
        x.chosen, x.rejected = ((x.chosen_logps, x.rejected_logps) if x.chosen_logps is not None
                                else (-x.chosen_errors, -x.rejected_errors))

    losses = None
    for spec, w in zip(specs, loss_weights):
        kwargs = {k: options.get(k, default) for k, default in spec.options.items()}
        term = spec.fn(x, **kwargs)
        losses = w * term if losses is None else losses + w * term

    if sft_weight:
        nll = t["chosen_nll"]
        if nll is None:
            nll = -x.chosen_logps if sft_reduction == "sum" else -x.chosen_logps / x.chosen_lengths
        losses = losses + sft_weight * nll
    if t["weights"] is not None:
        losses = losses * t["weights"]

    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(x.beta * x.chosen).detach(),
        rejected_rewards=(x.beta * x.rejected).detach(),
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
    )


def _check_tensors(given: dict[str, Tensor | None], paired: bool) -> dict[str, Tensor | None]:
    """Validate shapes and values; compute in float32 or wider (fp16/bf16 inputs overflow otherwise)."""
    out: dict[str, Tensor | None] = {}
    for name, value in given.items():
        if value is None:
            out[name] = None
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 1:
            raise ValueError(f"{name}: expected shape [B], got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name}: contains NaN or inf")
        if value.dtype in (torch.float16, torch.bfloat16) or not value.is_floating_point():
            value = value.float()
        out[name] = value
    sizes = {n: v.shape[0] for n, v in out.items() if v is not None and n != "kl_logratios"}
    chosen_side = {n: s for n, s in sizes.items() if not n.startswith("rejected")}
    rejected_side = {n: s for n, s in sizes.items() if n.startswith("rejected")}
    for side in (chosen_side, rejected_side) if not paired else (sizes,):
        if len(set(side.values())) > 1:
            raise ValueError(f"shape mismatch between {', '.join(f'{n}[{s}]' for n, s in side.items())}")
    for name in ("chosen_lengths", "rejected_lengths"):
        if out[name] is not None and not (out[name] > 0).all():
            raise ValueError(f"{name}: every length must be positive")
    for name in ("chosen_win_probs", "rejected_win_probs"):
        if out[name] is not None and not ((out[name] >= 0) & (out[name] <= 1)).all():
            raise ValueError(f"{name}: probabilities must lie in [0, 1]")
    for name in ("chosen_logps", "rejected_logps"):
        if out[name] is not None and (out[name] > 0).any():
            raise ValueError(f"{name}: log-probabilities must be <= 0")
    for name in ("chosen_errors", "rejected_errors"):
        if out[name] is not None and (out[name] < 0).any():
            raise ValueError(f"{name}: squared errors must be >= 0")
    return out


def _check_requirements(specs, names, t, options, sft_weight, sft_reduction) -> None:
    needs_ratios = any(s.needs_reference for s in specs)
    for side in ("chosen_logratios", "rejected_logratios"):
        if needs_ratios and t[side] is None:
            raise ValueError(f"{side}: required by loss type(s) {[s.name for s in specs if s.needs_reference]}")
    free = [s.name for s in specs if not s.needs_reference and "chosen_logps" in s.needs]
    if free and (t["chosen_logps"] is None or t["rejected_logps"] is None):
        raise ValueError(f"chosen_logps/rejected_logps: required by reference-free loss type(s) {free}")
    for spec in specs:
        kwargs = {k: options.get(k, d) for k, d in spec.options.items()}
        for arg in required_inputs(spec, kwargs):
            if t[arg] is None:
                raise ValueError(f"{arg}: required by loss type {spec.name!r}")
        eps = kwargs.get("label_smoothing")
        if eps is not None:
            low_ok = eps > 0 if spec.name == "exo_pair" else eps >= 0
            if not (low_ok and eps < 0.5):
                bound = "(0, 0.5)" if spec.name == "exo_pair" else "[0, 0.5)"
                raise ValueError(f"label_smoothing: must lie in {bound} for {spec.name!r}, got {eps}")
        if spec.name == "discopop" and not kwargs["discopop_tau"] > 0:
            raise ValueError(f"discopop_tau: must be positive, got {kwargs['discopop_tau']}")
    if sft_weight:
        if sft_weight < 0:
            raise ValueError(f"sft_weight: must be >= 0, got {sft_weight}")
        if t["chosen_nll"] is None:
            if t["chosen_logps"] is None:
                raise ValueError("chosen_nll: the SFT term needs chosen_nll or chosen_logps")
            if sft_reduction == "mean" and t["chosen_lengths"] is None:
                raise ValueError("chosen_lengths: sft_reduction='mean' needs chosen_lengths")


class RunningRewardMean:
    """BCO's reward shift delta: the cumulative mean, over steps, of each step's mean reward
    (what TRL 0.28's ``RunningMoments`` gives when fed one batch-mean per step). Call :meth:`update`
    once per step with that step's rewards *before* computing the loss, as BCO and TRL do; in a
    multi-process run pass the rewards gathered from every process so all ranks share one delta."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> float:
        batch_mean = torch.cat([chosen_rewards, rejected_rewards]).detach().double().mean().item()
        self.count += 1
        self.mean += (batch_mean - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


_DIFFUSION_BETA_FACTORS = {
    "core": 1.0,  # diffdpo's own: l(b * h)
    # l(-0.5 * B * (model_diff - ref_diff)): Salesforce DiffusionDPO train.py, Tango 2, diffusers SDXL example
    "salesforce": 0.5,
    "tango2": 0.5,
    "tangoflux": 0.5,  # declare-lab/TangoFlux tangoflux/model.py, beta_dpo 2000, plus the winners' MSE
    # l(B * (ref_diff - model_diff)): diffusers examples/research_projects/diffusion_dpo SD1.5 script
    "diffusers": 1.0,
}


def diffusion_beta(published_beta: float, convention: str) -> float:
    """Convert a published Diffusion-DPO beta to this module's convention.

    ``diffusion_beta(5000, "salesforce") == 2500 == diffusion_beta(2500, "diffusers")``;
    ``diffusion_beta(2000, "tango2") == diffusion_beta(2000, "tangoflux") == 1000``.
    """
    if convention not in _DIFFUSION_BETA_FACTORS:
        raise ValueError(f"convention: unknown {convention!r}; valid are {sorted(_DIFFUSION_BETA_FACTORS)}")
    return published_beta * _DIFFUSION_BETA_FACTORS[convention]
