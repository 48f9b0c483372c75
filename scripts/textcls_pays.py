"""Does distillation pay on the text-classification job (20 Newsgroups, MiniLM-L6 teacher -> 3 layers)? The
distilled student against the same student trained without the teacher on the labelled posts alone, at equal steps
and at equal wall time (the teacher cache's build counted), settings chosen on the validation split, the final table
on the test split (issue 18).

    python scripts/textcls_pays.py --split validation --seeds 0 --configs few,few_t2 \
        --out results/textcls_pays_validation.json                                     # the search (a log of runs)
    python scripts/textcls_pays.py --split test --seeds 0,1,2 --configs few,full --equal_time \
        --out results/textcls_pays.json                                                 # the final table
    python scripts/textcls_pays.py --quick --seeds 0 --configs few --equal_time --out /tmp/q.json   # smoke run

Every run is one ``distill_textcls.main`` (``hf-kd distill-textcls``): a config is the job's flags in CONFIGS
(``few``: ``--labels_per_class 20``, the job's validated few-label preset; ``full``: every training post labelled,
the job's defaults). Evaluation: the first 1,000 posts of a fixed shuffle of the split. Saving, the summary and the
table: ``pays.py``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # pays.py, also when imported by path
import pays  # noqa: E402
from hf_kd_recipes import distill_textcls  # noqa: E402

COMMON = ["--eval_examples", "1000", "--eval_before", "false"]
FEW = COMMON + ["--labels_per_class", "20"]
FULL = COMMON + ["--labels_per_class", "0"]
CONFIGS = {  # name -> flags of the text job; "few*" start from the FEW_LABELS preset, "full*" from the defaults
    "few": FEW,
    "few_t2": FEW + ["--temperature", "2"], "few_t4": FEW + ["--temperature", "4"],
    "few_a0.5": FEW + ["--alpha_task", "0.5"], "few_a1": FEW + ["--alpha_task", "1"],
    "few_a0": FEW + ["--alpha_task", "0"],
    "few_share0.5": FEW + ["--labelled_share", "0.5"], "few_share0": FEW + ["--labelled_share", "0"],
    "few_clip1": FEW + ["--max_grad_norm", "1"],
    "few_lr1e-4": FEW + ["--learning_rate", "1e-4"], "few_lr1e-3": FEW + ["--learning_rate", "1e-3"],
    "few_s240": FEW + ["--max_steps", "240"], "few_s960": FEW + ["--max_steps", "960"],
    "few_s960_lr6e-4": FEW + ["--max_steps", "960", "--learning_rate", "6e-4", "--baseline", "false"],
    # the preset (1,440 steps) without its baseline
    "few_s1440_kd_only": FEW + ["--max_steps", "1440", "--warmup_steps", "72", "--baseline", "false"],
    "full": FULL,  # the defaults: 60 steps, student = the teacher's layers and head, T=2, alpha 1, kd 1
    "full_s640": FULL + ["--max_steps", "640"],  # one epoch of the 10,293 posts
    "full_s640_t1": FULL + ["--max_steps", "640", "--temperature", "1"],
    "full_s640_pre": FULL + ["--max_steps", "640", "--student_init", "pretrained", "--learning_rate", "3e-4"],
}


def main(argv: list[str] | None = None) -> dict:
    return pays.main(argv, job=distill_textcls, configs=CONFIGS, few=FEW, script="scripts/textcls_pays.py",
                     description=__doc__.split("\n\n")[0], default_configs="few,full",
                     default_out="results/textcls_pays.json")


if __name__ == "__main__":
    main()
