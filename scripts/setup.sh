#!/usr/bin/env bash
# Unattended, idempotent set-up of crat-ft's environment in ./.venv.
#
# What it does, each step named so a failure says where it failed:
#   1. creates .venv unless it exists (Python 3.11; 3.10 for the lab stack)
#   2. installs torch + torchvision, unless the environment already has a torch that is kept (below)
#   3. builds mmcv 2.1.0 from source with CPU ops (for torch >= 2.6 with the c++20 patch, see
#      docs/architecture.md#environment), caching the wheel in $CRAT_FT_CACHE (default
#      ~/.cache/crat-ft) keyed by mmcv, torch, python and platform, so the second set-up takes seconds
#   4. installs mmengine, mmdet, h5py, click, lvis, faster-coco-eval, pytest, ruff (and tidecv for a test)
#   5. installs crat-ft itself (`pip install .`; CRAT_FT_EDITABLE=1 for -e)
#
# Stacks (CRAT_FT_STACK):
#   cpu (default)  Python 3.11, torch 2.14.1, torchvision 0.29.1
#   lab            Python 3.10, torch 2.1.2, torchvision 0.16.2, numpy 1.26: the stack LVIS labs run
#                  with OpenMMLab's prebuilt mmcv 2.1.0 (CI tests it here with mmcv built from source)
#
# An existing torch is never replaced when CRAT_FT_KEEP_TORCH=1, or when it is a CUDA build that
# differs from the stack's (a GPU environment): mmcv's compiled ops are built for one torch, and a
# second torch installed over it breaks them. GPU users with OpenMMLab's mmcv do not need this script:
# `pip install .` into their environment (README, "Install into an existing GPU environment").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${CRAT_FT_STACK:-cpu}"
case "$STACK" in
    cpu) DEFAULT_PYTHON=python3.11; TORCH_VERSION=2.14.1; TORCHVISION_VERSION=0.29.1; DEFAULT_VENV="$ROOT/.venv" ;;
    lab) DEFAULT_PYTHON=python3.10; TORCH_VERSION=2.1.2; TORCHVISION_VERSION=0.16.2; DEFAULT_VENV="$ROOT/.venv-lab" ;;
    *) echo "setup.sh: CRAT_FT_STACK should be cpu or lab, got '$STACK'" >&2; exit 2 ;;
esac
VENV="${CRAT_FT_VENV:-$DEFAULT_VENV}"
PYTHON="${PYTHON:-$DEFAULT_PYTHON}"
MMCV_VERSION=2.1.0
CACHE="${CRAT_FT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/crat-ft}"

STEP="start"
trap 'echo "setup.sh: FAILED at step: $STEP (see the output above; rerun \`bash scripts/setup.sh\` after fixing it)" >&2' ERR
step() { STEP="$1"; echo "==> [$(date +%H:%M:%S)] $1"; }

# an interpreter that runs: on PATH, or one of pyenv's installed versions (its shim alone may refuse)
find_python() {
    if "$1" -c 'import sys' >/dev/null 2>&1; then command -v "$1"; return 0; fi
    local want="${1#python}" v
    if command -v pyenv >/dev/null 2>&1; then
        v="$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}(\.[0-9]+)?$" | tail -n 1)"
        if [[ -n "$v" && -x "$(pyenv root)/versions/$v/bin/$1" ]]; then echo "$(pyenv root)/versions/$v/bin/$1"; return 0; fi
    fi
    return 1
}

step "create virtualenv $VENV ($STACK stack)"
if [[ ! -x "$VENV/bin/python" ]]; then
    INTERPRETER="$(find_python "$PYTHON")" || { echo "setup.sh: $PYTHON not found; install it or set PYTHON=..." >&2; false; }
    "$INTERPRETER" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 10), f"crat-ft needs Python >= 3.10, got {sys.version}"'

step "install build tools (pip, wheel, ninja)"
"${PIP[@]}" install -q --upgrade "pip<26.2" wheel ninja

# the torch already there, if any, is kept when it differs from the stack's and CRAT_FT_KEEP_TORCH=1, or it
# is a CUDA build (a GPU environment), or an mmcv is installed (its compiled ops were built for that torch)
HAVE_TORCH="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0], bool(torch.version.cuda))' 2>/dev/null || true)"
KEEP_TORCH="${CRAT_FT_KEEP_TORCH:-0}"
if [[ -n "$HAVE_TORCH" && "${HAVE_TORCH% *}" != "$TORCH_VERSION" ]]; then
    if [[ "$HAVE_TORCH" == *True ]] || "$PY" -c 'import mmcv' >/dev/null 2>&1; then
        KEEP_TORCH=1
    fi
fi
if [[ "$KEEP_TORCH" == "1" && -n "$HAVE_TORCH" ]]; then
    TORCH_VERSION="${HAVE_TORCH% *}"
    TORCHVISION_VERSION="$("$PY" -c 'import torchvision; print(torchvision.__version__.split("+")[0])' 2>/dev/null || echo none)"
    step "keep the installed torch $TORCH_VERSION (torchvision $TORCHVISION_VERSION): it is not replaced"
else
    step "install torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    if ! "$PY" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('$TORCH_VERSION') and torchvision.__version__.startswith('$TORCHVISION_VERSION')))" 2>/dev/null; then
        "${PIP[@]}" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    fi
fi
# torch >= 2.6 (its headers need C++20, its metadata setuptools >= 77); torch 2.1 builds mmcv as it is
NEW_TORCH="$("$PY" -c "import torch, sys; print(int(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 6)))")"

step "install mmcv's runtime dependencies and numpy"
"${PIP[@]}" install -q "numpy<2" addict packaging Pillow pyyaml yapf "opencv-python<4.11" "mmengine>=0.10,<0.11"

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
        if [[ "$NEW_TORCH" == "1" ]]; then  # torch >= 2.6 headers need C++20; mmcv 2.1.0 hard-codes c++17
            sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
        fi
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
# setuptools < 81 keeps pkg_resources, which mmengine needs for `mmdet::` configs; torch >= 2.6 needs >= 77;
# tidecv (TIDE's reference code, with pandas, seaborn, appdirs) only for the tests of analyze-errors
SETUPTOOLS="setuptools>=65,<81"
[[ "$NEW_TORCH" == "1" ]] && SETUPTOOLS="setuptools>=77,<81"
"${PIP[@]}" install -q "mmdet==3.3.0" h5py click lvis "faster-coco-eval>=1.6" matplotlib scipy pytest "pytest-xdist>=3.6" "ruff==0.17.6" \
    "numpy<2" "$SETUPTOOLS" "tidecv==1.0.1" "pandas<3" seaborn appdirs "opencv-python<4.11" \
    "torch==$TORCH_VERSION"

step "install crat-ft"
if [[ "${CRAT_FT_EDITABLE:-0}" == "1" ]]; then
    "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
else
    # setuptools copies the package into build/ without removing what is there: a module moved or deleted since
    # the last install would come back from build/ into the environment
    rm -rf "$ROOT/build"
    "${PIP[@]}" install -q --no-deps --no-build-isolation --force-reinstall "$ROOT"
fi

step "check the stack"
"$VENV/bin/crat-ft" env
echo "==> [$(date +%H:%M:%S)] set-up complete: $VENV"
