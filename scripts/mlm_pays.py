"""Does distillation pay on the masked-LM job (MiniLM-L6 + its fitted MLM head -> 3 layers, public-domain tales)?
The distilled student against the same student trained on the masked-LM loss alone, at equal steps and at equal
wall time (teacher forwards counted), settings chosen on the validation documents, the final table on the test
documents (issue 18). Masked-token accuracy on fixed maskings of the held-out chunks.

    python scripts/mlm_pays.py --split validation --seeds 0 --configs before,t1,teacher800_kd_only \
        --out results/mlm_pays_validation.json                                          # the search (a log of runs)
    python scripts/mlm_pays.py --split test --seeds 0,1,2 --configs default --equal_time \
        --out results/mlm_pays.json                                                     # the final table
    python scripts/mlm_pays.py --quick --seeds 0 --configs default --equal_time --out /tmp/q.json   # smoke run

Every run is one ``distill_mlm.main`` (``hf-kd distill-mlm``): a config is the job's flags in CONFIGS. Saving, the
summary and the table: ``pays.py``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # pays.py, also when imported by path
import pays  # noqa: E402
from hf_kd_recipes import distill_mlm  # noqa: E402

DEFAULT: list[str] = []  # the job's defaults: the validated setting (VALIDATED)
# The job's defaults before this search: a teacher fitted 200 steps, T 2, MLM loss + KD on every position +
# hidden-state cosine. Every search config is spelt out over them, so it means the same whatever the defaults are.
BEFORE = ["--prep_steps", "200", "--temperature", "2", "--alpha_task", "1", "--kd_positions", "all",
          "--hidden_weight", "1"]
T1 = ["--temperature", "1", "--hidden_weight", "0"]  # logit-only KD at T = 1 (the causal-LM job's finding)
TEACHER800 = ["--prep_steps", "800"]  # the teacher fitted 4x longer (about 3 epochs of the training chunks)
KD_ONLY = ["--alpha_task", "0"]  # the teacher's distribution alone, no MLM loss (Minitron's choice)
MASKED = ["--kd_positions", "labels"]  # KD averaged over the masked tokens alone, as the MLM loss is
SMALL = ["--max_train_chunks", "320", "--max_steps", "120", "--warmup_steps", "6"]  # 320 chunks, 6 epochs
CONFIGS = {  # name -> flags of the masked-LM job
    "default": DEFAULT,
    "before": BEFORE,  # 40 steps of 16 chunks (a sixth of the 4,243 training chunks)
    "t1": BEFORE + T1,
    "small": BEFORE + SMALL, "small_t1": BEFORE + SMALL + T1,
    "masked_t1": BEFORE + MASKED + T1, "small_masked_t1": BEFORE + SMALL + MASKED + T1,
    "teacher800": BEFORE + TEACHER800, "teacher800_t1": BEFORE + TEACHER800 + T1,
    "teacher800_kd_only": BEFORE + TEACHER800 + T1 + MASKED + KD_ONLY,
    "teacher800_kd_only_lr5e-4": BEFORE + TEACHER800 + T1 + MASKED + KD_ONLY + ["--learning_rate", "5e-4"],
}
VALIDATED = "teacher800_kd_only_lr5e-4"  # chosen on validation (docs/mlm_pays.md): the job's defaults

def main(argv: list[str] | None = None) -> dict:
    return pays.main(argv, job=distill_mlm, configs=CONFIGS, few=DEFAULT, script="scripts/mlm_pays.py",
                     description=__doc__.split("\n\n")[0], default_configs="default",
                     default_out="results/mlm_pays.json")


if __name__ == "__main__":
    main()
