"""A causal LM as the online loop's policy (:class:`diffdpo.online.loop.OnlinePolicy`).

Sampling runs its own token loop (KV cache, temperature 1 by default) so that it can draw from the
geometric mixture ``pi^(1-w) pi_ref^w`` token by token, the sampling policy of IPO-MD / Nash-MD
(Calandriello et al. 2024, arXiv:2403.08635, §4; Munos et al. 2023, arXiv:2312.00886, §7): the
mixture's next-token log-probs are ``(1-w) log pi + w log pi_ref``, renormalised. Outputs stay token
ids (``(prompt_ids, completion_ids)``, EOS kept), so what is trained on is exactly what was sampled.

Training keeps one AdamW across rounds (an online run is one optimisation, not a restart per round)
and computes the reference's log-probs of each round's pairs once. SPPO's soft labels reach the loss
core as ``chosen_win_probs``/``rejected_win_probs``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from diffdpo.llm.batching import collate
from diffdpo.llm.logps import LogpsModel
from diffdpo.llm.metrics import load_judge
from diffdpo.llm.objective import LossConfig, MetricPool, pair_losses
from diffdpo.llm.trainer import ModelConfig, load_causal_lm, load_tokenizer
from diffdpo.losses import loss_spec
from diffdpo.online.loop import OnlineConfig, run_online
from diffdpo.llm.reward_model import pairwise_judge
from diffdpo.preference_model import PairwisePreference, PreferenceModel, RewardPreference

Output = tuple[list[int], list[int]]


@torch.no_grad()
def sample_completions(model, prompt_ids: Sequence[list[int]], k: int, max_new_tokens: int, eos_token_id: int,
                       generator: torch.Generator, reference=None, mixture_weight: float = 0.0,
                       temperature: float = 1.0) -> list[list[Output]]:
    """``k`` completions per prompt; prompts of one token length are sampled as one batch."""
    was = model.training
    model.eval()
    out: list[list[Output] | None] = [None] * len(prompt_ids)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(i)
    mix = reference is not None and mixture_weight > 0
    for idx in by_length.values():
        x = torch.tensor([prompt_ids[i] for i in idx], device=_device(model)).repeat_interleave(k, 0)
        tokens = _sample_batch(model, x, max_new_tokens, eos_token_id, generator,
                               reference if mix else None, mixture_weight, temperature)
        for row, i in enumerate(idx):
            out[i] = [(list(prompt_ids[i]), tokens[row * k + s]) for s in range(k)]
    model.train(was)
    return out  # type: ignore[return-value]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sample_batch(model, x, max_new_tokens, eos, generator, reference, w, temperature) -> list[list[int]]:
    n = x.shape[0]
    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    new: list[list[int]] = [[] for _ in range(n)]
    caches = [None, None]
    step_input = x
    for _ in range(max_new_tokens):
        logp, caches[0] = _next_logps(model, step_input, caches[0], temperature)
        if reference is not None:
            ref_logp, caches[1] = _next_logps(reference, step_input, caches[1], temperature)
            logp = torch.log_softmax((1 - w) * logp + w * ref_logp, -1)
        token = torch.multinomial(logp.exp().cpu(), 1, generator=generator).to(x.device).squeeze(1)
        for i in (~done).nonzero().flatten().tolist():
            new[i].append(int(token[i]))
        done |= token == eos
        if bool(done.all()):
            break
        step_input = token[:, None]
    return new


def _next_logps(model, step_input, cache, temperature):
    out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
    return torch.log_softmax(out.logits[:, -1].float() / temperature, -1), out.past_key_values


class LLMOnlinePolicy:
    """Policy, frozen reference and optimizer of an online run over a causal LM."""

    def __init__(self, model, tokenizer, loss: LossConfig, lr: float, batch_size: int = 16,
                 max_new_tokens: int = 64, max_grad_norm: float | None = 1.0, weight_decay: float = 0.0,
                 logp_chunk_size: int = 1024):
        self.model, self.tokenizer, self.loss = model, tokenizer, loss
        self.reference = copy.deepcopy(model).requires_grad_(False).eval() if loss.needs_reference else None
        self.initial_reference = self.reference
        self.batch_size, self.max_new_tokens, self.max_grad_norm = batch_size, max_new_tokens, max_grad_norm
        self.logps = LogpsModel(model, logp_chunk_size)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=weight_decay)
        self.needs_win_probs = "chosen_win_probs" in loss_spec(loss.type).needs

    def sample(self, prompts, k, sampler, mixture_weight, seed) -> list[list[Output]]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        generator = torch.Generator().manual_seed(seed)
        eos = self.tokenizer.eos_token_id
        ref = self.initial_reference if self.initial_reference is not None else self._frozen_initial()
        if sampler == "reference":
            return sample_completions(ref, ids, k, self.max_new_tokens, eos, generator)
        return sample_completions(self.model, ids, k, self.max_new_tokens, eos, generator,
                                  reference=ref if sampler == "mixture" else None, mixture_weight=mixture_weight)

    def _frozen_initial(self):
        """Reference-free losses keep no reference; sampling from it (offline methods) needs one copy."""
        self.initial_reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        return self.initial_reference

    def text(self, output: Output) -> str:
        return self.tokenizer.decode(output[1], skip_special_tokens=True)

    def reset_reference(self) -> None:
        """The reference becomes the current policy (SPPO's ``pi_t``)."""
        if self.reference is None:
            return
        if self.reference is self.initial_reference:
            self.reference = copy.deepcopy(self.model)
        self.reference.load_state_dict(self.model.state_dict())
        self.reference.requires_grad_(False).eval()

    def train_round(self, records: list[dict], steps: int, seed: int, on_step=None) -> dict[str, float]:
        pad = self.tokenizer.pad_token_id
        seqs = [r["chosen_output"] for r in records], [r["rejected_output"] for r in records]
        ref_all = None
        if self.reference is not None:
            with torch.no_grad():
                batch = collate(seqs[0] + seqs[1], pad).to(_device(self.model))
                ref_all = LogpsModel(self.reference).batch_logps(batch).logps.float()
        win = torch.tensor([[r["chosen_win_prob"], r["rejected_win_prob"]] for r in records], dtype=torch.float32)
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))
        n, pool = len(records), MetricPool()
        self.model.train()
        for step in range(steps):
            idx = [int(order[(step * self.batch_size + i) % n]) for i in range(min(self.batch_size, n))]
            batch = collate([seqs[0][i] for i in idx] + [seqs[1][i] for i in idx], pad).to(_device(self.model))
            out = self.logps.batch_logps(batch)
            ref = None if ref_all is None else torch.cat([ref_all[idx], ref_all[[n + i for i in idx]]])
            cfg = self.loss
            if self.needs_win_probs:
                cfg = replace(cfg, options={**cfg.options, "chosen_win_probs": win[idx, 0],
                                            "rejected_win_probs": win[idx, 1]})
            losses, core, extras = pair_losses(out, ref, cfg)
            self.optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            pool.add(core, extras)
            if on_step is not None:
                on_step(step + 1)
        return pool.result()

    def save(self, folder: Path) -> None:
        """Policy and optimizer (safetensors and a tensors-only state); a per-round reference is
        rebuilt from the policy when a round starts."""
        from safetensors.torch import save_model

        save_model(self.model, str(folder / "policy.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(folder / "policy.safetensors"))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))


@dataclass
class PreferenceConfig:
    judge: str = field(default="", metadata={
        "help": "rm:PATH (a reward model), pm:PATH (a pairwise preference model) or "
                "module:function(prompt, completion) -> float, as `eval llm --judge`"})
    temperature: float = field(default=1.0, metadata={
        "help": "Bradley-Terry temperature of a pointwise judge's win probabilities (pm: unused)"})


@dataclass
class OnlineTrainConfig:
    output_dir: str = "runs/llm_online"
    lr: float = 5e-7
    batch_size: int = 8
    max_new_tokens: int = 256
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    progress: bool = True


@dataclass
class LLMOnlineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts_path: str = field(default="", metadata={"help": "prompts: .txt (one per line) or .jsonl with 'prompt'"})
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: OnlineTrainConfig = field(default_factory=OnlineTrainConfig)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a ``.txt`` file (one per non-empty line) or a JSONL file (a ``prompt`` per row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts_path {str(path)!r}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f"{path}:{n}: expected an object with a non-empty string 'prompt'")
        prompts.append(row["prompt"])
    return prompts


def judge_preference(cfg: PreferenceConfig) -> PreferenceModel:
    """``pm:PATH``: a pairwise preference model; otherwise a pointwise judge under Bradley-Terry."""
    if not cfg.judge:
        raise ValueError("preference.judge: give rm:PATH, pm:PATH or module:function")
    if cfg.judge.startswith("pm:"):
        return PairwisePreference(pairwise_judge(cfg.judge[3:]), name=cfg.judge)
    judge = load_judge(cfg.judge)
    return RewardPreference(lambda prompts, outs: [judge(p, o) for p, o in zip(prompts, outs)], cfg.temperature,
                            name=cfg.judge)


def train_online(cfg: LLMOnlineConfig, model=None, tokenizer=None, preference: PreferenceModel | None = None,
                 on_round=None) -> dict:
    """Run the online loop on a causal LM; writes the rounds, checkpoints and ``final/``."""
    prompts = read_prompts(cfg.prompts_path)
    preference = preference or judge_preference(cfg.preference)
    tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path)
    model = model or load_causal_lm(cfg.model.name_or_path, cfg.model.dtype)
    t = cfg.train
    torch.manual_seed(cfg.online.seed)
    policy = LLMOnlinePolicy(model, tokenizer, cfg.loss, t.lr, t.batch_size, t.max_new_tokens, t.max_grad_norm,
                             t.weight_decay)
    out = Path(t.output_dir)
    result = run_online(cfg.online, policy, preference, prompts, out, on_round, progress=t.progress)
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    print(f"rounds: {out / 'rounds'}; history: {out / 'history.json'}; model: {out / 'final'}")
    return {**result, "model": model, "output_dir": str(out)}
