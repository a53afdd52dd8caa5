"""The LLM training loop: exact gradient accumulation, exact resume, eval metrics, KTO, LoRA."""

import shutil

import pytest
import torch

import llm_helpers as H
from llm_helpers import one_thread  # noqa: F401  (autouse)
from diffdpo.config import load_config
from diffdpo.llm.trainer import LLMDPOConfig, train


@pytest.fixture(scope="module")
def tok():
    return H.tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("llmdata")
    return H.write_jsonl(H.pair_rows(24), d / "train.jsonl"), H.write_jsonl(H.pair_rows(8, seed=7), d / "eval.jsonl")


def _cfg(data, out, *overrides):
    train_path, eval_path = data
    return load_config(LLMDPOConfig, None, [
        f"data.train_path={train_path}", f"data.eval_path={eval_path}", f"train.output_dir={out}",
        "train.lr=1e-3", "train.report_to=none", "train.progress=false", "train.max_steps=2", *overrides])


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding_free", [True, False])
def test_grad_accum_4x2_equals_batch_8(tok, data, tmp_path, padding_free):
    """Same examples, same gradient: the grad norm matches and, with clipping active (which sees the
    scale), so do the weights after two steps."""
    runs = []
    for bs, acc in ((8, 1), (2, 4)):
        res = train(_cfg(data, tmp_path / f"{bs}x{acc}", f"train.batch_size={bs}", f"train.grad_accum={acc}",
                         "train.max_grad_norm=0.01", f"train.padding_free={padding_free}"), H.model(tok), tok)
        runs.append(res)
    for step, (a, b) in enumerate(zip(runs[0]["history"], runs[1]["history"])):
        assert a["grad_norm"] > 0.01  # clipping was active
        keys = ["loss", "grad_norm", "rewards/margins", "nll", "kl", "entropy"]
        if step > 0:  # at step 1 policy == reference: margins are rounding noise around 0 and whether
            keys.append("rewards/accuracies")  # one is exactly 0 (a tie, 0.5) depends on the padding
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    pa, pb = _params(runs[0]["model"]), _params(runs[1]["model"])
    for n in pa:  # 1e-5: float reordering on another CPU (AVX-512) moved one embedding row by 1.4e-6;
        # a real accumulation error moves weights by the order of lr (1e-3)
        torch.testing.assert_close(pa[n], pb[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("loss", ["sigmoid", "bco_pair"])  # bco_pair: the running reward shift is resumed too
def test_resume_is_exact(tok, data, tmp_path, loss):
    full = train(_cfg(data, tmp_path / "a", "train.max_steps=4", "train.save_every=2", "train.batch_size=3",
                      f"loss.type={loss}"), H.model(tok), tok)
    assert (tmp_path / "a" / "checkpoints" / "step_2" / "trainer_state.json").is_file()
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    torch.manual_seed(123)  # the checkpoint's RNG state must win
    resumed = train(_cfg(data, tmp_path / "b", "train.max_steps=4", "train.save_every=2", "train.batch_size=3",
                         f"loss.type={loss}"), H.model(tok), tok)
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(full["history"][2:], resumed["history"][2:]):
        assert a == b
    pa, pb = _params(full["model"]), _params(resumed["model"])
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert (tmp_path / "b" / "final" / "model.safetensors").is_file()
    if loss == "bco_pair":
        import json
        state = json.loads((tmp_path / "a" / "checkpoints" / "step_2" / "trainer_state.json").read_text())
        assert state["bco_shift"]["count"] == 2


def test_training_moves_rewards_and_evaluates(tok, data, tmp_path):
    res = train(_cfg(data, tmp_path, "train.max_steps=6", "train.batch_size=8", "train.eval_every=3",
                     "loss.beta=0.5"), H.model(tok), tok)
    first, last = res["history"][0], res["history"][-1]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3) and first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert last["rewards/margins"] > 0 and last["loss"] < first["loss"]
    assert "eval_rewards/accuracies" in res["history"][2] and "eval_rewards/accuracies" in last
    assert set(res["eval"]) >= {"eval_loss", "eval_rewards/margins", "eval_nll", "eval_kl", "eval_entropy"}


@pytest.mark.parametrize("overrides", [
    ["loss.type=sigmoid", "loss.sft_weight=0.005", "loss.sft_reduction=sum"],   # RPO
    ["loss.type=ipo"], ["loss.type=simpo", "loss.beta=2.0"], ["loss.type=orpo"],
    ["loss.type=robust", "loss.options.label_smoothing=0.2"],
    ["loss.type=sigmoid", "model.lora_r=4", "train.precompute_ref=false"],
    ["loss.type=sigmoid", "train.precompute_ref=false"],
])
def test_loss_types_run_and_change_parameters(tok, data, tmp_path, overrides):
    model = H.model(tok)
    before = _params(model)
    res = train(_cfg(data, tmp_path, "train.batch_size=4", *overrides), model, tok)
    after = _params(res["model"].merge_and_unload() if hasattr(res["model"], "merge_and_unload") else res["model"])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res["history"])
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_lora_reference_is_the_disabled_adapter(tok, data, tmp_path):
    """With peft, reference log-probs come from the LoRA-disabled policy: precomputed and online agree."""
    runs = [train(_cfg(data, tmp_path / str(pre), "model.lora_r=4", f"train.precompute_ref={pre}",
                       "train.batch_size=4"), H.model(tok), tok) for pre in (True, False)]
    for a, b in zip(runs[0]["history"], runs[1]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-4)


def test_kto_on_unpaired_data(tok, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in H.pair_rows(12) for side in ("chosen", "rejected")]
    path = H.write_jsonl(rows, tmp_path / "kto.jsonl")
    cfg = _cfg((path, path), tmp_path / "out", "loss.type=kto", "train.batch_size=6", "train.max_steps=3",
               "train.eval_every=3")
    res = train(cfg, H.model(tok), tok)
    assert "rewards/chosen" in res["history"][0] and "eval_loss" in res["eval"]


def test_two_processes_equal_one_process_with_the_global_batch(tok, data, tmp_path):
    """2 CPU processes (gloo, torchrun) x batch 4 == 1 process x batch 8: same examples per
    step, DDP's gradient average over per-process sums / 4 is the global sum / 8."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    model = H.model(tok)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    common = [f"model.name_or_path={tmp_path / 'model'}", f"data.train_path={data[0]}", "train.max_steps=2",
              "train.lr=1e-3", "train.report_to=none", "train.progress=false", "train.max_grad_norm=0.01"]
    root = Path(__file__).resolve().parents[1]
    # torchrun + ACCELERATE_USE_CPU is how accelerate runs multi-CPU (gloo) on one machine
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", str(root / "recipes" / "llm_dpo.py"), *common, f"train.output_dir={tmp_path / 'two'}",
                          "train.batch_size=4"], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2
    one = train(load_config(LLMDPOConfig, None, [*common, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=8"]))
    a, b = load_file(tmp_path / "two" / "final" / "model.safetensors"), load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert one["history"][-1]["grad_norm"] > 0.01  # clipping active: the scale matters
    diffs = {name: (a[name] - b[name]).abs().max().item() for name in a}
    assert max(diffs.values()) < 2e-5, diffs  # float reduction order differs; one Adam step is 1e-3
