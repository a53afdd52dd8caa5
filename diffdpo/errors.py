"""User mistakes versus bugs.

A mistake of the user's (a missing config or input file, an unknown config key, a value of the
wrong type or outside its choices) is reported as one line, ``<prog>: error: <what and where>``,
on stderr with exit code 2, the way argparse reports a bad flag. Anything else is a bug and keeps
its traceback.

* :class:`UserError` is the type to raise for such a mistake; :class:`ConfigError` is what
  :func:`diffdpo.config.load_config` and :func:`diffdpo.config.from_dict` raise (it is also a
  ``ValueError``, so callers that caught ``ValueError`` keep working).
* ``FileNotFoundError`` counts as a user mistake too: at a command's entry point a missing file is
  a path the user gave (or a model not downloaded, :class:`diffdpo.diffusion.hub.OfflineModelError`).
* :func:`report_user_errors` is the one place that turns these into the one-line report; ``diffdpo``
  (diffdpo/cli.py) calls it around every subcommand and :func:`run_main` around a recipe's ``main``.
* ``DIFFDPO_TRACEBACK=1`` shows the traceback of a user mistake as well (for debugging).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in what the user asked for, reported as one line without a traceback."""


class ConfigError(UserError, ValueError):
    """A config that cannot be loaded: unknown key, wrong type, invalid value, malformed override.

    ``keys`` lists the dotted keys at fault when they are known (used to say whether the key came
    from the config file or from a command-line override).
    """

    def __init__(self, message: str, keys: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = list(keys)


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The config file named on the command line does not exist."""


class ModelNotFoundError(UserError, RuntimeError):
    """A model path or hub id that does not resolve (offline, or not downloaded); a ``RuntimeError``
    as well, for callers that catch that."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (newlines become ``; ``)."""
    text = str(error) if str(error) else type(error).__name__
    if isinstance(error, FileNotFoundError) and not isinstance(error, UserError) and error.filename \
            and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def show_tracebacks() -> bool:
    return os.environ.get("DIFFDPO_TRACEBACK", "").lower() not in ("", "0", "false", "no")


def report_user_errors(prog: str, fn: Callable[[], object]) -> object:
    """``fn()``; a user mistake prints ``<prog>: error: <message>`` to stderr and gives exit code 2.

    Returns what ``fn`` returned, or :data:`USER_ERROR_EXIT_CODE` after a user mistake. Every other
    exception propagates with its traceback.
    """
    try:
        return fn()
    except USER_ERRORS as e:
        if show_tracebacks():
            raise
        sys.stdout.flush()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE


def run_main(main: Callable[[], object], prog: str | None = None) -> None:
    """A recipe's ``if __name__ == "__main__":`` block: ``run_main(main)``.

    Runs ``main()``; a user mistake exits with code 2 after one line on stderr (prefixed with the
    script's name, as argparse does), an int return value becomes the exit code, anything else
    (e.g. a results dict) exits 0.
    """
    prog = prog or Path(sys.argv[0]).name
    result = report_user_errors(prog, main)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)
