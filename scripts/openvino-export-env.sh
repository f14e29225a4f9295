#!/usr/bin/env bash
# The environment the OpenVINO export runs in (training/openvino_export.py): optimum-intel
# pins transformers<5.6 and declares torchvision (which pulls a CUDA torch), so it cannot live
# in the project's .venv. Idempotent; `make install` builds it beside .venv, in parallel.
# Usage: scripts/openvino-export-env.sh [VENV_DIR]   (default: .venv-openvino)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-openvino}
[ -x "$venv/bin/optimum-cli" ] && exit 0
rm -rf "$venv"
${PYTHON:-python3} -m venv "$venv"
cons="$venv/constraints.txt"
echo "torch==2.13.0" > "$cons"  # the CPU build on local disk; any other pulls CUDA wheels
"$venv/bin/pip" install -q torch==2.13.0
# The OpenVINO release must be the one the serving side runs (pyproject.toml).
"$venv/bin/pip" install -q -c "$cons" "transformers>=5.4,<5.6" nncf==3.4.0 \
  openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 requests
# Without their dependencies: optimum-intel declares torchvision.
"$venv/bin/pip" install -q --no-deps optimum-intel==2.2.0 optimum==2.3.0
