"""Preference models learnt from pairs: the judges of RSO, online IPO, IPO-MD, SPPO and iterative DPO
when no exact reward exists.

* **Reward model** (pointwise): a transformers sequence-classification model with one output reads
  ``prompt + completion``, trained with ``-log sigmoid(r(chosen) - r(rejected))`` (Ouyang et al. 2022,
  arXiv:2203.02155, eq. 1). ``rm:PATH`` loads it wherever a judge is read (``diffdpo eval llm
  --judge``, ``preference.judge`` of ``recipes/llm_online.py``).
* **Pairwise preference model**: the same kind of classifier reads ``prompt + a + SEP + b`` and gives
  the logit of ``a`` beating ``b`` (PairRM-style, the preference model of SPPO and of Calandriello et
  al.'s online IPO / IPO-MD). Trained on each pair in both orders; its win probability is symmetrised,
  ``P(a > b) = (sigmoid(f(a, b)) + 1 - sigmoid(f(b, a))) / 2``, so ``P(a > b) + P(b > a) = 1`` however
  it was trained. ``pm:PATH`` loads it as the online recipe's judge (``K (K - 1) / 2`` calls a prompt).

Both are saved with ``save_pretrained`` (model and tokenizer in one folder).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def sequence_classifier_like(causal_lm, pad_token_id: int):
    """A one-output sequence classifier of the causal LM's architecture, its body initialised from
    the LM (the usual start of a reward model: the SFT model with a new scalar head)."""
    from transformers import AutoModelForSequenceClassification

    fields = {k: v for k, v in causal_lm.config.to_dict().items() if k not in ("id2label", "label2id")}
    config = causal_lm.config.__class__.from_dict({**fields, "num_labels": 1, "pad_token_id": pad_token_id})
    model = AutoModelForSequenceClassification.from_config(config)
    missing = model.load_state_dict(causal_lm.state_dict(), strict=False).missing_keys
    if any(not k.startswith("score.") for k in missing):
        raise ValueError(f"reward model: the LM's body did not load ({missing[:4]})")
    return model


def _batch(tokenizer, prompts: Sequence[str], completions: Sequence[str]):
    return tokenizer([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def rewards(model, tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """``[N]`` scalar rewards (with gradient when the model trains)."""
    enc = _batch(tokenizer, prompts, completions).to(next(model.parameters()).device)
    return model(**enc).logits[:, 0].float()


def bradley_terry_loss(model, tokenizer, rows: Sequence[dict]) -> torch.Tensor:
    """Mean ``-log sigmoid(r(chosen) - r(rejected))`` over preference rows (prompt/chosen/rejected)."""
    prompts = [r["prompt"] for r in rows]
    r = rewards(model, tokenizer, prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    n = len(rows)
    return -F.logsigmoid(r[:n] - r[n:]).mean()


def train_reward_model(model, tokenizer, rows: Sequence[dict], steps: int, lr: float = 1e-3, batch_size: int = 32,
                       seed: int = 0) -> list[float]:
    """Train in place on ``rows`` (cycled in a seeded order); returns the per-step losses."""
    return _train(model, tokenizer, rows, bradley_terry_loss, steps, lr, batch_size, seed, "reward model")


def _train(model, tokenizer, rows, loss_fn, steps, lr, batch_size, seed, what) -> list[float]:
    if not rows:
        raise ValueError(f"{what}: no preference rows to train on")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        batch = [rows[int(order[(step * batch_size + i) % len(rows)])] for i in range(min(batch_size, len(rows)))]
        loss = loss_fn(model, tokenizer, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def pair_accuracy(model, tokenizer, rows: Sequence[dict]) -> float:
    """Share of pairs whose chosen completion the model scores higher."""
    prompts = [r["prompt"] for r in rows]
    r = rewards(model, tokenizer, prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    n = len(rows)
    return float((r[:n] > r[n:]).float().mean())


# ------------------------------------------------------------------ the pairwise preference model

PAIR_SEPARATOR = " || "  # between the two completions; any text the tokenizer encodes


def pair_logits(model, tokenizer, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> torch.Tensor:
    """``[N]`` logits of ``first`` beating ``second`` (one order, as trained; with gradient)."""
    return rewards(model, tokenizer, prompts, [a + PAIR_SEPARATOR + b for a, b in zip(first, second)])


def pairwise_loss(model, tokenizer, rows: Sequence[dict]) -> torch.Tensor:
    """Binary cross-entropy on each pair in both orders: ``(chosen, rejected)`` is a win, the swap a loss."""
    prompts, chosen, rejected = [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    f = pair_logits(model, tokenizer, prompts * 2, chosen + rejected, rejected + chosen)
    n = len(rows)
    return -(F.logsigmoid(f[:n]).mean() + F.logsigmoid(-f[n:]).mean()) / 2


def train_pairwise_model(model, tokenizer, rows: Sequence[dict], steps: int, lr: float = 1e-3, batch_size: int = 32,
                         seed: int = 0) -> list[float]:
    """Train in place on ``rows`` (both orders of each pair); returns the per-step losses."""
    return _train(model, tokenizer, rows, pairwise_loss, steps, lr, batch_size, seed, "pairwise preference model")


@torch.no_grad()
def win_probability(model, tokenizer, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
    """Symmetrised ``P(a > b)``: the mean of the model's two readings of the pair."""
    n = len(prompts)
    f = pair_logits(model, tokenizer, list(prompts) * 2, list(a) + list(b), list(b) + list(a))
    return (torch.sigmoid(f[:n]) + 1 - torch.sigmoid(f[n:])) / 2


def pairwise_judge(path: str, device: str = "cpu"):
    """``prob(prompts, a, b) -> [N]`` of a saved pairwise model (the callable ``PairwisePreference`` asks)."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"pm:{path}: no pairwise preference model there (config.json missing)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    if tokenizer.pad_token_id is None:
        raise ValueError(f"pm:{path}: the tokenizer has no pad token (batches of pairs need one)")

    def prob(prompts, a, b):
        return win_probability(model, tokenizer, prompts, a, b).tolist()
    return prob
