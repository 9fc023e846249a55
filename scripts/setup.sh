#!/usr/bin/env bash
# Installs what Ensemble Explorer needs on a Debian machine: the offline demo data (Debian's
# dataset-fashion-mnist), with --tests Chromium for the browser tests and PostgreSQL for the job
# queue tests (tests/postgres.py starts a throwaway server; none is left running), and a virtual
# environment .venv with the pinned Python packages. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

tests=false
[ "${1:-}" = "--tests" ] && tests=true

packages=()
[ -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
if $tests && [ ! -x /usr/bin/chromium ]; then packages+=(chromium); fi
if $tests && ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then packages+=(postgresql); fi
if [ ${#packages[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
requirements=requirements.txt
$tests && requirements=requirements-test.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
# The project itself, editable: bench scripts and tests import `core` from this checkout without sys.path edits.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
