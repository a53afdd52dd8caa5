"""``diffdpo prefs build|check|import|export``: build a Tango 2-style preference set, verify one,
or convert between preference sets and Audio-Alpaca / Pick-a-Pic / TRL-style text pairs."""

from __future__ import annotations

import argparse
import json

FORMATS = ("audio_alpaca", "pickapic", "trl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prefs_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="generate, score and select pairs into a preference-set directory")
    build.add_argument("--config", help="YAML config (see recipes/configs/prefs_tango2.yaml)")
    build.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. out=runs/prefs limit=100")
    build.add_argument("--no-progress", action="store_true")
    check = sub.add_parser("check", help="verify a preference set: schema, files, sample rates, manifest")
    check.add_argument("directory")
    imp = sub.add_parser("import", help="another format -> a preference set (trl: -> explicit-prompt JSONL)")
    imp.add_argument("format", choices=FORMATS)
    imp.add_argument("source", help="Parquet file/dir, JSON/JSONL file")
    imp.add_argument("out", help="preference-set directory (trl: a .jsonl or .parquet file)")
    imp.add_argument("--ties", choices=("drop", "keep", "error"), default="drop", help="pickapic: label_0 = 0.5 rows")
    imp.add_argument("--split", default=None, help="audio_alpaca / pickapic: the split of a hub snapshot folder that "
                                                     "holds several (default: train)")
    exp = sub.add_parser("export", help="a preference set -> Audio-Alpaca or Pick-a-Pic Parquet")
    exp.add_argument("format", choices=FORMATS[:2])
    exp.add_argument("directory")
    exp.add_argument("out", help="Parquet file")


def run(args: argparse.Namespace) -> int:
    if args.prefs_command == "build":
        from diffdpo.config import load_config
        from diffdpo.prefs.build import BuildConfig, build_preferences

        config = load_config(BuildConfig, args.config, args.overrides)
        manifest = build_preferences(config, progress=not args.no_progress)
        if manifest:
            print(json.dumps({k: manifest[k] for k in ("pairs", "pairs_per_strategy", "no_pair_per_strategy",
                                                        "samples_generated")}, indent=1))
            print(f"{len(manifest['failures'])} failed samples/captions (see {config.out}/manifest.json)")
        return 0
    if args.prefs_command == "import":
        return _import(args)
    if args.prefs_command == "export":
        from diffdpo.data.audio_alpaca import export_audio_alpaca
        from diffdpo.data.pickapic import export_pickapic

        n = (export_audio_alpaca if args.format == "audio_alpaca" else export_pickapic)(args.directory, args.out)
        print(f"wrote {n} rows to {args.out}")
        return 0
    from diffdpo.prefs.check import check_preference_set

    report = check_preference_set(args.directory)
    print(report.table())
    for problem in report.problems[:50]:
        print("  -", problem)
    if len(report.problems) > 50:
        print(f"  ... and {len(report.problems) - 50} more")
    return 0 if report.ok else 1


def _import(args: argparse.Namespace) -> int:
    """A source that is not in the layout it is named as is the user's mistake: one line, exit 2."""
    from diffdpo.errors import UserError

    try:
        return _import_source(args)
    except ValueError as err:
        raise UserError(str(err)) from err


def _import_source(args: argparse.Namespace) -> int:
    if args.format == "trl":
        from diffdpo.data.text_pairs import convert_text_pairs

        print(f"wrote {convert_text_pairs(args.source, args.out)} pairs to {args.out}")
        return 0
    if args.format == "audio_alpaca":
        from diffdpo.data.audio_alpaca import import_audio_alpaca

        manifest = import_audio_alpaca(args.source, args.out, split=args.split)
    else:
        from diffdpo.data.pickapic import import_pickapic

        manifest = import_pickapic(args.source, args.out, args.ties, split=args.split)
    print(json.dumps({k: v for k, v in manifest.items() if k != "source"}, indent=1))
    return 0
