"""Preference structures (diffdpo/loss_logic.py) against independent references: hand truth tables,
a plain-Python weighted model count, and the registered loss functions themselves (values and
gradients); entailment against the pointwise order of the losses; the CLI and the recipes."""

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm_helpers as H
from llm_helpers import one_thread  # noqa: F401  (autouse)
from diffdpo import cli
from diffdpo.loss_logic import (DECOMPILED, NOT_DECOMPILED, STRUCTURES, Structure, atom_logps, decompile,
                                decompiled_loss, entails, equivalent, lattice_mermaid, logit, parse, worlds)
from diffdpo.losses import LOSS_TYPES, _Inputs, preference_loss

ROOT = Path(__file__).resolve().parents[1]
S = {k: s for k, (s, _) in STRUCTURES.items()}
DPO = "logic:" + str(S["DPO"])


def batch(n=7, seed=0, grad=True):
    """Random pairs: policy and reference log-probs (<= 0), lengths, and the log-ratios between them."""
    g = torch.Generator().manual_seed(seed)
    lp = lambda: -(torch.rand(n, generator=g, dtype=torch.float64) * 8 + 0.05)  # noqa: E731
    t = dict(pw=lp(), pl=lp(), qw=lp(), ql=lp(),
             nw=torch.randint(1, 9, (n,), generator=g).double(), nl=torch.randint(1, 9, (n,), generator=g).double())
    for k in ("pw", "pl", "qw", "ql"):
        t[k].requires_grad_(grad)
    return t


def core_kwargs(t, reference=True):
    kw = dict(chosen_logps=t["pw"], rejected_logps=t["pl"], chosen_lengths=t["nw"], rejected_lengths=t["nl"])
    if reference:
        kw.update(chosen_logratios=t["pw"] - t["qw"], rejected_logratios=t["pl"] - t["ql"])
    return kw


def inputs(t, beta, reference=True):
    cw, cl = (t["pw"] - t["qw"], t["pl"] - t["ql"]) if reference else (t["pw"], t["pl"])
    return _Inputs(cw, cl, beta, t["pw"], t["pl"], t["nw"], t["nl"], None, None, None)


def grads(value, t):
    keys = [k for k in ("pw", "pl", "qw", "ql") if t[k].requires_grad]
    return torch.autograd.grad(value.sum(), [t[k] for k in keys], allow_unused=True, retain_graph=True)


def assert_same(a, b, t):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for ga, gb in zip(grads(a, t), grads(b, t)):
        if ga is None or gb is None:
            assert (ga is None or not ga.any()) and (gb is None or not gb.any())
        else:
            torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


def wmc(rows_selected, atoms, probs):
    """Plain-Python weighted model count of the selected worlds."""
    total = 0.0
    for on, world in zip(rows_selected, worlds(atoms)):
        if on:
            total += math.prod(probs[a] if world[a] else 1 - probs[a] for a in atoms)
    return total


# ------------------------------------------------------------ formulas and structures by hand


@pytest.mark.parametrize("text, truth", [
    ("Mw | Ml & ~Rw", lambda w: w["Mw"] or (w["Ml"] and not w["Rw"])),
    ("Mw -> Ml -> Rw", lambda w: (not w["Mw"]) or ((not w["Ml"]) or w["Rw"])),
    ("Mw ^ Ml <-> Rw", lambda w: (w["Mw"] != w["Ml"]) == w["Rw"]),
    ("~(Mw & true) | false", lambda w: not w["Mw"]),
    ("Mw & Ml ^ Rw | Rl", lambda w: ((w["Mw"] and w["Ml"]) != w["Rw"]) or w["Rl"]),
])
def test_parser_precedence(text, truth):
    f = parse(text)
    for world in worlds(("Mw", "Ml", "Rw", "Rl")):
        assert f.holds(world) == truth(world), (text, world)


@pytest.mark.parametrize("text, message", [
    ("Mw &", "expected more"), ("Mx", "unexpected 'Mx'"), ("(Mw", "expected ')'"), ("Mw Ml", "unexpected 'Ml'"),
    ("Mw $ Ml", "cannot read"), ("Rw & ~Rl", "no policy atom"), ("Mw & ~Mw", "top"), ("Mw | ~Mw", "bottom"),
    ("Mw given", "nothing after 'given'"),
])
def test_bad_structures_are_named(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Structure.parse(text)


def test_structures_select_the_rows_the_paper_counts():
    """Top/bottom of each structure, written out by hand over (Mw, Ml)."""
    def rows(s):
        top, bottom = s.table(("Mw", "Ml"))
        names = ["11", "10", "01", "00"]  # worlds() order: all-true first
        return {n for n, on in zip(names, top) if on}, {n for n, on in zip(names, bottom) if on}

    assert rows(S["CPO"]) == ({"11", "10"}, {"11", "01"})   # P(Mw) / P(Ml)
    assert rows(S["ORPO"]) == ({"10"}, {"01"})              # odds ratio
    assert rows(S["CEUnl"]) == ({"10"}, {"11", "01", "00"})  # P(Mw & ~Ml) against the rest
    assert rows(S["CE"]) == ({"11", "10"}, {"01", "00"})


def test_four_states_per_world_give_the_papers_count():
    """Over n = 1 atom, all (P, P_C, P_A) give exactly 4^(2^n) = 16 distinct (top, bottom) pairs (§5)."""
    fs = ["false", "true", "Mw", "~Mw"]
    pairs = {tuple(map(tuple, Structure(parse(p), parse(c), parse(a)).table(("Mw",))))
             for p, c, a in itertools.product(fs, repeat=3)}
    assert len(pairs) == 4 ** (2 ** 1)


# ------------------------------------------------------------ the compiler against a plain WMC


@pytest.mark.parametrize("text", [str(s) for s in S.values()] + [
    "Mw & Rl given Mw ^ Ml", "Mw -> Ml given Rw | Rl with Mw & Rw", "(Mw <-> Rw) & ~Ml given true with Rl"])
def test_logit_is_the_log_ratio_of_weighted_model_counts(text):
    s = Structure.parse(text)
    g = torch.Generator().manual_seed(1)
    logps = {a: -torch.rand(5, generator=g, dtype=torch.float64) * 4 for a in ("Mw", "Ml", "Rw", "Rl")}
    z = logit(s, logps)
    top, bottom = s.table()
    for i in range(5):
        probs = {a: math.exp(v[i].item()) for a, v in logps.items()}
        expect = math.log(wmc(top, s.atoms, probs)) - math.log(wmc(bottom, s.atoms, probs))
        assert z[i].item() == pytest.approx(expect, rel=1e-10, abs=1e-12)


def test_compiled_loss_is_stable_in_log_space():
    """Log-probs of -500 (probabilities far below float range) still give finite losses and gradients."""
    pw = torch.tensor([-500.0, -1e-3], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([-1e-3, -500.0], dtype=torch.float64)
    out = preference_loss("logic:" + str(S["ORPO"]), beta=1.0, chosen_logps=pw, rejected_logps=pl).losses
    (g,) = torch.autograd.grad(out.sum(), [pw])
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    # l(log B - log T) with log T = -500 + log(1 - e^-0.001), log B = log(1 - e^-500) - 0.001; e^-500 ~ 0
    assert out[0].item() == pytest.approx(500 - 1e-3 - math.log(-math.expm1(-1e-3)), rel=1e-12)


# ------------------------------------------------------------ decompiled forms equal the registered losses


def test_every_registered_loss_is_decompiled_or_says_why_not():
    assert set(DECOMPILED) | set(NOT_DECOMPILED) == set(LOSS_TYPES)
    assert not set(DECOMPILED) & set(NOT_DECOMPILED)


CASES = [(name, {}) for name in DECOMPILED] + [
    ("cpo", dict(cpo_alpha=0.3)), ("simpo", dict(simpo_gamma=1.7)), ("bco_pair", dict(reward_shift=0.4)),
    ("ipo", dict(length_normalize=False))]


@pytest.mark.parametrize("name, options", CASES)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_decompiled_form_equals_the_registered_loss(name, options, beta):
    spec = LOSS_TYPES[name]
    options = {**DECOMPILED[name].exact_when, **options}
    if name == "ipo" and not options["length_normalize"]:
        # the summed log-ratios: the same structure without length normalisation
        t = batch(seed=3)
        x = inputs(t, beta)
        z = logit(S["DPO"], atom_logps(S["DPO"], x, beta, False, name))
        registered = preference_loss(name, beta=beta, **core_kwargs(t), **options).losses
        assert_same(registered, ((z - 0.5) / beta) ** 2, t)
        return
    t = batch(seed=2)
    registered = preference_loss(name, beta=beta, **core_kwargs(t, spec.needs_reference), **options).losses
    assert_same(registered, decompiled_loss(name, inputs(t, beta, spec.needs_reference), options), t)


def test_label_smoothing_mixes_in_the_swapped_structure():
    """cDPO: (1 - eps) l(P) + eps l(~P), the same structure with top and bottom exchanged, compiled by name."""
    t, eps = batch(seed=4), 0.2
    core = S["DPO"]
    swapped = f"logic:~({core.core}) given {core.given} with {core.also}"
    kw = dict(beta=0.5, **core_kwargs(t))
    mixed = (1 - eps) * preference_loss(DPO, **kw).losses + eps * preference_loss(swapped, **kw).losses
    assert_same(preference_loss("sigmoid", label_smoothing=eps, **kw).losses, mixed, t)


def test_decompile_recovers_the_structures_from_the_loss_ratios():
    """The paper's decompilation from rho_t / rho_b (products of probabilities), not from our handwritten forms."""
    assert equivalent(decompile(["Mw & Rl"], ["Ml & Rw"]), S["DPO"])  # pi_w pi_ref_l / (pi_l pi_ref_w)
    assert equivalent(decompile(["Mw"], ["Ml"]), S["CPO"])
    assert equivalent(decompile(["Mw & ~Ml"], ["~Mw & Ml"]), S["ORPO"])  # odds_w / odds_l
    assert equivalent(decompile(["Mw & ~Ml"], ["~Mw", "Mw & Ml"]), S["CEUnl"])  # p(1-q) / (1 - p(1-q))
    with pytest.raises(ValueError, match="overlap"):
        decompile(["Mw", "Ml"], ["~Mw"])
    with pytest.raises(ValueError, match="not a product"):
        decompile(["Mw | Ml"], ["~Mw"])


# ------------------------------------------------------------ log-ratios alone


@pytest.mark.parametrize("key", ["DPO", "Mw>Rw", "Rl>Ml"])
def test_ratio_only_structures_equal_their_value_at_the_true_probabilities(key):
    """Compiled from log-ratios alone (as diffusion gives them) = the WMC at the true policy/reference probabilities."""
    s, t, beta = S[key], batch(seed=5), 0.7
    assert s.ratio_only
    truth = {"Mw": beta * t["pw"], "Ml": beta * t["pl"], "Rw": beta * t["qw"], "Rl": beta * t["ql"]}
    from_ratios = preference_loss("logic:" + str(s), beta=beta, chosen_logratios=t["pw"] - t["qw"],
                                  rejected_logratios=t["pl"] - t["ql"]).losses
    assert_same(from_ratios, -torch.nn.functional.logsigmoid(logit(s, truth)), t)


def test_ratio_only_gradient_at_zero_log_ratio_is_dpos():
    """Every run starts at the reference (log-ratios exactly 0), where the canonical placement has a kink."""
    rw, rl = torch.zeros(3, requires_grad=True), torch.tensor([0.0, 1.0, -1.0], requires_grad=True)
    dpo, logic = (preference_loss(n, rw, rl, beta=0.5).losses.sum() for n in ("sigmoid", DPO))
    for a, b in zip(torch.autograd.grad(dpo, [rw, rl]), torch.autograd.grad(logic, [rw, rl])):
        torch.testing.assert_close(a, b)


def test_other_reference_structures_read_the_log_probs():
    s = "logic:Mw & Rl given Mw ^ Ml"
    assert not Structure.parse(s[6:]).ratio_only and Structure.parse(s[6:]).needs_reference
    t = batch(seed=6, grad=False)
    with pytest.raises(ValueError, match="chosen_logps: required by loss type"):
        preference_loss(s, chosen_logratios=t["pw"] - t["qw"], rejected_logratios=t["pl"] - t["ql"])
    shifted = {**t, "pw": t["pw"] - 1, "qw": t["qw"] - 1}  # same log-ratios, other probabilities
    a, b = (preference_loss(s, beta=1.0, **core_kwargs(u)).losses for u in (t, shifted))
    assert not torch.allclose(a, b)


# ------------------------------------------------------------ entailment


def test_entailment_by_hand():
    assert entails(S["CEUnl"], S["ORPO"]) and entails(S["CEUnl"], S["CPO"]) and entails(S["CEUnl"], S["CE"])
    assert not entails(S["ORPO"], S["CPO"]) and not entails(S["CPO"], S["ORPO"])
    assert not entails(S["ORPO"], S["CEUnl"])
    assert entails(S["DPO"], S["DPO"]) and not entails(S["DPO"], S["CPO"])


def test_entailment_orders_the_losses_on_every_input():
    """S1 |= S2 => loss(S1) >= loss(S2) on random probabilities; and where neither entails the other here,
    the order flips: ORPO vs CPO (p_w < p_l vs p_w > p_l)."""
    g = torch.Generator().manual_seed(7)
    logps = {a: -torch.rand(200, generator=g, dtype=torch.float64) * 6 for a in ("Mw", "Ml", "Rw", "Rl")}
    loss = {k: -torch.nn.functional.logsigmoid(logit(s, logps)) for k, s in S.items()}
    for a, b in itertools.permutations(S, 2):
        if entails(S[a], S[b]):
            assert (loss[a] >= loss[b] - 1e-12).all(), (a, b)
    diff = loss["ORPO"] - loss["CPO"]  # odds ratio = CPO's ratio * (1 - p_l) / (1 - p_w)
    assert torch.equal(diff > 0, logps["Mw"] < logps["Ml"]) and (diff > 0).any() and (diff < 0).any()


def test_docs_lattice_is_the_generated_one():
    doc = (ROOT / "docs" / "loss_logic.md").read_text()
    block = doc.split("<!-- lattice -->", 1)[1].split("<!-- /lattice -->", 1)[0]
    assert block.strip() == f"```mermaid\n{lattice_mermaid()}\n```"


# ------------------------------------------------------------ CLI


def run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_explain_prints_formula_paper_and_structure(capsys):
    code, out, _ = run_cli(["losses", "explain", "orpo"], capsys)
    assert code == 0
    assert "arXiv:2403.07691" in out and "arXiv:2412.17696" in out
    assert "ORPO: Mw & ~Ml given Mw ^ Ml" in out and "T = {Mw~Ml}, B = {~MwMl}" in out
    code, out, _ = run_cli(["losses", "explain", "kto"], capsys)
    assert code == 0 and "No preference structure: unpaired" in out


def test_compile_names_a_loss_type_and_places_it(capsys):
    code, out, _ = run_cli(["losses", "compile", "Mw  &  ~Ml given Mw ^ Ml"], capsys)
    assert code == 0
    assert "loss.type='logic:Mw & ~Ml given Mw ^ Ml'" in out
    assert "equivalent to ORPO (in orpo)" in out and "is entailed by CEUnl (in asft)" in out
    code, out, _ = run_cli(["losses", "compile", str(S["DPO"])], capsys)
    assert "reads log-ratios only: LLM and diffusion recipes" in out


def test_compile_reports_a_bad_formula_in_one_line(capsys):
    code, _, err = run_cli(["losses", "compile", "Mw & Mx"], capsys)
    assert code == 2 and "diffdpo losses compile: error: " in err and "unexpected 'Mx'" in err
    assert "Traceback" not in err


def test_lattice_command_prints_the_docs_diagram(capsys):
    code, out, _ = run_cli(["losses", "lattice"], capsys)
    assert code == 0 and out.strip() == lattice_mermaid()


# ------------------------------------------------------------ recipes use it by name


def test_llm_and_diffusion_configs_accept_logic_names():
    from diffdpo.diffusion.trainer import LossConfig as DiffusionLoss
    from diffdpo.llm.objective import LossConfig

    cfg = LossConfig(type=DPO)
    assert cfg.needs_reference and cfg.paired
    assert not LossConfig(type="logic:Mw & ~Ml given Mw ^ Ml").needs_reference
    with pytest.raises(ValueError, match=r"loss.type: loss_type: formula .* unexpected 'Mx'"):
        LossConfig(type="logic:Mx")
    assert DiffusionLoss(type=DPO).type == DPO


def test_diffusion_loss_by_logic_name_equals_dpo():
    from test_diffusion_api import pair_batch, perturbed, scheduler_of, tiny_unet

    from diffdpo.diffusion.api import diffusion_dpo_loss

    scheduler, reference = scheduler_of("epsilon"), tiny_unet()
    policy = perturbed(tiny_unet())
    w, l, hidden, noise, steps = pair_batch()
    args = (policy, reference, scheduler, w, l, hidden, noise, steps)
    plain = diffusion_dpo_loss(*args, beta=5000, beta_convention="salesforce")
    logic = diffusion_dpo_loss(*args, beta=5000, beta_convention="salesforce", loss_type=DPO)
    torch.testing.assert_close(logic.loss, plain.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="is not a paired loss with a reference"):
        diffusion_dpo_loss(*args, beta=5000, beta_convention="salesforce", loss_type="logic:Mw & Rl given Mw ^ Ml")


def test_llm_recipe_trains_a_compiled_loss_in_a_new_process(tmp_path):
    """The name alone carries the loss: a fresh recipe process rebuilds it from loss.type."""
    tok = H.tokenizer()
    model = H.model(tok)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = H.write_jsonl(H.pair_rows(16), tmp_path / "train.jsonl")
    name = "logic:Mw & Rl given Mw ^ Ml"  # reads policy and reference log-probs
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "llm_dpo.py"),
                          "--config", str(ROOT / "recipes" / "configs" / "llm_tiny.yaml"),
                          f"model.name_or_path={tmp_path / 'model'}",
                          f"data.train_path={data}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                          "train.progress=false", f"loss.type={name}"], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert name in (tmp_path / "run" / "config.yaml").read_text()
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
