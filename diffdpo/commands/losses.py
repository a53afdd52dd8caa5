"""``diffdpo losses``: the loss types of the shared core, with what each needs; ``explain``, ``compile``
and ``lattice`` show them as preference structures (diffdpo/loss_logic.py, arXiv:2412.17696)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="print each loss's docstring")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("explain", help="a loss's formula, paper and preference structure",
                       description="A registered loss's formula and paper, its preference structure(s) and how "
                                   "they relate to it; or, for logic:<structure>, that structure's truth table.")
    p.add_argument("name", help="a loss type, or logic:<structure>")
    p = sub.add_parser("compile", help="compile a preference structure to a loss type usable by every recipe",
                       description="Check a structure 'P [given P_C] [with P_A]' over the atoms Mw Ml (policy "
                                   "accepts winner / loser) and Rw Rl (reference), and print the loss type "
                                   "logic:<structure> that any recipe's loss.type accepts.")
    p.add_argument("structure", help='e.g. "Mw & ~Ml given Mw ^ Ml" (ORPO\'s odds ratio)')
    sub.add_parser("lattice", help="the entailment lattice of the registered losses' structures (mermaid)")


def run(args: argparse.Namespace) -> int:
    from diffdpo.errors import UserError
    from diffdpo.losses import LOGIC_PREFIX, LOSS_TYPES

    if args.action is None:
        for name, spec in sorted(LOSS_TYPES.items()):
            kind = "reference" if spec.needs_reference else "reference-free"
            kind += "" if spec.paired else ", unpaired"
            opts = ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "-"
            print(f"{name:14s} {kind:28s} {spec.title}; options: {opts}")
            if args.verbose:
                print("    " + spec.doc.replace("\n", "\n    ") + "\n")
        return 0

    from diffdpo import loss_logic

    if args.action == "lattice":
        print(loss_logic.lattice_mermaid())
        return 0
    name = args.name if args.action == "explain" else LOGIC_PREFIX + " ".join(args.structure.split())
    try:
        text = loss_logic.explain(name)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(text)
    if args.action == "compile":
        print(f"\nUse it by name in any recipe: loss.type='{name}' (YAML: type: \"{name}\").")
    return 0
