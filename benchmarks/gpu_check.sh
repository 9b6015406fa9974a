#!/usr/bin/env bash
# The GPU check in one call on a GPU host, from a copy of the repository: no `make setup`, no network.
#
#   timeout 540 benchmarks/gpu_check.sh [OUT_DIR] [benchmarks/gpu_check.py options]
#
# OUT_DIR: default $OUT when set (a lent machine's folder that comes back), else artifacts/gpu-check;
# it receives gpu_check.json and gpu_check.log, nothing else. Python: $GPU_CHECK_PYTHON, default the
# repository's .venv after `make setup`, else the host's python3 (its own torch). Wheels the host lacks
# (diffusers, open-clip-torch for CLIP's vocabulary file) are unpacked from $GPU_CHECK_WHEELS (default
# .whl) onto PYTHONPATH first, ahead of what is installed; fetch them on a machine with the registry:
#   pip download --no-deps -d .whl diffusers==0.42.1 open-clip-torch==3.3.0
# The check keeps inside its own budget (--budget, default 480 s), so `timeout 540` is a backstop;
# the report is rewritten after every case, so even a stopped run leaves one.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${OUT:-artifacts/gpu-check}
if [[ $# -gt 0 && $1 != -* ]]; then
    out=$1
    shift
fi
python=${GPU_CHECK_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
wheels=${GPU_CHECK_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d -t kiln-gpu-check-site.XXXXXX)
    trap 'rm -rf "$site"' EXIT
    for wheel in "$wheels"/*.whl; do
        "$python" -m zipfile -e "$wheel" "$site"
    done
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu-check: unpacked $(ls "$wheels"/*.whl | wc -l) wheel(s) from $wheels onto PYTHONPATH"
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
set +e
"$python" benchmarks/gpu_check.py "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
set -e
exit "$status"
