#!/usr/bin/env bash
# Installs everything blip2cpp needs on a fresh Debian 12 machine, and nothing else.
# Idempotent and non-interactive: a second run only checks.
#   - Debian packages: compiler, CMake, Ninja and the C++ libraries (one list, below).
#   - LibTorch: an importable torch >= 2.4 is used as it is (for example a CUDA build);
#     otherwise torch==2.13.0 (CPU) goes into the project-local virtual environment .venv/.
# Prints the path of the Python whose torch the build uses on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  build-essential cmake ninja-build pkg-config python3 python3-venv
  libyaml-cpp-dev      # configs
  nlohmann-json3-dev   # JSON: annotations, safetensors headers, metrics
  libcli11-dev         # command line
  libjpeg62-turbo-dev libpng-dev  # image decoding (Pillow's decoder family)
  libutf8proc-dev      # Unicode properties for the BERT tokenizer
  libgloo-dev          # gloo's headers for src/blip2/dist (torch ships gloo's code, not its headers)
  libcpp-httplib-dev   # blip2 serve (HTTP server and client)
  libgtest-dev libgmock-dev  # tests
  chromium chromium-driver   # the web page's browser test (headless, driven over WebDriver)
)
TORCH_VERSION=2.13.0

log() { echo "[setup] $*" >&2; }

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

torch_ok() {  # $1 = python; true if it imports torch >= 2.4
  "$1" - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PY
}

PY=""
if [[ -x .venv/bin/python ]] && torch_ok .venv/bin/python; then
  PY=.venv/bin/python
elif [[ -n "${BLIP2_PYTHON:-}" ]] && torch_ok "$BLIP2_PYTHON"; then
  PY=$BLIP2_PYTHON
elif command -v python3 >/dev/null && torch_ok "$(command -v python3)"; then
  PY=$(command -v python3)
  log "using the torch already importable by $PY"
else
  log "installing torch==$TORCH_VERSION (CPU) into .venv"
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
  PY=.venv/bin/python
fi
[[ "$PY" = /* ]] || PY="$PWD/$PY"  # absolute, symlinks kept (a venv's python is one)
log "torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) from $PY"
echo "$PY"
