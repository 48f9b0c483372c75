#!/usr/bin/env bash
# On a machine with one CUDA GPU (about 5 minutes): the GPU-only tests, then the end-to-end benchmark at 8,192
# tokens per step (SmolLM2-135M-Instruct -> 15 layers) against the floor and TRL (if installed), printing the table.
#   bash scripts/setup.sh && bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())" || exit 1
status=0
$PY -m pytest -q -rs tests/test_gpu.py tests/test_peft.py tests/test_on_policy.py -k "gpu or cuda or qlora or vllm or fp16 or bf16 or fsdp or deepspeed or fused" || status=1
$PY scripts/gpu_benchmark.py --sizes 8x1024 --cases floor,chunked,fused,trl --out outputs/gpu_check/bench.json || status=1
exit $status
