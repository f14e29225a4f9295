#!/usr/bin/env bash
# System packages the tests need, from Debian: Tesseract (OCR of image documents), Chromium for the browser test of the review
# page, redis-server for the serving cache tests, and Prometheus (with promtool) and its
# Pushgateway for the monitoring tests of deploy/prometheus (the tests start and stop the
# servers themselves). kubectl, which renders deploy/k8s, is expected on the machine.
# With --bench, also what the benchmarks need: wrk (a compiled load generator) and a C++
# toolchain with cmake (benchmarks/peers.py builds the llama.cpp peers from source).
# Idempotent: does nothing when they are already there.
# With --ocr, only Tesseract (what `make run` needs to read image documents and scans).
set -euo pipefail
missing=()
command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr tesseract-ocr-eng)
if [ "${1:-}" = "--ocr" ]; then
  set -- --none
else
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-pushgateway >/dev/null 2>&1 || missing+=(prometheus-pushgateway)
if [ "${1:-}" = "--bench" ]; then
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v c++ >/dev/null 2>&1 || missing+=(g++)
  command -v make >/dev/null 2>&1 || missing+=(make)
fi
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
