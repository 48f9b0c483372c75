"""Peak memory of distillation from K teachers: teachers run one after another and keep only what the signals read,
so the step's activation memory should not grow with K (only the teachers' weights do).

    python scripts/multi_teacher_memory.py [--teachers 1,2,3] [--batch 16] [--length 128] [--out results/multi_teacher_memory.json]

Each K runs in its own process: the packaged MiniLM-L6 encoder with a 20-class head as every teacher (different
head seeds), a 3-layer student made from it, logit KD from the mixture plus a hidden-state loss on the first
teacher, two training steps. Reported: resident memory after loading the models, the peak during the steps
(ru_maxrss), and their difference (what the steps added).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def one(k: int, batch: int, length: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from hf_kd import DistillationConfig, DistillationTrainer, assets, make_student
    torch.manual_seed(0)
    teachers = {}
    for i in range(k):
        torch.manual_seed(i)
        teachers[f"t{i}"] = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=20)
    student = make_student(teachers["t0"], num_layers=3)
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(1000, 20000, (2 * batch, length), generator=g).tolist(),
                              "labels": torch.randint(0, 20, (2 * batch,), generator=g).tolist()})
    args = DistillationConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=batch,
                              report_to=[], use_cpu=True, save_strategy="no", teacher_dtype="model",
                              hidden_weight=1.0, disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher_model=teachers if k > 1 else teachers["t0"], args=args,
                                  train_dataset=data)
    with torch.no_grad():  # weights may be memory-mapped: bring every page in so "loaded" counts them all
        for model in (*teachers.values(), student):
            for p in model.parameters():
                p.data = p.data.clone()
    loaded = rss_mb()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"teachers": k, "loaded_mb": loaded, "peak_mb": peak, "step_added_mb": peak - loaded,
            "batch": batch, "length": length, "load": os.getloadavg()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", default="1,2,3")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.batch, a.length)))
        return {}
    rows = []
    for k in (int(x) for x in a.teachers.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(k), "--batch", str(a.batch), "--length",
                              str(a.length)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    result = {"rows": rows, "command": "python scripts/multi_teacher_memory.py " + " ".join(argv or sys.argv[1:])}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
