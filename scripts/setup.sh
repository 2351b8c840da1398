#!/usr/bin/env bash
# Unattended, idempotent set-up of crat-ft's environment in ./.venv.
#
# What it does, each step named so a failure says where it failed:
#   1. creates .venv (Python 3.11) unless it exists
#   2. installs torch 2.14.1 + torchvision 0.29.1
#   3. builds mmcv 2.1.0 from source with CPU ops (c++20 patch, see docs/architecture.md#environment),
#      caching the wheel in $CRAT_FT_CACHE (default ~/.cache/crat-ft) keyed by
#      mmcv, torch, python and platform, so the second set-up takes seconds
#   4. installs mmengine, mmdet, h5py, click, lvis, faster-coco-eval, pytest, ruff (and tidecv for a test)
#   5. installs crat-ft itself (`pip install .`; CRAT_FT_EDITABLE=1 for -e)
#
# GPU users: install mmcv the OpenMMLab way instead (`mim install mmcv==2.1.0`
# for a prebuilt CUDA wheel) and set CRAT_FT_SKIP_MMCV=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CRAT_FT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0
CACHE="${CRAT_FT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/crat-ft}"

STEP="start"
trap 'echo "setup.sh: FAILED at step: $STEP (see the output above; rerun \`bash scripts/setup.sh\` after fixing it)" >&2' ERR
step() { STEP="$1"; echo "==> [$(date +%H:%M:%S)] $1"; }

step "create virtualenv $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"crat-ft needs Python 3.11, got {sys.version}"'

step "install build tools (pip, wheel, ninja)"
"${PIP[@]}" install -q --upgrade "pip<26.2" wheel ninja

step "install torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
if ! "$PY" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('$TORCH_VERSION') and torchvision.__version__.startswith('$TORCHVISION_VERSION')))" 2>/dev/null; then
    "${PIP[@]}" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

step "install mmcv's runtime dependencies and numpy"
"${PIP[@]}" install -q "numpy<2" addict packaging Pillow pyyaml yapf "opencv-python<4.11" "mmengine==0.10.7"

PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
ARCH="$(uname -m)"
WHEEL_DIR="$CACHE/wheels/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PYTAG-$ARCH"

mmcv_ok() { "$PY" -c "import mmcv, mmcv.ops; from mmcv.ops import nms, roi_align; assert mmcv.__version__ == '$MMCV_VERSION'" >/dev/null 2>&1; }

if [[ "${CRAT_FT_SKIP_MMCV:-0}" == "1" ]]; then
    step "skip mmcv (CRAT_FT_SKIP_MMCV=1)"
elif mmcv_ok; then
    step "mmcv $MMCV_VERSION with compiled ops already installed"
else
    if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
        step "pin setuptools<70 for mmcv's setup.py (it imports pkg_resources)"
        "${PIP[@]}" install -q "setuptools>=65,<70"
        step "build mmcv $MMCV_VERSION with CPU ops (one-off, ~20-35 min on 2 cores; cached in $WHEEL_DIR)"
        BUILD="$(mktemp -d "${TMPDIR:-/tmp}/crat-ft-mmcv-build.XXXXXX")"
        "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD/src"
        tar -xzf "$BUILD"/src/mmcv-*.tar.gz -C "$BUILD"
        SRC="$(ls -d "$BUILD"/mmcv-$MMCV_VERSION)"
        # torch >= 2.6 headers need C++20; mmcv 2.1.0 hard-codes c++17.
        sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
        LOG="$BUILD/build.log"
        echo "    build log: $LOG"
        (
            cd "$SRC"
            MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
                "${PIP[@]}" wheel -v --no-build-isolation --no-deps -w "$BUILD/dist" . >"$LOG" 2>&1
        ) &
        BUILD_PID=$!
        START=$SECONDS
        while kill -0 "$BUILD_PID" 2>/dev/null; do
            sleep 30
            NOBJ=$(grep -cE '\.o$|\[[0-9]+/[0-9]+\]' "$LOG" 2>/dev/null || true)
            PROG=$(grep -oE '\[[0-9]+/[0-9]+\]' "$LOG" 2>/dev/null | tail -1 || true)
            echo "    mmcv build: $(( (SECONDS - START) / 60 )) min elapsed, progress ${PROG:-$NOBJ lines}"
        done
        if ! wait "$BUILD_PID"; then
            tail -40 "$LOG" >&2
            false
        fi
        mkdir -p "$WHEEL_DIR"
        # atomic publish: a half-copied wheel never sits in the cache
        for whl in "$BUILD"/dist/mmcv-*.whl; do
            cp "$whl" "$WHEEL_DIR/.$(basename "$whl").tmp"
            mv "$WHEEL_DIR/.$(basename "$whl").tmp" "$WHEEL_DIR/$(basename "$whl")"
        done
        rm -rf "$BUILD"
    fi
    step "install cached mmcv wheel from $WHEEL_DIR"
    "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL_DIR"/mmcv-*.whl
    mmcv_ok || { echo "mmcv ops failed to import after install" >&2; false; }
fi

step "install mmdet 3.3.0, h5py, click, lvis, faster-coco-eval, test and lint tools"
# setuptools 77-80: torch needs >= 77, and < 81 keeps pkg_resources, which mmengine needs for `mmdet::` configs;
# tidecv (TIDE's reference code, with pandas, seaborn, appdirs) only for the tests of analyze-errors
"${PIP[@]}" install -q "mmdet==3.3.0" h5py click lvis "faster-coco-eval>=1.6" matplotlib pytest "ruff==0.17.6" "numpy<2" \
    "setuptools>=77,<81" "tidecv==1.0.1" "pandas<3" seaborn appdirs "opencv-python<4.11"

step "install crat-ft"
if [[ "${CRAT_FT_EDITABLE:-0}" == "1" ]]; then
    "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
else
    "${PIP[@]}" install -q --no-deps --no-build-isolation --force-reinstall "$ROOT"
fi

step "check the stack"
"$VENV/bin/crat-ft" env
echo "==> [$(date +%H:%M:%S)] set-up complete: $VENV"
