"""Train (once) and cache the MNIST ViT teacher of `hf-kd distill-image`, then print what was recorded.

    python scripts/train_vit_teacher.py [--quick]

The teacher lives in recipes/image_teacher.py (recipe TEACHER); it is cached under cache_dir()/mnist-vit-teacher
(mnist-vit-teacher-quick with --quick) and retrained only when the recipe changes.
"""

import argparse
import json

from hf_kd.data.cache import cache_dir
from hf_kd_recipes import image_teacher


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="The one-epoch smoke-test teacher.")
    opts = parser.parse_args(argv)
    teacher, _, info = image_teacher.prepare_teacher(quick=opts.quick)
    print(json.dumps(info, indent=2))
    print(f"cached in {cache_dir() / info['name']} ({sum(p.numel() for p in teacher.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
