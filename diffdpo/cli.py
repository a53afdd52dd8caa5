"""The ``diffdpo`` command. Each subcommand lives in its own module, imported only when used,
so ``diffdpo --help`` stays fast; a module exposes ``add_arguments(parser)`` and ``run(args)``.

A user mistake inside a subcommand (a missing config or input file, an unknown config key, a bad
value; see :mod:`diffdpo.errors`) prints ``diffdpo <command>: error: ...`` and exits 2, as argparse
does for a bad flag; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Add a subcommand by adding a line here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "losses": ("diffdpo.commands.losses", "list the preference-loss types of the shared core"),
    "soundworld": ("diffdpo.worlds.soundworld.command", "SoundWorld: make data, sample the base model, run the oracle"),
    "eval": ("diffdpo.commands.eval", "evaluate generated media: CLAP score, FAD (and FAD-inf), CLIP score"),
    "prefs": ("diffdpo.commands.prefs", "build a Tango 2-style preference set (build) or verify one (check)"),
    "train": ("diffdpo.diffusion.trainer", "Diffusion-DPO fine-tuning from a YAML config (= recipes/diffusion_dpo.py)"),
    "demo": ("diffdpo.worlds.soundworld.demo", "the main job: SoundWorld preference build -> Diffusion-DPO -> "
             "oracle evaluation -> report"),
    "convert": ("diffdpo.commands.convert", "convert published checkpoint layouts (Tango / Tango 2) to the "
                "toolkit's and back"),
    "smoke": ("diffdpo.commands.smoke", "end-to-end smoke run of the loss core on a synthetic preference task"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` imports its module and adds its arguments."""
    parser = argparse.ArgumentParser(
        prog="diffdpo", description="Preference alignment of diffusion and language models: Diffusion-DPO, a Tango "
                                    "2-style preference builder, DPO/RPO and friends, evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name in argv:
            importlib.import_module(module).add_arguments(p)
    return parser


def _name_subparsers(parser: argparse.ArgumentParser) -> None:
    """Each (nested) subparser stores its prog, e.g. ``diffdpo eval clap``, as ``args._prog``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_prog=sub.prog)
                _name_subparsers(sub)


def main(argv: list[str] | None = None) -> int:
    from diffdpo.errors import report_user_errors

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    _name_subparsers(parser)
    args = parser.parse_args(argv)
    return int(report_user_errors(args._prog, lambda: importlib.import_module(args._module).run(args)) or 0)


if __name__ == "__main__":
    sys.exit(main())
