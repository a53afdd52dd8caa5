"""``diffdpo convert``: published checkpoint layouts <-> the toolkit's (docs/model_layout.md).

    diffdpo convert tango SRC OUT [--text-encoder DIR_OR_ID]   Tango / Tango 2 files -> diffusers classes
    diffdpo convert to-tango SRC OUT                           a converted (and trained) model -> Tango's files

Conversion is optional: every recipe and command also reads a Tango checkpoint folder as it is.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    tango = sub.add_parser("tango", help="a Tango / Tango 2 checkpoint folder (as published on the hub) -> "
                                         "docs/model_layout.md", description=__doc__.split("\n")[0])
    tango.add_argument("src", help="folder with main_config.json, pytorch_model_{main,vae,stft}.bin and their configs")
    tango.add_argument("out", help="output folder (written atomically)")
    tango.add_argument("--text-encoder", default=None, metavar="DIR_OR_ID",
                       help="where FLAN-T5's tokenizer and config come from (default: main_config.json's "
                            "text_encoder_name, google/flan-t5-large, from the Hugging Face cache)")
    back = sub.add_parser("to-tango", help="a model converted from Tango (e.g. a Diffusion-DPO run's final/) -> "
                                           "Tango's own six files, loadable by Tango's code")
    back.add_argument("src", help="folder in docs/model_layout.md's layout, converted from Tango")
    back.add_argument("out", help="output folder (written atomically)")


def run(args: argparse.Namespace) -> int:
    from diffdpo.diffusion.tango import checkpoint

    if args.target == "tango":
        out = checkpoint.convert_tango(args.src, args.out, text_encoder=args.text_encoder)
    else:
        out = checkpoint.export_tango(args.src, args.out)
    print(f"wrote {out}")
    return 0
