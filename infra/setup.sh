#!/usr/bin/env bash
# Installs everything friendrec needs on a fresh Debian machine, idempotently:
#   - apt: redis-server (the Redis online store used by tests), openssl (test certificates)
#   - .venv from the pinned requirements.txt (transitive versions fixed by requirements.lock), plus friendrec itself (editable, no deps)
# Nothing is downloaded at run time afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # tests make a TLS certificate
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)  # tests/test_infra.py: validates infra/docker-compose.yml (no engine needed)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=.venv/.friendrec-installed
want=$(cat requirements.txt requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing pinned requirements into .venv (first time: a few minutes)"
.venv/bin/python -m pip install -q -r requirements.txt -c requirements.lock
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "setup: done"
