"""Does distillation pay on the image job with few labels? The distilled student against the same student trained
without the teacher on the labelled digits alone, at equal steps and at equal wall time (the teacher's forwards
counted), settings chosen on the validation split, the final table on the test split (issue 18).

    python scripts/image_pays.py --split validation --seeds 0 --configs few,few_a0.3 \
        --out results/image_few_labels_validation.json                                # the search (a log of runs)
    python scripts/image_pays.py --split test --seeds 0,1,2 --configs few,full --equal_time \
        --out results/image_pays.json                                                  # the final table
    python scripts/image_pays.py --quick --seeds 0 --configs few --equal_time --out /tmp/q.json   # smoke run

Every run is one ``distill_image.main`` (``hf-kd distill-image``): a config is the job's flags in CONFIGS (``few``:
``--labelled_images 200``, the job's validated few-label preset; ``full``: 1,000 labelled digits). ``--equal_time``:
the recipe also trains the baseline for the steps that fit in the distilled run's training seconds. Saving, the
summary and the table: ``pays.py``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # pays.py, also when imported by path
import pays  # noqa: E402
from hf_kd_recipes import distill_image  # noqa: E402

FEW = ["--labelled_images", "200"]
FULL = ["--train_images", "1000", "--labelled_images", "0"]
CONFIGS = {  # name -> flags of the image job; "few*" start from the FEW_LABELS preset
    "few": FEW,
    "few_readme": FEW + ["--alpha_task", "0.5", "--kd_weight", "0.5", "--max_grad_norm", "1", "--labelled_share", "0"],
    "few_clip1": FEW + ["--max_grad_norm", "1"], "few_clip5": FEW + ["--max_grad_norm", "5"],
    "few_a0.3": FEW + ["--alpha_task", "0.3"], "few_a0.5": FEW + ["--alpha_task", "0.5"],
    "few_a0": FEW + ["--alpha_task", "0"],
    "few_share0.5": FEW + ["--labelled_share", "0.5"], "few_share0": FEW + ["--labelled_share", "0"],
    "few_t1": FEW + ["--temperature", "1"], "few_t2": FEW + ["--temperature", "2"],
    "few_kd0.5": FEW + ["--kd_weight", "0.5"], "few_kd2": FEW + ["--kd_weight", "2"],
    "few_h0": FEW + ["--hidden_weight", "0"],
    "few_lr1e-3": FEW + ["--learning_rate", "1e-3"], "few_lr4e-3": FEW + ["--learning_rate", "4e-3"],
    "few_s960": FEW + ["--max_steps", "960"], "few_s1920": FEW + ["--max_steps", "1920"],
    "few_s240": FEW + ["--max_steps", "240"],
    "few_resnet": FEW + ["--student", "resnet"],
    "full_resnet": FULL + ["--student", "resnet"],  # the defaults with the CNN student
    "full": FULL,  # today's defaults: 480 steps, alpha_task 0.5, kd_weight 0.5, T 4, max_grad_norm 1
    "full_fewpreset": FULL + ["--alpha_task", "0.1", "--kd_weight", "1", "--max_grad_norm", "0", "--max_steps", "1920",
                              "--learning_rate", "4e-3"],  # the few-label validated loss and optimiser settings
}


def main(argv: list[str] | None = None) -> dict:
    return pays.main(argv, job=distill_image, configs=CONFIGS, few=FEW, script="scripts/image_pays.py",
                     description=__doc__.split("\n\n")[0], default_configs="few,full",
                     default_out="results/image_pays.json")


if __name__ == "__main__":
    main()
