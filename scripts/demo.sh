#!/usr/bin/env bash
# The main job on a fresh machine: install cns into ./.venv (CPU torch unless you already have
# one there), then run `cns demo` on the shipped tiny world. Extra arguments go to `cns demo`
# (see `cns demo --help`); the report is written to cns-demo/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/cns ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c .ci/constraints.txt torch==2.13.0
  .venv/bin/python -m pip install -q -c .ci/constraints.txt -e ".[eval]"
fi
exec .venv/bin/cns demo "$@"
