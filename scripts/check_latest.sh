#!/usr/bin/env bash
# Not CI: try what a user gets today. A fresh venv takes the newest transformers, lmms-eval and their dependencies
# from the index through mrprune's own extras (`pip install "mrprune[hf,eval]"`), prints the versions it got and runs
# the integration and lmms-eval plugin tests. Run it before widening the transformers range in pyproject.toml and
# before refreshing requirements/ci.lock (scripts/update_lock.sh).
#
#   bash scripts/check_latest.sh            # exit status 0: the newest releases work
set -euo pipefail
cd "$(dirname "$0")/.."

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
python3 -m venv "$root/venv"
# shellcheck disable=SC1091
source "$root/venv/bin/activate"
python -m pip install -q --upgrade pip
echo "torch==2.13.0" >"$root/torch-pin.txt" # the CPU wheel on disk; an unpinned torch pulls the CUDA build
python -m pip install -q -c "$root/torch-pin.txt" torch numpy "setuptools>=64" wheel
# The extras without their upper bounds, so the newest releases come in (that is the point of this check).
sed -E 's/"(transformers|lmms-eval)[^"]*"/"\1"/g' pyproject.toml >"$root/pyproject.toml"
mkdir "$root/src" && git archive HEAD | tar -x -C "$root/src" && cp "$root/pyproject.toml" "$root/src/" # committed tree
python -m pip install -q -c "$root/torch-pin.txt" --no-build-isolation -e "$root/src[hf,eval]" pytest expecttest hypothesis pillow scikit-image
# PyPI's only torchvision for torch 2.13 is a CUDA build that cannot load beside the CPU torch (GPU users keep it).
python -m pip uninstall -y -q torchvision || true
python - <<'PY'
from importlib.metadata import version
for name in ("torch", "transformers", "lmms-eval", "huggingface-hub", "tokenizers", "filelock", "accelerate", "datasets"):
    try:
        print(f"{name:16} {version(name)}")
    except Exception:
        print(f"{name:16} (not installed)")
PY
cd "$root/src" # a copy of the committed tree, installed (editable) with the extras
python -m pytest -q tests/test_integration_*.py tests/test_lmms_eval_plugin.py
