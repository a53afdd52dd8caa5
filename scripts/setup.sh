#!/usr/bin/env bash
# Creates or refreshes the environments diffdpo needs on a CPU machine; nothing else need be installed.
#   .venv      the toolkit with every extra (torch/torchaudio/torchvision 2.9.1 from PyPI)
#   .venv-trl  TRL 0.28.0, the peer the loss-core tests compare against (it needs transformers<5)
#   chromium   Debian's headless browser, which tests/test_report.py opens the HTML report in
# Idempotent: a stamp of the requirement files (and of this script above the system-packages part)
# skips the venv work when nothing changed; system packages are installed only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
PY=${PYTHON:-python3}
quiet_pip() {  # pip warns once per package about this machine's partial local mirrors; keep real errors
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
stamp=$(cat pyproject.toml requirements/*.txt <(sed '/^# --- system packages/,$d' scripts/setup.sh) \
  | sha256sum | cut -d' ' -f1)

if [ "$(cat .venv/.diffdpo-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "setting up .venv (first time: a few minutes, ~8 GB) ..."
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pip=(.venv/bin/python -m pip install -q -c requirements/constraints.txt)
  # torch first, from the pinned triple, so nothing below can pull a different build.
  quiet_pip "${pip[@]}" torch torchaudio torchvision
  quiet_pip "${pip[@]}" -e ".[audio,diffusion,llm,test]"
  # laion-clap pins numpy<2 and builds roberta-base from the hub at construction: install the
  # package alone (its real needs are in the audio extra); diffdpo reaches it only through a backend.
  quiet_pip .venv/bin/python -m pip install -q --no-deps "laion-clap==1.1.7"
  echo "$stamp" > .venv/.diffdpo-stamp
fi

if [ "$(cat .venv-trl/.diffdpo-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "setting up .venv-trl (TRL peer for parity tests) ..."
  [ -x .venv-trl/bin/python ] || "$PY" -m venv .venv-trl
  quiet_pip .venv-trl/bin/python -m pip install -q -r requirements/trl-peer.txt
  echo "$stamp" > .venv-trl/.diffdpo-stamp
fi

# --- system packages (outside the venv stamp: editing below reinstalls no venv)
if ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium with apt-get (headless browser for tests/test_report.py; ~1.5 min) ..."
  sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
