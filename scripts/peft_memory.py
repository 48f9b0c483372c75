"""Memory of LoRA self-distillation: the teacher as a second copy of the base vs SameBaseTeacher (the student's own
base with its adapters disabled, hf_kd.tools.peft_utils).

    python scripts/peft_memory.py [--batch 2] [--length 64] [--out results/peft_memory.json]

Each way runs in its own process: SmolLM2-135M-Instruct (float32, the packaged asset) with LoRA r=8 on q_proj/v_proj
as the student, forward-KL distillation from (a) a second copy of the base loaded from the same folder or (b)
SameBaseTeacher(student), two training steps. Reported: the bytes of distinct weights the student and teacher hold
together (shared storage counted once), resident memory after loading, the peak during the steps (ru_maxrss), and
the seconds per step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

WAYS = ("separate_copy", "same_base")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def one(way: str, batch: int, length: int) -> dict:
    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_kd import DistillationConfig, DistillationTrainer, assets
    from hf_kd.tools.peft_utils import SameBaseTeacher, parameter_bytes
    torch.manual_seed(0)
    path = assets.smollm2_path()
    student = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                  peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    teacher = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) if way == "separate_copy"
               else SameBaseTeacher(student))
    held = teacher if way == "separate_copy" else teacher.get_base_model()  # the teacher's weights
    with torch.no_grad():  # weights may be memory-mapped: bring every page in so "loaded" counts them all
        for model in {id(m): m for m in (student, held)}.values():
            for p in model.parameters():
                p.data = p.data.clone()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (2 * batch, length), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = DistillationConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=batch,
                              report_to=[], use_cpu=True, save_strategy="no", teacher_dtype="model",
                              hidden_weight=0.0, disable_tqdm=True, logging_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    weights = parameter_bytes(student, held)
    loaded = rss_mb()
    start = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - start) / 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"way": way, "weights_mb": weights / 2**20, "loaded_mb": loaded, "peak_mb": peak,
            "seconds_per_step": seconds, "batch": batch, "length": length}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", choices=WAYS, default=None, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.batch, a.length)))
        return {}
    rows = []
    for way in WAYS:
        out = subprocess.run([sys.executable, __file__, "--one", way, "--batch", str(a.batch), "--length",
                              str(a.length)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    result = {"rows": rows, "saved_weights_mb": rows[0]["weights_mb"] - rows[1]["weights_mb"],
              "saved_peak_mb": rows[0]["peak_mb"] - rows[1]["peak_mb"],
              "command": "python scripts/peft_memory.py " + " ".join(argv or sys.argv[1:])}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
