#!/usr/bin/env bash
# The OpenVINO export in a venv of its own (optimum-intel 2.2.0 wants transformers<5.6 and
# torchvision, which the project's venv must not get). Usage, from the repository root:
#   benchmarks/engine_research/ov_export_side_venv.sh MODEL_DIR OUT_ROOT
# Leaves OUT_ROOT/int8 and OUT_ROOT/int4 (IR + openvino_tokenizer/detokenizer), and the venv
# in benchmarks/.work/engine/ov-export-venv (reused when present).
set -euo pipefail
model=$1
out=$2
venv=benchmarks/.work/engine/ov-export-venv
cons=$(mktemp)
echo "torch==2.13.0" >"$cons"   # the CPU build on local disk; anything else pulls CUDA wheels
t0=$(date +%s)
if [ ! -x "$venv/bin/optimum-cli" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q -c "$cons" "transformers<5.6" nncf openvino openvino-tokenizers \
    openvino-genai requests
  # --no-deps: optimum-intel declares torchvision, which resolves to a CUDA torch
  "$venv/bin/pip" install -q --no-deps optimum-intel==2.2.0 optimum==2.3.0
fi
t1=$(date +%s)
"$venv/bin/optimum-cli" export openvino --model "$model" --task text-generation-with-past \
  --weight-format int8 "$out/int8"
t2=$(date +%s)
"$venv/bin/optimum-cli" export openvino --model "$model" --task text-generation-with-past \
  --weight-format int4 --sym --group-size 64 --ratio 1.0 "$out/int4"
t3=$(date +%s)
echo "venv $((t1 - t0)) s, export int8 $((t2 - t1)) s, int4 $((t3 - t2)) s; venv size $(du -sh "$venv" | cut -f1)"
