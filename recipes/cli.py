"""The `hf-kd` command (also `python -m hf_kd_recipes`): each command runs the main() of a recipe in recipes/.

    hf-kd distill [flags]         recipes/distill_clm.py: causal LM (SmolLM2-135M -> half-depth student on tales)
    hf-kd distill-mlm [flags]     recipes/distill_mlm.py: masked LM / sentence encoder (MiniLM-L6 -> 3 layers)
    hf-kd distill-image [flags]   recipes/distill_image.py: image classifier (ViT teacher on MNIST-5k -> ViT / CNN)
    hf-kd distill-textcls [flags] recipes/distill_textcls.py: text classifier (MiniLM-L6 on 20 Newsgroups -> 3 layers)
    hf-kd distill-cross-tokenizer recipes/distill_cross_tokenizer.py: SmolLM2 -> a student with its own tokenizer
    hf-kd cache-teacher [flags]   recipes/cache_teacher.py: run a teacher once, store its top-k distribution
    hf-kd serve-teacher MODEL     recipes/serve_teacher.py: serve a teacher's top-k over HTTP (--teacher_url)
    hf-kd estimate-memory [flags] recipes/estimate_memory.py: per-device memory of a run, before launch

Every DistillationConfig field is a flag (e.g. --max_steps 20 --temperature 4); --config file.yaml too;
`hf-kd COMMAND --help` lists them.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "distill": "hf_kd_recipes.distill_clm",
    "distill-mlm": "hf_kd_recipes.distill_mlm",
    "distill-image": "hf_kd_recipes.distill_image",
    "distill-textcls": "hf_kd_recipes.distill_textcls",
    "distill-cross-tokenizer": "hf_kd_recipes.distill_cross_tokenizer",
    "cache-teacher": "hf_kd_recipes.cache_teacher",
    "serve-teacher": "hf_kd_recipes.serve_teacher",
    "estimate-memory": "hf_kd_recipes.estimate_memory",
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
