"""A Bradley-Terry reward model trained on preference pairs: the learned preference model of RSO,
online IPO and iterative DPO when no exact reward exists.

A transformers sequence-classification model with one output reads ``prompt + completion`` and is
trained on pairs with ``-log sigmoid(r(chosen) - r(rejected))`` (Ouyang et al. 2022, arXiv:2203.02155,
eq. 1). It is saved with ``save_pretrained``, so ``rm:PATH`` loads it wherever a judge is read
(``diffdpo eval llm --judge``, ``preference.judge`` of ``recipes/llm_online.py``).
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
    if not rows:
        raise ValueError("reward model: no preference rows to train on")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        batch = [rows[int(order[(step * batch_size + i) % len(rows)])] for i in range(min(batch_size, len(rows)))]
        loss = bradley_terry_loss(model, tokenizer, batch)
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
