"""The LLM preference-training loop shared by ``recipes/llm_dpo.py`` and the TextWorld.

records -> token batches -> one concatenated forward -> log-ratios against cached reference
log-probs -> loss core -> optimizer step. Runs on CPU or under ``accelerate launch``.

Gradient accumulation: every micro-batch contributes ``sum(losses) / examples_per_step`` to the
gradient, so ``grad_accum`` x ``batch_size`` equals one batch of their product exactly for every
per-pair loss (TRL issue #2617). Losses that look across the batch (``aot`` sorting, KTO's batch
reference point) see micro-batches, as any accumulation does.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from diffdpo.errors import ModelNotFoundError
from diffdpo.llm.batching import collate, kl_sequences, pair_sequences
from diffdpo.llm.data import TokenizeSettings, load_pairs, load_unpaired
from diffdpo.llm.logps import LogpsModel, SequenceLogps
from diffdpo.llm.objective import LossConfig, MetricPool, pair_losses, unpaired_losses
from diffdpo.llm.reference import cached_reference_logps, model_fingerprint, reference_mode
from diffdpo.losses import RunningRewardMean
from diffdpo.training.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from diffdpo.training.sharding import (check_engine, engine_name, load_model_state, load_optimizer_state, model_state,
                                       optimizer_state, prepare_frozen)


@dataclass
class ModelConfig:
    name_or_path: str = field(default="", metadata={"help": "hub id or local directory of a causal LM"})
    ref_name_or_path: str | None = field(default=None, metadata={"help": "separate reference (default: the initial policy)"})
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tune"})
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DataConfig:
    train_path: str = ""
    eval_path: str | None = None
    max_length: int = 1024
    max_prompt_length: int | None = None
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    on_bad_record: Literal["error", "skip"] = "error"


@dataclass
class TrainConfig:
    output_dir: str = "runs/llm_dpo"
    seed: int = 0
    lr: float = 5e-7
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    eval_batch_size: int = 16
    log_every: int = 1
    save_every: int = 0
    keep_last: int | None = 2
    resume: bool = True
    padding_free: bool = False
    precompute_ref: bool = True
    ref_cache_dir: str | None = None
    logp_chunk_size: int = 1024
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    progress: bool = True


@dataclass
class LLMDPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.train.batch_size < 1 or self.train.grad_accum < 1:
            raise ValueError("train.batch_size and train.grad_accum must be >= 1")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(_not_found(name_or_path, e)) from None
    if len(tok) < 16:  # transformers 5 offline can hand back a 5-token stub instead of raising
        raise RuntimeError(f"tokenizer {name_or_path!r}: degenerate vocabulary of {len(tok)} tokens "
                           "(an offline hub lookup that found no files?)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise RuntimeError(f"tokenizer {name_or_path!r}: no EOS token; completions need one")
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype])
    except OSError as e:
        raise ModelNotFoundError(_not_found(name_or_path, e)) from None


def _not_found(name: str, e: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    return (f"model {name!r}: not a local directory with model files, and "
            + ("HF_HUB_OFFLINE is set so the hub was not asked" if offline else "the hub download failed")
            + f" ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def add_lora(model, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM"))


class _Order:
    """Sample ``k`` of the endless stream is ``perm(epoch k // n)[k % n]``, each epoch's permutation
    seeded from (seed, epoch): the data position is one integer, so resume is exact."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def __call__(self, k: int) -> int:
        epoch = k // self.n
        if epoch not in self._cache:
            self._cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))}
        return int(self._cache[epoch][k % self.n])


def train(cfg: LLMDPOConfig, model=None, tokenizer=None, on_step=None) -> dict:
    """Run the recipe; returns ``{"history": [...], "eval": {...}, "output_dir": str, "data": {...}}``.

    ``model``/``tokenizer`` may be passed in-memory (tests, TextWorld); otherwise they are loaded from
    ``cfg.model.name_or_path``. ``on_step(step, model)`` is called after every optimizer step (the
    TextWorld measures its exact reward along training with it).
    """
    from accelerate import Accelerator
    from transformers import get_scheduler

    t, out_dir = cfg.train, Path(cfg.train.output_dir)
    accelerator = Accelerator(mixed_precision=t.mixed_precision,
                              log_with=None if t.report_to == "none" else t.report_to, project_dir=str(out_dir))
    check_engine(accelerator)
    torch.manual_seed(t.seed)
    tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path)
    model = model or load_causal_lm(cfg.model.name_or_path, cfg.model.dtype)
    ref_model = load_causal_lm(cfg.model.ref_name_or_path, cfg.model.dtype) if cfg.model.ref_name_or_path else None
    if cfg.model.lora_r:
        model = add_lora(model, cfg.model)
    elif ref_model is None and cfg.loss.needs_reference and not t.precompute_ref:
        ref_model = copy.deepcopy(model)
    if not accelerator.is_fsdp2:  # FSDP2 moves each shard to its device; a whole model need not fit there
        model.to(accelerator.device)

    settings = TokenizeSettings(cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.truncation)
    paired = cfg.loss.paired
    load = load_pairs if paired else load_unpaired
    train_ex, train_report = load(cfg.data.train_path, tokenizer, settings, cfg.data.on_bad_record)
    eval_ex, eval_report = (load(cfg.data.eval_path, tokenizer, settings, cfg.data.on_bad_record)
                            if cfg.data.eval_path else ([], None))
    accelerator.print(f"train data: {train_report.summary()}" + (f"; eval data: {eval_report.summary()}" if eval_report else ""))
    pad = tokenizer.pad_token_id

    def sequences(examples, indices):
        if paired:
            return pair_sequences([examples[i] for i in indices])
        return [(examples[i].prompt_ids, examples[i].completion_ids) for i in indices]

    precompute = cfg.loss.needs_reference and t.precompute_ref
    # the cache key hashes the whole reference weights: before sharding splits them
    model_fp = model_fingerprint(ref_model if ref_model is not None else model) if precompute else None

    def ref_logps(name, examples, indices):
        """Reference log-probs ``[2B]`` (paired) or ``([n], [n] KL)`` (unpaired) of these examples."""
        n = len(examples)
        if name in ref_cache:
            table = ref_cache[name]
            idx = torch.tensor(list(indices))
            if paired:
                return table.view(2, n)[:, idx].reshape(-1)
            return table[:n][idx], table[n:][idx]
        seqs = sequences(examples, indices)
        kl = kl_sequences(examples, examples, indices) if not paired else []
        with reference_mode(accelerator.unwrap_model(policy), ref_scorer) as ref:
            batch = collate(seqs + kl, pad, t.padding_free).to(accelerator.device)
            logps = ref.batch_logps(batch).logps.float()
        return logps if paired else (logps[:len(seqs)], logps[len(seqs):])

    policy = LogpsModel(model, t.logp_chunk_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=t.max_steps)
    # the scheduler stays unprepared: accelerate would step it once per process per optimizer step,
    # while max_steps and warmup here count optimizer steps
    policy, optimizer = accelerator.prepare(policy, optimizer)
    # a separate reference is placed like the policy (sharded under FSDP2)
    ref_scorer = (prepare_frozen(accelerator, LogpsModel(ref_model, t.logp_chunk_size)) if ref_model is not None
                  else None)

    # reference log-probs for every train / eval sequence, computed once (through the prepared, possibly
    # sharded model, before any step) and cached on disk
    ref_cache = {}
    if precompute:
        cache_dir = t.ref_cache_dir or str(out_dir / "ref_cache")
        for name, examples in (("train", train_ex), ("eval", eval_ex)):
            if not examples:
                continue
            seqs = sequences(examples, range(len(examples)))
            if not paired:
                seqs = seqs + kl_sequences(examples, examples, range(len(examples)))
            logps, hit = cached_reference_logps(accelerator.unwrap_model(policy), seqs, pad, cache_dir, ref_scorer,
                                                t.eval_batch_size, t.padding_free, t.logp_chunk_size,
                                                accelerator.device, model_fp,
                                                progress=t.progress and accelerator.is_main_process)
            accelerator.print(f"reference log-probs ({name}): {'cache hit' if hit else 'computed'}")
            ref_cache[name] = logps

    # BCO's reward shift: the running mean of rewards, updated before each loss (TRL 0.28's RunningMoments)
    bco_shift = RunningRewardMean() if cfg.loss.type == "bco_pair" and "reward_shift" not in cfg.loss.options else None

    def loss_cfg() -> LossConfig:
        if bco_shift is None:
            return cfg.loss
        return replace(cfg.loss, options={**cfg.loss.options, "reward_shift": bco_shift.mean})

    step, cursor, history = 0, 0, []
    last = latest_checkpoint(out_dir / "checkpoints") if t.resume else None
    if last is not None:
        from safetensors.torch import load_file

        load_model_state(accelerator, policy, load_file(last / "trainable.safetensors"), str(last))
        load_optimizer_state(accelerator, policy, optimizer, torch.load(last / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(last / "scheduler.pt", weights_only=True))
        state = load_trainer_state(last)
        step, cursor = state["step"], state["cursor"]
        history = state.get("history", [])
        if bco_shift is not None:
            bco_shift.load_state_dict(state["bco_shift"])
        accelerator.print(f"resumed from {last} at step {step}")

    if accelerator.is_main_process and t.report_to != "none":
        accelerator.init_trackers("llm_dpo", config={"loss": cfg.loss.type, "beta": cfg.loss.beta, "lr": t.lr})
    order = _Order(len(train_ex), t.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = t.batch_size * t.grad_accum  # examples per process per optimizer step

    def micro_step(indices, scale):
        seqs = sequences(train_ex, indices)
        if paired:
            batch = collate(seqs, pad, t.padding_free).to(accelerator.device)
            out = policy(batch.input_ids, batch.attention_mask, batch.position_ids, batch.loss_mask, batch.seq_ids,
                         batch.num_seqs)
            ref = ref_logps("train", train_ex, indices) if cfg.loss.needs_reference else None
            if bco_shift is not None:
                rewards = cfg.loss.beta * (out.logps.detach() - ref)
                bco_shift.update(rewards[:len(indices)], rewards[len(indices):])
            losses, core, extras = pair_losses(out, ref, loss_cfg())
        else:
            batch = collate(seqs, pad, t.padding_free).to(accelerator.device)
            out = policy(batch.input_ids, batch.attention_mask, batch.position_ids, batch.loss_mask, batch.seq_ids,
                         batch.num_seqs)
            ref, ref_kl = ref_logps("train", train_ex, indices)
            with torch.no_grad():
                kl_batch = collate(kl_sequences(train_ex, train_ex, indices), pad, t.padding_free).to(accelerator.device)
                kl_policy = accelerator.unwrap_model(policy).batch_logps(kl_batch)
            desirable = torch.tensor([train_ex[i].desirable for i in indices], device=accelerator.device)
            losses, core, extras = unpaired_losses(out, ref, desirable, kl_policy.logps - ref_kl.to(kl_policy.logps),
                                                   cfg.loss)
        accelerator.backward(losses.sum() * scale)
        return core, extras

    bar = None
    if t.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm
        bar = tqdm(total=t.max_steps, initial=step, desc=f"llm {cfg.loss.type}")
    policy.train()
    while step < t.max_steps:
        pool = MetricPool()
        for micro in range(t.grad_accum):
            start = cursor + (micro * world + rank) * t.batch_size
            indices = [order(k) for k in range(start, start + t.batch_size)]
            sync = micro == t.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(policy):
                pool.add(*micro_step(indices, 1.0 / per_step))
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), t.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        cursor += per_step * world
        step += 1
        metrics = {"step": step, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), **pool.result()}
        if t.eval_every and eval_ex and (step % t.eval_every == 0 or step == t.max_steps):
            metrics.update(evaluate(policy, eval_ex, lambda idx: ref_logps("eval", eval_ex, idx),
                                    replace(cfg, loss=loss_cfg()), pad, accelerator.device, paired))
        if on_step is not None:
            on_step(step, accelerator.unwrap_model(policy).model)
        if step % t.log_every == 0 or "eval_loss" in metrics:
            history.append(metrics)
            accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}")
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            extra = {"bco_shift": bco_shift.state_dict()} if bco_shift is not None else {}
            _save(accelerator, policy, optimizer, scheduler, out_dir, step, cursor, history, t.keep_last, extra)
    if bar is not None:
        bar.close()

    result = {"history": history, "output_dir": str(out_dir), "processes": accelerator.num_processes,
              "engine": engine_name(accelerator),
              "data": {"train": train_report.summary(), "eval": eval_report.summary() if eval_report else None}}
    if eval_ex:
        result["eval"] = evaluate(policy, eval_ex, lambda idx: ref_logps("eval", eval_ex, idx),
                                  replace(cfg, loss=loss_cfg()), pad, accelerator.device, paired)
    weights = model_state(accelerator, policy)  # whole tensors on process 0, whatever the sharding
    if accelerator.is_main_process:
        final = out_dir / "final"
        accelerator.unwrap_model(policy).model.save_pretrained(
            final, state_dict={k.removeprefix("model."): v for k, v in weights.items()})
        tokenizer.save_pretrained(final)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    accelerator.end_training()
    result["model"] = accelerator.unwrap_model(policy).model
    return result


@torch.no_grad()
def evaluate(policy, examples, ref_fn, cfg: LLMDPOConfig, pad: int, device, paired: bool = True) -> dict[str, float]:
    """Held-out metrics (``eval_`` prefix, TRL's names): reward accuracy, margins, loss, NLL, KL, entropy."""
    t = cfg.train
    was_training = policy.training
    policy.eval()
    pool = MetricPool()
    for start in range(0, len(examples), t.eval_batch_size):
        idx = list(range(start, min(start + t.eval_batch_size, len(examples))))
        if paired:
            batch = collate(pair_sequences([examples[i] for i in idx]), pad, t.padding_free).to(device)
            out = policy(batch.input_ids, batch.attention_mask, batch.position_ids, batch.loss_mask, batch.seq_ids,
                         batch.num_seqs)
            ref = ref_fn(idx) if cfg.loss.needs_reference else None
            _, core, extras = pair_losses(out, ref, cfg.loss)
        else:
            seqs = [(examples[i].prompt_ids, examples[i].completion_ids) for i in idx]
            seqs += kl_sequences(examples, examples, idx)
            batch = collate(seqs, pad, t.padding_free).to(device)
            out = policy(batch.input_ids, batch.attention_mask, batch.position_ids, batch.loss_mask, batch.seq_ids,
                         batch.num_seqs)
            ref, ref_kl = ref_fn(idx)
            n = len(idx)
            head = SequenceLogps(out.logps[:n], out.lengths[:n], out.entropy[:n])
            desirable = torch.tensor([examples[i].desirable for i in idx], device=device)
            _, core, extras = unpaired_losses(head, ref, desirable, out.logps[n:] - ref_kl.to(out.logps), cfg.loss)
        pool.add(core, extras)
    policy.train(was_training)
    return pool.result("eval_")


def _save(accelerator, policy, optimizer, scheduler, out_dir: Path, step: int, cursor: int, history, keep_last,
          extra: dict):
    """Checkpoint ``step``: trainable weights and optimizer state gathered whole (every process takes
    part), written by process 0 as files that resume under any number of processes."""
    from safetensors.torch import save_file

    weights = model_state(accelerator, policy, trainable_only=True)
    optim = optimizer_state(accelerator, policy, optimizer)
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")

        save_checkpoint(out_dir / "checkpoints", step, write, {"cursor": cursor, "history": history, **extra},
                        keep_last)
    accelerator.wait_for_everyone()
