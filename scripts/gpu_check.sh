#!/usr/bin/env bash
# One prepared command that checks and times Q-Tuning's CUDA path on one GPU (issue 17).
#
#   bash scripts/gpu_check.sh --wheels DIR --out DIR [options]   # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run [--tiny|--scale S]       # list checks and timings, sizes
#   bash scripts/gpu_check.sh --device cpu --tiny --out DIR      # the CPU variant (test suite)
#   bash scripts/gpu_check.sh --wheels DIR --setup-only          # install, verify imports, stop
#   bash scripts/gpu_check.sh --megatron-core-wheel WHL [...]     # the checks against that wheel
#
# Options other than --wheels and --setup-only go to scripts/gpu_check.py (see its --help):
# --device {auto,cuda,cpu}, --out DIR, --dry-run, --tiny, --scale S (0 < S <= 1), --repeats N,
# --warmup N, --no-timings, --tolerance-scale F, --time-budget SECONDS, --peak-flops F.
#
# Set-up without network (--wheels DIR). The GPU machine has Python 3.12 with torch, numpy,
# transformers and pytest, and no network. This script never installs torch. It installs whatever
# of GPU_CHECK_REQUIREMENTS is not importable (default: megatron-core, numpy, packaging, i.e.
# pyproject.toml's dependencies besides torch, plus megatron-core's own) from DIR with
#   pip install --no-index --find-links DIR --no-deps --target "$GPU_CHECK_SITE" ...
# (a folder put first on PYTHONPATH: no system site-packages are touched, PEP 668 does not
# apply), and puts this repository on PYTHONPATH instead of `pip install -e .` (an editable
# install needs setuptools, which an offline build cannot fetch). DIR must stay under 40 MiB;
# a requirement that is neither importable nor in DIR is an error naming it.
#
# Fill DIR on a machine with network. megatron-core ships a compiled extension, so its wheel must
# be the CPython 3.12 one; it is tagged manylinux_2_24/manylinux_2_28 (`--platform
# manylinux2014_x86_64` finds no megatron-core 0.16.1):
#
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --no-deps -d wheels megatron-core==0.16.1 packaging
#
# (2.7 MiB: megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl and
# packaging-26.4-py3-none-any.whl.) numpy is preinstalled there; add `numpy` to the line if not.
#
# Another megatron-core (e.g. 0.19.x, the newest end of pyproject's range): --megatron-core-wheel
# WHL (or GPU_CHECK_MEGATRON_CORE_WHEEL) installs that cp312 wheel into GPU_CHECK_SITE with
# --no-deps, ahead of any megatron-core already importable, checks that `megatron.core` then is
# that version, and runs the checks against it (its dependencies torch, numpy, packaging>=24.2 must
# be importable or come from --wheels). Fill it on a machine with network:
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --no-deps -d wheels megatron-core==0.19.2
#
# Environment: PYTHON (the interpreter; default .venv/bin/python when present, else python3),
# GPU_CHECK_SITE (install target; default ${TMPDIR:-/tmp}/q_tuning_gpu_check_site),
# GPU_CHECK_REQUIREMENTS ("dist:module" pairs that must be importable).
# Exit status: gpu_check.py's (0 all checks passed, 1 a check failed, 3 a timing raised), or 2
# for bad usage or a set-up error.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=""
CORE_WHEEL=${GPU_CHECK_MEGATRON_CORE_WHEEL:-}
SETUP_ONLY=0
DRY_RUN=0
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --wheels=*) WHEELS=${1#*=}; shift ;;
        --megatron-core-wheel) CORE_WHEEL=${2:?--megatron-core-wheel needs a .whl}; shift 2 ;;
        --megatron-core-wheel=*) CORE_WHEEL=${1#*=}; shift ;;
        --setup-only) SETUP_ONLY=1; shift ;;
        --dry-run) DRY_RUN=1; PASS+=("$1"); shift ;;
        *) PASS+=("$1"); shift ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY=$ROOT/.venv/bin/python
elif command -v python3 >/dev/null 2>&1; then
    PY=python3
else
    PY=python
fi
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/q_tuning_gpu_check_site}
REQUIREMENTS=${GPU_CHECK_REQUIREMENTS:-"megatron-core:megatron.core numpy:numpy packaging:packaging"}
if [ -n "$CORE_WHEEL" ]; then  # megatron-core comes from that wheel, not from --wheels
    REQUIREMENTS=$(echo " $REQUIREMENTS " | sed 's/ megatron-core:megatron\.core / /')
fi
MAX_WHEEL_BYTES=$((40 * 1024 * 1024))
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}

die() {
    echo "gpu_check.sh: error: $*" >&2
    exit 2
}

importable() {  # importable MODULE: whether $PY can find it (parents imported, nothing else)
    "$PY" - "$1" >/dev/null 2>&1 <<'EOF'
import importlib.util, sys
sys.exit(0 if importlib.util.find_spec(sys.argv[1]) is not None else 1)
EOF
}

wheel_for() {  # wheel_for DIST: the first wheel of DIST in $WHEELS (names normalise - . to _)
    local stem
    stem=$(echo "$1" | tr '.-' '__')
    find "$WHEELS" -maxdepth 1 -iname "${stem}-*.whl" | sort | head -n 1
}

install_wheels() {  # install_wheels DIST...: into $SITE, with pip, or unzipped without it
    mkdir -p "$SITE"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --upgrade \
            --target "$SITE" --disable-pip-version-check --quiet "$@"
    else
        echo "gpu_check.sh: $PY has no pip; unpacking the wheels into $SITE" >&2
        local dist
        for dist in "$@"; do
            "$PY" -m zipfile -e "$(wheel_for "$dist")" "$SITE"
        done
    fi
}

setup() {
    [ -d "$WHEELS" ] || die "--wheels $WHEELS: no such folder"
    local size need=() missing=() req dist mod
    size=$(du -sb "$WHEELS" | cut -f1)
    echo "gpu_check.sh: wheel folder $WHEELS: $((size / 1024)) KiB (limit 40 MiB)"
    [ "$size" -le "$MAX_WHEEL_BYTES" ] || die "wheel folder $WHEELS holds $((size / 1048576)) MiB, more than 40 MiB: keep only the wheels this script needs"
    importable torch || die "torch is not importable with $PY; this script never installs torch (the GPU machine brings its own); set PYTHON to the interpreter that has it"
    for req in $REQUIREMENTS; do
        dist=${req%%:*}
        mod=${req#*:}
        importable "$mod" && continue
        need+=("$dist")
        [ -n "$(wheel_for "$dist")" ] || missing+=("$dist (for 'import $mod')")
    done
    [ ${#missing[@]} -eq 0 ] || die "not importable and no wheel in $WHEELS: ${missing[*]}; fill the folder with the pip download line in the header of scripts/gpu_check.sh"
    if [ ${#need[@]} -eq 0 ]; then
        echo "gpu_check.sh: every requirement is already importable; nothing to install"
    elif [ "$DRY_RUN" = 1 ]; then
        echo "gpu_check.sh: dry run: would install ${need[*]} from $WHEELS into $SITE"
        return
    else
        echo "gpu_check.sh: installing ${need[*]} from $WHEELS into $SITE"
        install_wheels "${need[@]}" || die "installing ${need[*]} from $WHEELS failed"
    fi
    for req in $REQUIREMENTS q_tuning:q_tuning; do
        importable "${req#*:}" || die "${req%%:*} is still not importable after the set-up"
    done
}

setup_core_wheel() {  # the megatron-core of --megatron-core-wheel, first on PYTHONPATH
    local name version found
    [ -f "$CORE_WHEEL" ] || die "--megatron-core-wheel $CORE_WHEEL: no such file"
    name=$(basename "$CORE_WHEEL")
    case "$name" in
        megatron_core-*.whl) ;;
        *) die "--megatron-core-wheel $CORE_WHEEL: not a megatron_core-VERSION-...whl" ;;
    esac
    version=$(echo "$name" | cut -d- -f2)
    if [ "$DRY_RUN" = 1 ]; then
        echo "gpu_check.sh: dry run: would install megatron-core $version from $CORE_WHEEL into" \
             "$SITE (--no-deps, ahead of any other megatron-core) and run the checks against it"
        return
    fi
    echo "gpu_check.sh: installing megatron-core $version from $CORE_WHEEL into $SITE"
    mkdir -p "$SITE"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --no-index --no-deps --upgrade --target "$SITE" \
            --disable-pip-version-check --quiet "$CORE_WHEEL" || die "installing $CORE_WHEEL failed"
    else
        "$PY" -m zipfile -e "$CORE_WHEEL" "$SITE" || die "unpacking $CORE_WHEEL failed"
    fi
    found=$("$PY" -c 'from megatron.core.package_info import __version__; print(__version__)') \
        || die "megatron.core from $CORE_WHEEL does not import with $PY"
    [ "$found" = "$version" ] || die "megatron.core is $found, not $version from $CORE_WHEEL"
    echo "gpu_check.sh: the checks run against megatron-core $found ($CORE_WHEEL)"
}

if [ -n "$WHEELS" ]; then
    setup
elif [ "$SETUP_ONLY" = 1 ] && [ -z "$CORE_WHEEL" ]; then
    die "--setup-only needs --wheels DIR or --megatron-core-wheel WHL"
fi
[ -z "$CORE_WHEEL" ] || setup_core_wheel
if [ "$SETUP_ONLY" = 1 ]; then
    echo "gpu_check.sh: set-up done ($PY; PYTHONPATH=$PYTHONPATH)"
    exit 0
fi
exec "$PY" "$ROOT/scripts/gpu_check.py" ${PASS[@]+"${PASS[@]}"}
