#!/usr/bin/env bash
# Fetch the wheels bench/gpu_check needs on a machine that has torch, transformers, accelerate, peft,
# typer and rich (and what they pull: pyyaml, safetensors, tokenizers, huggingface-hub, numpy, jinja2,
# sympy) but no pydantic and no package index: the lent GPU box. mathctl's config layer needs pydantic;
# mathctl/cli.py imports click, which typer >= 0.29 no longer installs.
#
#   bench/gpu_check_wheels.sh [DEST]        # default DEST: .whl in the repository root (~12 MB)
#
# pydantic-core is compiled: one wheel per CPython version (3.10-3.14, manylinux x86_64), so the box's
# Python, whichever it is, finds its own; the rest are pure Python. DEST/requirements.txt pins the set.
# On the box (DEST carried with the working tree):
#   python3 -m pip install -q --no-index --no-deps --no-compile --find-links .whl --target /tmp/site \
#       -r .whl/requirements.txt && export PYTHONPATH=/tmp/site
# Everything else the check runs on (no datasets, matplotlib or vllm) is on the box already.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
PURE="pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 click==8.5.1"
COMPILED="pydantic-core==2.50.5"
PY_VERSIONS=${PY_VERSIONS:-"3.10 3.11 3.12 3.13 3.14"}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"

mkdir -p "$DEST"
for version in $PY_VERSIONS; do
    # shellcheck disable=SC2086 - word splitting of the lists is intended
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        $PLATFORMS -d "$DEST" $PURE $COMPILED \
        || echo "warning: no wheels for CPython $version (a box with that Python cannot use .whl)" >&2
done
printf '%s\n' $PURE $COMPILED > "$DEST/requirements.txt"
ls -l "$DEST"
du -sh "$DEST"
