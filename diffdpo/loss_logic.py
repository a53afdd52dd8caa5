"""The logic of the loss core: preference structures compiled to losses, and losses decompiled to them.

After Richardson, Srikumar & Sabharwal, "Understanding the Logic of Direct Preference Alignment
through Logic" (ICML 2025, arXiv:2412.17696). A model's verdicts on one preference pair are
propositions (the paper's ``M(x, y_w)``, ``Ref(x, y_l)``, ...):

* ``Mw``, ``Ml``: the policy accepts the winner / the loser, ``P(Mw) = pi_theta(y_w|x)^beta``;
* ``Rw``, ``Rl``: the reference model does, ``P(Rw) = pi_ref(y_w|x)^beta`` (reference-based losses).

``beta`` tempers every probability (``log P = beta log pi``), which is how a loss core's beta
enters: DPO at any beta is one structure. With ``length_normalize`` the log-probs (and log-ratios)
are divided by the completion lengths first (SimPO, ORPO).

A *preference structure* (the paper's §4) is a core formula ``P``, a conditioning constraint
``P_C`` and an additional constraint ``P_A``. Here it reads ``"P given P_C with P_A"`` and means the
pair of formulas

    T = P_C & (P | P_A)        (worlds counted for the preference: the "top")
    B = P_C & (~P | P_A)       (worlds counted against it: the "bottom")

whose semantic loss is ``-log [WMC(T) / (WMC(T) + WMC(B))] = l(log WMC(T) - log WMC(B))``,
``l(z) = -log sigmoid(z)``, with WMC the weighted model count over the independent atoms. Without
``P_A`` it is ``-log P(P | P_C)``; without ``P_C`` too, the plain semantic loss ``-log P(P)``
(Xu et al. 2018). Each truth-table row is in T only, B only, both or neither, which is where the
paper's ``4^(2^n)`` losses over ``n`` atoms come from (§5). The compiler enumerates the (at most
16) rows exactly and computes in log space from the log-probs / log-ratios the loss core reads.

Entailment (:func:`entails`): ``S1 |= S2`` iff ``T1 |= T2`` and ``B2 |= B1``. WMC is monotone in
the set of models, so then ``loss(S1) >= loss(S2)`` on every input: a stronger structure asks
more of the model. This is a sufficient condition for the pointwise order, checked exactly by
enumeration; docs/loss_logic.md draws the registered losses' lattice under it.

Section references are to arXiv:2412.17696v2. How each registered loss relates to its structure,
exactly or through a stated transform, is in :data:`DECOMPILED` and tested in
tests/test_loss_logic.py against the registered functions themselves.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from diffdpo.losses import LOGIC_PREFIX, LOSS_TYPES, LossSpec, _Inputs, _log1mexp

__all__ = ["ATOMS", "DECOMPILED", "NOT_DECOMPILED", "STRUCTURES", "Formula", "Structure", "compiled_spec",
           "decompile", "entails", "explain", "lattice_mermaid", "logit", "parse"]

ATOMS = ("Mw", "Ml", "Rw", "Rl")
_LOG_HALF = math.log(0.5)

# ---------------------------------------------------------------- formulas


_TOKEN = re.compile(r"\s*(<->|->|[()~&|^]|[A-Za-z]+)")
_CONSTANTS = {"true": True, "false": False}


@dataclass(frozen=True)
class Formula:
    """A propositional formula over :data:`ATOMS`: its text and its syntax tree (nested tuples)."""

    text: str
    tree: tuple = field(repr=False, compare=False)

    def holds(self, world: dict[str, bool]) -> bool:
        return _eval(self.tree, world)

    @property
    def atoms(self) -> frozenset[str]:
        return _atoms(self.tree)

    def __str__(self) -> str:
        return self.text


def parse(text: str) -> Formula:
    """Parse ``~`` (not), ``&``, ``^`` (xor), ``|``, ``->``, ``<->`` (loosest last, ``->`` to the right),
    parentheses, ``true``/``false`` and the atoms ``Mw Ml Rw Rl``."""
    tokens = _tokens(text)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        tok = peek()
        if tok is None or (expected and tok != expected):
            raise ValueError(f"formula {text!r}: expected {repr(expected) if expected else 'more'} at the end"
                             if tok is None
                             else f"formula {text!r}: expected {expected!r}, found {tok!r}")
        pos += 1
        return tok

    def binary(op, sub, right=False):
        def rule():
            left = sub()
            while peek() == op:
                take()
                left = (op, left, rule() if right else sub())
                if right:
                    break
            return left
        return rule

    def unary():
        tok = take()
        if tok == "~":
            return ("~", unary())
        if tok == "(":
            inner = iff()
            take(")")
            return inner
        if tok in ATOMS:
            return ("atom", tok)
        if tok in _CONSTANTS:
            return ("const", _CONSTANTS[tok])
        raise ValueError(f"formula {text!r}: unexpected {tok!r}; atoms are {', '.join(ATOMS)}")

    iff = binary("<->", binary("->", binary("|", binary("^", binary("&", unary))), right=True))
    tree = iff()
    if peek() is not None:
        raise ValueError(f"formula {text!r}: unexpected {peek()!r}")
    return Formula(" ".join(text.split()), tree)


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"formula {text!r}: cannot read {text[pos:].strip()[:10]!r}")
        out.append(m.group(1))
        pos = m.end()
    if not out:
        raise ValueError("formula: empty")
    return out


_OPS = {"&": lambda a, b: a and b, "|": lambda a, b: a or b, "^": lambda a, b: a != b,
        "->": lambda a, b: (not a) or b, "<->": lambda a, b: a == b}


def _eval(tree: tuple, world: dict[str, bool]) -> bool:
    kind = tree[0]
    if kind == "atom":
        return world[tree[1]]
    if kind == "const":
        return tree[1]
    if kind == "~":
        return not _eval(tree[1], world)
    return _OPS[kind](_eval(tree[1], world), _eval(tree[2], world))


def _atoms(tree: tuple) -> frozenset[str]:
    if tree[0] == "atom":
        return frozenset([tree[1]])
    return frozenset().union(*(_atoms(t) for t in tree[1:] if isinstance(t, tuple)))


TRUE, FALSE = parse("true"), parse("false")

# ---------------------------------------------------------------- preference structures


def worlds(atoms: tuple[str, ...]) -> list[dict[str, bool]]:
    """Every truth assignment to ``atoms``, in a fixed order (all-true first)."""
    return [dict(zip(atoms, values)) for values in itertools.product((True, False), repeat=len(atoms))]


@dataclass(frozen=True)
class Structure:
    """A preference structure ``(P, P_C, P_A)`` (§4): core formula, conditioning and additional constraint."""

    core: Formula
    given: Formula = TRUE
    also: Formula = FALSE

    @classmethod
    def parse(cls, text: str) -> "Structure":
        """``"P"``, ``"P given P_C"``, ``"P with P_A"`` or ``"P given P_C with P_A"``."""
        m = re.fullmatch(r"(?P<core>.*?)(?:\bgiven\b(?P<given>.*?))?(?:\bwith\b(?P<also>.*))?", text.strip(), re.S)
        parts = {k: (v.strip() if v is not None else None) for k, v in m.groupdict().items()}
        for key in ("given", "also"):
            if parts[key] == "":
                raise ValueError(f"structure {text!r}: nothing after {'given' if key == 'given' else 'with'!r}")
        s = cls(parse(parts["core"]), parse(parts["given"]) if parts["given"] else TRUE,
                parse(parts["also"]) if parts["also"] else FALSE)
        s.check()
        return s

    def __str__(self) -> str:
        out = str(self.core)
        if self.given != TRUE:
            out += f" given {self.given}"
        if self.also != FALSE:
            out += f" with {self.also}"
        return out

    @property
    def atoms(self) -> tuple[str, ...]:
        used = self.core.atoms | self.given.atoms | self.also.atoms
        return tuple(a for a in ATOMS if a in used)

    def top(self, world: dict[str, bool]) -> bool:
        return self.given.holds(world) and (self.core.holds(world) or self.also.holds(world))

    def bottom(self, world: dict[str, bool]) -> bool:
        return self.given.holds(world) and (not self.core.holds(world) or self.also.holds(world))

    def table(self, atoms: tuple[str, ...] | None = None) -> tuple[list[bool], list[bool]]:
        """Which of :func:`worlds` ``(atoms)`` lie in the top T and in the bottom B."""
        ws = worlds(atoms or self.atoms)
        return [self.top(w) for w in ws], [self.bottom(w) for w in ws]

    @property
    def needs_reference(self) -> bool:
        return any(a.startswith("R") for a in self.atoms)

    @functools.cached_property
    def ratio_only(self) -> bool:
        """Whether the loss depends on the log-ratios ``log pi - log pi_ref`` alone (so diffusion can use it).

        Exact test: WMC(T) and WMC(B) are multilinear polynomials in the atoms' probabilities; when
        every monomial of both has the same degree in ``(P(Mw), P(Rw))``, and likewise for the
        loser, the ratio is unchanged by scaling ``pi_theta(y)`` and ``pi_ref(y)`` together.
        """
        if not self.needs_reference:
            return False
        atoms = self.atoms
        degrees = {side: set() for side in "wl"}
        for rows in self.table(atoms):
            for monomial, coefficient in _monomials(rows, atoms).items():
                if coefficient:
                    for side in "wl":
                        degrees[side].add(len(monomial & {"M" + side, "R" + side}))
        return all(len(d) == 1 for d in degrees.values())

    def check(self) -> None:
        """Reject structures whose loss is constant or undefined, naming why."""
        where = f"structure {str(self)!r}"
        if not {"Mw", "Ml"} & set(self.atoms):
            raise ValueError(f"{where}: mentions no policy atom (Mw, Ml), so no loss depends on the model")
        top, bottom = self.table()
        if not any(top):
            raise ValueError(f"{where}: no world satisfies its top (P_C & (P | P_A)); the loss is infinite")
        if not any(bottom):
            raise ValueError(f"{where}: no world satisfies its bottom (P_C & (~P | P_A)); the loss is 0")


def _monomials(rows: list[bool], atoms: tuple[str, ...]) -> dict[frozenset, int]:
    """Coefficients of ``sum over selected rows of prod p_i^x_i (1-p_i)^(1-x_i)`` in the monomial basis."""
    out: dict[frozenset, int] = {}
    for selected, world in zip(rows, worlds(atoms)):
        if not selected:
            continue
        true = frozenset(a for a in atoms if world[a])
        free = [a for a in atoms if not world[a]]
        for k in range(len(free) + 1):
            for extra in itertools.combinations(free, k):
                key = true | frozenset(extra)
                out[key] = out.get(key, 0) + (-1) ** k
    return out


def entails(s1: Structure, s2: Structure) -> bool:
    """``s1 |= s2``: T1 |= T2 and B2 |= B1, over the atoms of both; then ``loss(s1) >= loss(s2)`` everywhere."""
    atoms = tuple(a for a in ATOMS if a in set(s1.atoms) | set(s2.atoms))
    (t1, b1), (t2, b2) = s1.table(atoms), s2.table(atoms)
    return all(t2[i] or not t1[i] for i in range(len(t1))) and all(b1[i] or not b2[i] for i in range(len(b1)))


def equivalent(s1: Structure, s2: Structure) -> bool:
    """Same top and bottom, hence the same loss."""
    return entails(s1, s2) and entails(s2, s1)


def decompile(top: list[str], bottom: list[str]) -> Structure:
    """The structure of a loss ``l(log rho_t / rho_b)`` (the paper's decompilation, §4).

    ``top`` and ``bottom`` write ``rho_t`` and ``rho_b`` as sums of products of atom probabilities,
    one product a conjunction of literals: ``P(Mw) (1 - P(Ml))`` is ``"Mw & ~Ml"``. Each product is
    the WMC of the worlds it covers; a side is a formula only if its products cover disjoint
    worlds. Returns ``P = T, P_C = T | B, P_A = T & B`` with T, B the sides' disjunctions.
    """
    sides = []
    for name, terms in (("top", top), ("bottom", bottom)):
        formulas = [parse(t) for t in terms]
        for f in formulas:
            if not _is_conjunction_of_literals(f.tree):
                raise ValueError(f"decompile: {name} term {f.text!r} is not a product of atom probabilities")
        sides.append(formulas)
    atoms = tuple(a for a in ATOMS if any(a in f.atoms for side in sides for f in side))
    for name, formulas in zip(("top", "bottom"), sides):
        covered = [sum(f.holds(w) for f in formulas) for w in worlds(atoms)]
        if any(c > 1 for c in covered):
            raise ValueError(f"decompile: the {name} terms {[f.text for f in formulas]} overlap, so the {name} "
                             "is not the weighted model count of one formula")
    t, b = (" | ".join(f"({f.text})" for f in side) for side in sides)
    return Structure(parse(t), parse(f"{t} | {b}"), parse(f"({t}) & ({b})"))


def _is_conjunction_of_literals(tree: tuple) -> bool:
    if tree[0] == "&":
        return _is_conjunction_of_literals(tree[1]) and _is_conjunction_of_literals(tree[2])
    return tree[0] == "atom" or (tree[0] == "~" and tree[1][0] == "atom")


# ---------------------------------------------------------------- the compiler


def logit(structure: Structure, logps: dict[str, Tensor]) -> Tensor:
    """``log WMC(T) - log WMC(B)`` from each atom's log-probability ``[B]``; the loss is ``l(logit)``.

    Row weights ``sum_i log p_i or log(1 - p_i)`` are summed per world and pooled with logsumexp,
    so nothing leaves log space; atoms a structure does not mention sum out and are not read.
    """
    atoms = structure.atoms
    top, bottom = structure.table(atoms)
    lp = torch.stack([logps[a] for a in atoms], dim=-1)
    signs = torch.tensor([[w[a] for a in atoms] for w in worlds(atoms)], device=lp.device)
    rows = torch.where(signs, lp[:, None, :], _log1mexp(lp)[:, None, :]).sum(-1)
    top_mask, bottom_mask = (torch.tensor(m, device=lp.device) for m in (top, bottom))
    return torch.logsumexp(rows[:, top_mask], -1) - torch.logsumexp(rows[:, bottom_mask], -1)


def atom_logps(structure: Structure, x: _Inputs, beta: float, length_normalize: bool, loss: str) -> dict[str, Tensor]:
    """Each atom's tempered log-probability from what the loss core was given.

    A :attr:`Structure.ratio_only` structure reads the log-ratios alone and places each side at
    ``log P(M) = min(0, z) + log 1/2``, ``log P(R) = log P(M) - z`` (``z = beta r``): both valid
    probabilities with the right ratio, and by the invariance the loss and its gradient are the
    ones at the true probabilities (tested). Other structures read the policy log-probs, and the
    reference's as ``logps - logratios``.
    """
    def normed(value: Tensor, side: str) -> Tensor:
        if not length_normalize:
            return value
        lengths = x.chosen_lengths if side == "w" else x.rejected_lengths
        if lengths is None:
            raise ValueError(f"{'chosen' if side == 'w' else 'rejected'}_lengths: required by loss type {loss!r} "
                             "with length_normalize")
        return value / lengths

    out = {}
    for side, ratio, logps in (("w", x.chosen, x.chosen_logps), ("l", x.rejected, x.rejected_logps)):
        if structure.ratio_only:
            z = beta * normed(ratio, side)
            out["M" + side] = z.clamp(max=0) + _LOG_HALF
            out["R" + side] = out["M" + side] - z  # the difference is z exactly, kink included (z = 0 at the start)
        else:
            out["M" + side] = beta * normed(logps, side)
            if structure.needs_reference:
                out["R" + side] = beta * normed(logps - ratio, side)
    return out


def semantic_loss(structure: Structure, x: _Inputs, beta: float, length_normalize: bool = False,
                  loss: str = "") -> Tensor:
    """``l(log WMC(T) - log WMC(B))`` per pair."""
    return -F.logsigmoid(logit(structure, atom_logps(structure, x, beta, length_normalize, loss)))


@functools.lru_cache(maxsize=None)
def compiled_spec(name: str) -> LossSpec:
    """The loss type ``logic:<structure>``: parsed and compiled when a config or call names it.

    The name carries the whole formula, so a run in a fresh process (or a saved config) rebuilds
    the same loss with no registry file to keep in step; ``diffdpo losses compile`` prints it.
    """
    if not name.startswith(LOGIC_PREFIX):
        raise ValueError(f"loss_type: {name!r} does not start with {LOGIC_PREFIX!r}")
    try:
        structure = Structure.parse(name[len(LOGIC_PREFIX):])
    except ValueError as e:
        raise ValueError(f"loss_type: {e}") from None

    def fn(x: _Inputs, length_normalize: bool) -> Tensor:
        return semantic_loss(structure, x, x.beta, length_normalize, name)

    needs = () if structure.ratio_only else ("chosen_logps", "rejected_logps")
    doc = (f"Compiled preference structure (arXiv:2412.17696 §4): l(log WMC(T) - log WMC(B)) for "
           f"`{structure}`; T = {_rows_text(structure, True)}, B = {_rows_text(structure, False)}.")
    return LossSpec(name, fn, {"length_normalize": False}, structure.needs_reference, True, needs, doc)


def _rows_text(structure: Structure, top: bool, atoms: tuple[str, ...] | None = None) -> str:
    atoms = atoms or structure.atoms
    rows = structure.table(atoms)[0 if top else 1]
    picked = ["".join(("" if w[a] else "~") + a for a in atoms) for w, on in zip(worlds(atoms), rows) if on]
    return "{" + ", ".join(picked) + "}"


# ---------------------------------------------------------------- the registered losses, decompiled


STRUCTURES: dict[str, tuple[Structure, str]] = {
    name: (Structure.parse(text), why) for name, text, why in [
        ("DPO", "Mw & Rl given (Mw & Rl) | (Ml & Rw) with Mw & Ml & Rw & Rl",
         "the policy prefers y_w at least as the reference prefers y_l: top P(Mw)P(Rl), bottom P(Ml)P(Rw)"),
        ("CPO", "Mw & ~Ml given Mw | Ml with Mw & Ml",
         "top P(Mw), bottom P(Ml): the single-model ratio pi(y_w)/pi(y_l)"),
        ("ORPO", "Mw & ~Ml given Mw ^ Ml",
         "exactly one of the pair is accepted, and it is the winner: the odds ratio"),
        ("CEUnl", "Mw & ~Ml", "accept the winner and reject the loser, unconditioned: cross-entropy + unlikelihood"),
        ("CE", "Mw", "accept the winner: the NLL / SFT term"),
        ("Mw>Rw", "Mw & ~Rw given Mw | Rw with Mw & Rw", "top P(Mw), bottom P(Rw): l(beta r_w)"),
        ("Rw>Mw", "Rw & ~Mw given Mw | Rw with Mw & Rw", "top P(Rw), bottom P(Mw): l(-beta r_w)"),
        ("Rl>Ml", "Rl & ~Ml given Ml | Rl with Ml & Rl", "top P(Rl), bottom P(Ml): l(-beta r_l)"),
    ]
}


@dataclass(frozen=True)
class Term:
    """``weight * link(logit - margin)`` of one structure; ``weight``/``margin`` a number or an option's name,
    ``"-name"`` for its negative (``"beta"`` is the core's beta). ``tempered``: the atoms use the core's
    beta (else beta = 1)."""

    structure: str
    weight: float | str = 1.0
    tempered: bool = True
    length_normalize: bool = False
    margin: float | str = 0.0
    link: str = "semantic"


LINKS = {
    "semantic": lambda z, beta: -F.logsigmoid(z),  # the paper's -log sigmoid of the log-ratio
    "hinge": lambda z, beta: torch.relu(1 - z),
    "ipo": lambda z, beta: ((z - 0.5) / beta) ** 2,
}


@dataclass(frozen=True)
class Decompiled:
    """A registered loss as a weighted sum of :class:`Term`; equal to it at the options ``exact_when``."""

    terms: tuple[Term, ...]
    paper: str
    note: str = ""
    exact_when: dict = field(default_factory=dict)


DECOMPILED: dict[str, Decompiled] = {
    "sigmoid": Decompiled((Term("DPO"),), "DPO (§4; Fig. 1)",
                          "label_smoothing eps adds the swapped pair: (1-eps) l(z) + eps l(-z), z the DPO logit",
                          {"label_smoothing": 0.0}),
    "hinge": Decompiled((Term("DPO", link="hinge"),), "not a -log sigmoid loss; shares DPO's structure",
                        "the same logit z = beta h through max(0, 1 - z) instead of l(z): monotone "
                        "decreasing in z too, so entailment orders hinge losses as it orders semantic ones"),
    "ipo": Decompiled((Term("DPO", length_normalize=True, link="ipo"),),
                      "not a -log sigmoid loss; shares DPO's structure",
                      "regresses the logit to 1/2 ((z - 1/2)/beta)^2 instead of raising it: not monotone, so "
                      "entailment says nothing about it. length_normalize=False uses the summed log-ratios",
                      {"length_normalize": True}),
    "cpo": Decompiled((Term("CPO"), Term("CE", weight="cpo_alpha", tempered=False, length_normalize=True)),
                      "CPO (§3-4: single-model losses)",
                      "the preference term is CPO's structure at pi^beta; the NLL term is the semantic loss "
                      "of Mw at the per-token probability exp(pbar_w)", {"label_smoothing": 0.0}),
    "simpo": Decompiled((Term("CPO", length_normalize=True, margin="simpo_gamma"),),
                        "SimPO (§3-4): CPO's structure on length-normalised probabilities",
                        "the margin gamma is subtracted from the logit; it is not a logical construct",
                        {"label_smoothing": 0.0}),
    "orpo": Decompiled((Term("CE", tempered=False, length_normalize=True),
                        Term("ORPO", weight="beta", tempered=False, length_normalize=True)),
                       "ORPO (§3-4)", "beta is ORPO's lambda, a weight, not a temperature"),
    "asft": Decompiled((Term("CEUnl", tempered=False, length_normalize=True),),
                       "the cross-entropy + unlikelihood loss (l_CEUnl, §4-5)",
                       "-log P(Mw) - log P(~Ml) = -log P(Mw & ~Ml): the atoms are independent"),
    "nca_pair": Decompiled((Term("Mw>Rw"), Term("Rw>Mw", weight=0.5), Term("Rl>Ml", weight=0.5)),
                           "not treated in the paper; a sum of structures in its framework"),
    "bco_pair": Decompiled((Term("Mw>Rw", margin="reward_shift"), Term("Rl>Ml", margin="-reward_shift")),
                           "not treated in the paper; a sum of structures in its framework",
                           "the reward shift delta is a margin: + delta on the loser's term", {"reward_shift": 0.0}),
}

NOT_DECOMPILED: dict[str, str] = {
    "robust": "a negatively weighted mixture of DPO and swapped DPO (l(z) and l(-z)); no single structure",
    "exo_pair": "a reverse KL between two Bernoullis, not a log-probability of a formula",
    "sppo": "squared regression of each log-ratio to a target, no proposition",
    "sppo_hard": "squared regression of each log-ratio to a target, no proposition",
    "apo_zero": "probabilities, not log-probabilities: 1 - P(T | T or B) per side",
    "apo_down": "probabilities, not log-probabilities, with a term that lowers the winner",
    "discopop": "a margin-dependent blend of l(z) and exp(-z): no fixed structure",
    "aot": "sorts log-ratios across the batch: pairs are not independent worlds",
    "aot_unpaired": "sorts log-ratios across the batch: pairs are not independent worlds",
    "kto": "unpaired, with a batch reference point",
    "mapo": "a bounded score of denoising errors, not a log-probability of a formula",
}


def decompiled_loss(name: str, x: _Inputs, options: dict | None = None) -> Tensor:
    """The registered loss ``name`` rebuilt from its :data:`DECOMPILED` terms (the tests' other side)."""
    spec, dec = LOSS_TYPES[name], DECOMPILED[name]
    values = {**spec.options, **(options or {}), "beta": x.beta}
    total = None
    for term in dec.terms:
        structure = STRUCTURES[term.structure][0]
        beta = x.beta if term.tempered else 1.0
        z = logit(structure, atom_logps(structure, x, beta, term.length_normalize, name))
        margin, weight = (_value(v, values) for v in (term.margin, term.weight))
        value = weight * LINKS[term.link](z - margin, x.beta)
        total = value if total is None else total + value
    return total


def _value(v: float | str, values: dict) -> float:
    if not isinstance(v, str):
        return v
    return -values[v[1:]] if v.startswith("-") else values[v]


# ---------------------------------------------------------------- explain, lattice


def explain(name: str) -> str:
    """What ``diffdpo losses explain NAME`` prints: formula and paper, then the structure(s) and how they relate."""
    if name.startswith(LOGIC_PREFIX):
        return _explain_structure(Structure.parse(name[len(LOGIC_PREFIX):]), name)
    if name not in LOSS_TYPES:
        raise ValueError(f"loss type: unknown {name!r}; valid are {sorted(LOSS_TYPES)} or '{LOGIC_PREFIX}<formula>'")
    lines = [f"{name}: {LOSS_TYPES[name].doc}", ""]
    if name in NOT_DECOMPILED:
        return "\n".join(lines + [f"No preference structure: {NOT_DECOMPILED[name]}."])
    dec = DECOMPILED[name]
    lines.append("As a preference structure (Richardson et al., arXiv:2412.17696): " + dec.paper)
    parts = []
    for term in dec.terms:
        w = "" if term.weight == 1.0 else f"{term.weight} * "
        z = "z" if term.margin == 0.0 else f"(z - {term.margin})"
        probs = ("pi" if not term.length_normalize else "exp(pbar)") + ("^beta" if term.tempered else "")
        parts.append(f"{w}{'l' if term.link == 'semantic' else term.link}[{term.structure}]({z}) at P = {probs}")
    lines.append("  loss = " + " + ".join(parts))
    for key in dict.fromkeys(t.structure for t in dec.terms):
        s, why = STRUCTURES[key]
        lines += [f"  {key}: {s}", f"      T = {_rows_text(s, True)}, B = {_rows_text(s, False)}", f"      {why}"]
    if dec.note:
        lines.append("  " + dec.note)
    exact = ", ".join(f"{k}={v}" for k, v in dec.exact_when.items())
    lines.append(f"  equal to the registered loss{' at ' + exact if exact else ''} (tests/test_loss_logic.py)")
    return "\n".join(lines)


def _explain_structure(s: Structure, name: str) -> str:
    spec = compiled_spec(name)
    where = ("log-ratios only: LLM and diffusion recipes" if s.ratio_only else
             "policy and reference log-probs: LLM recipes" if s.needs_reference else
             "policy log-probs, no reference model: LLM recipes")
    lines = [f"{name}", f"  P = {s.core}", f"  P_C = {s.given}", f"  P_A = {s.also}",
             f"  T = {_rows_text(s, True)}", f"  B = {_rows_text(s, False)}",
             f"  loss = l(log WMC(T) - log WMC(B)), atoms {', '.join(s.atoms)}; reads {where}",
             f"  options: {', '.join(f'{k}={v}' for k, v in spec.options.items())}"]
    for key, (other, _) in STRUCTURES.items():
        rel = ("equivalent to" if equivalent(s, other) else "entails" if entails(s, other)
               else "is entailed by" if entails(other, s) else None)
        if rel:
            users = [n for n, d in DECOMPILED.items() if any(t.structure == key for t in d.terms)]
            lines.append(f"  {rel} {key} (in {', '.join(users)})")
    return "\n".join(lines)


def lattice_mermaid() -> str:
    """The entailment order of :data:`STRUCTURES` (Hasse diagram, stronger above), as a mermaid graph."""
    keys = list(STRUCTURES)
    s = {k: STRUCTURES[k][0] for k in keys}
    above = {(a, b) for a in keys for b in keys if a != b and entails(s[a], s[b])}
    edges = [(a, b) for a, b in sorted(above) if not any((a, c) in above and (c, b) in above for c in keys)]
    ids = {k: re.sub(r"\W", "_", k) for k in keys}
    lines = ["graph TD"]
    for k in keys:
        users = [n for n, d in DECOMPILED.items() if any(t.structure == k for t in d.terms)]
        lines.append(f'    {ids[k]}["{k}: {s[k]}<br/>{", ".join(users)}"]')
    lines += [f"    {ids[a]} --> {ids[b]}" for a, b in edges]
    return "\n".join(lines)
