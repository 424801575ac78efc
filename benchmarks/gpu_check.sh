#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU check"): on a CUDA machine, random-weight models at about
# 0.5 B and at LLaVA-1.5-7B's shape through probe and expansion steps (ZeRO-2 bf16), a batched
# evaluation and the CMoE-vs-dense layer; samples/s, tokens/s, peak GPU memory, MFU, CMoE/dense.
# Without CUDA it runs the CPU-sized part (tiny shape, seconds) and says it skipped the GPU shapes.
# At most 8 minutes: the timeout stops it there. PY picks the interpreter (a CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec timeout --signal=INT --kill-after=20 480 "$PY" -m benchmarks.gpu_check "$@"
