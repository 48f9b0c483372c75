"""``python -m hf_kd_recipes COMMAND ...``: the same as ``hf-kd COMMAND ...``."""

import sys

from hf_kd_recipes.cli import main

sys.exit(main())
