"""On-policy distillation, hf_kd vs TRL, on the same teacher, student, prompts and settings (issue 11, Performance).

hf_kd: ``DistillationTrainer(data_mode="on_policy", lmbda=1)``; TRL: ``trl.DistillationTrainer`` (always on-policy, its
prompts given as the decoded text of the same tokens) and ``trl.experimental.gkd.GKDTrainer`` (lmbda=1).
Both: SmolLM2-135M-Instruct teacher (packaged, float32), one 6-layer student (uniform layers) built once and saved so
both start from identical weights, prompts = the first 32 tokens of packed tales blocks (identical token ids, no
chat template), 32 new tokens sampled at temperature 1 with no top-k / top-p, batch 4, AdamW lr 1e-5 constant,
float32 on CPU, loss = forward KL(teacher || student) at T = 1 on the completion tokens only (TRL beta=0; hf_kd
kd_loss="forward_kl", temperature=1, alpha_task=0). Each trainer runs in its own process. Measured after the
warm-up steps: tokens/s (prompt + generated tokens, up to and including each completion's EOS, per second of
training wall time), the share of that time inside the student's ``generate`` (wrapped with a timer in both), and
the child's peak RSS (``ru_maxrss``, whole run).

Reproduce:  python scripts/on_policy_vs_trl.py            (full: 2 warm-up + 12 steps, -> results/on_policy_vs_trl.json)
            python scripts/on_policy_vs_trl.py --quick    (1 warm-up + 1 step, tiny, for tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hf_kd from this checkout

PROMPT_TOKENS, COMPLETION_TOKENS = 32, 32
CASES = {"hf_kd": "hf_kd on_policy (float32 teacher)", "trl_distill": "TRL 1.16 DistillationTrainer",
         "trl_gkd": "TRL 1.16 GKDTrainer (experimental)",
         "hf_kd_auto": "hf_kd on_policy (default teacher_dtype=auto)"}


def prepare(folder: str, n_rows: int, student_layers: int) -> None:
    """Saves the student (and tokenizer) and the prompt rows every case trains on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd import make_student
    from hf_kd.tools.assets import load_tales, smollm2_path
    from hf_kd.data import pack_for_causal_lm
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    teacher = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    make_student(teacher, num_layers=student_layers, strategy="uniform").save_pretrained(f"{folder}/student")
    tok.save_pretrained(f"{folder}/student")
    blocks = pack_for_causal_lm(load_tales("train"), tok, PROMPT_TOKENS + COMPLETION_TOKENS, max_blocks=n_rows)
    rows = [list(r["input_ids"]) for r in blocks.select(range(n_rows))]
    with open(f"{folder}/rows.json", "w") as f:
        json.dump(rows, f)


class Meter:
    """Wraps ``model.generate``: seconds inside it and tokens it produced (prompt + completion up to its EOS)."""

    def __init__(self, model, eos_ids: set[int]):
        self.calls, self.eos = [], eos_ids  # (start, seconds, tokens)
        inner = model.generate

        def generate(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            seqs = out if hasattr(out, "shape") else out.sequences
            width = kwargs["input_ids"].shape[1]
            prompt = int(kwargs["attention_mask"].sum())
            done = 0
            for row in seqs[:, width:].tolist():
                ends = [i for i, t in enumerate(row) if t in self.eos]
                done += ends[0] + 1 if ends else len(row)
            self.calls.append((start, time.perf_counter() - start, prompt + done))
            return out
        model.generate = generate


def child(case: str, folder: str, warmup: int, steps: int, batch: int, new_tokens: int, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from hf_kd.tools.assets import smollm2_path
    from hf_kd.data.generation import eos_ids_of
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(f"{folder}/student")
    teacher = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(f"{folder}/student", dtype=torch.float32)
    meter = Meter(student, eos_ids_of(student, tok))
    with open(f"{folder}/rows.json") as f:
        rows = json.load(f)[:(warmup + steps) * batch]
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    common = dict(output_dir=f"{folder}/out_{case}", max_steps=warmup + steps, per_device_train_batch_size=batch,
                  learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to="none", seed=0,
                  dataloader_num_workers=0, disable_tqdm=True, use_cpu=True, bf16=False)
    data = Dataset.from_list([{"input_ids": r, "labels": [-100] * PROMPT_TOKENS + r[PROMPT_TOKENS:]} for r in rows])
    if case.startswith("hf_kd"):
        from hf_kd import DistillationConfig, DistillationTrainer
        args = DistillationConfig(**common, data_mode="on_policy", lmbda=1.0, max_new_tokens=new_tokens,
                                  generation_temperature=1.0, top_p=1.0, top_k=0, temperature=1.0, alpha_task=0.0,
                                  kd_weight=1.0, kd_loss="forward_kl", hidden_weight=0.0,
                                  teacher_dtype="auto" if case == "hf_kd_auto" else "float32")
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      processing_class=tok, callbacks=[Clock()])
    elif case == "trl_distill":  # always on-policy; takes text prompts and tokenises them itself
        from trl import DistillationConfig as TrlConfig
        from trl import DistillationTrainer as TrlTrainer
        prompts = Dataset.from_list([{"prompt": tok.decode(r[:PROMPT_TOKENS])} for r in rows])
        args = TrlConfig(**common, beta=0.0, temperature=1.0, max_completion_length=new_tokens, top_p=1.0, top_k=0,
                         gradient_checkpointing=False, shuffle_dataset=False)
        trainer = TrlTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                             processing_class=tok, callbacks=[Clock()])
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        def collate(features):  # every prompt has PROMPT_TOKENS tokens: no padding needed
            ids = torch.tensor([f["input_ids"] for f in features])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.tensor([f["labels"] for f in features]),
                    "prompts": ids[:, :PROMPT_TOKENS], "prompt_attention_mask": torch.ones_like(ids[:, :PROMPT_TOKENS])}
        args = GKDConfig(**common, lmbda=1.0, beta=0.0, temperature=1.0, max_new_tokens=new_tokens,
                         gradient_checkpointing=False, max_length=None, remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True})
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                             train_dataset=data, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    assert len(ends) == warmup + steps, (len(ends), warmup, steps)
    start, stop = ends[warmup - 1], ends[-1]
    timed = [c for c in meter.calls if c[0] >= start]
    seconds, gen_seconds, tokens = stop - start, sum(c[1] for c in timed), sum(c[2] for c in timed)
    return {"case": case, "label": CASES[case], "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup, "batch": batch,
            "generate_calls": len(timed), "seconds": round(seconds, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2), "generation_share": round(gen_seconds / seconds, 4),
            "s_per_step": round(seconds / steps, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def machine() -> dict:
    import torch
    import transformers
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    from hf_kd.tools.report import cpu_name
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version, "python": platform.python_version()}


def table(rows: list[dict]) -> str:
    refs = [r for case in ("trl_distill", "trl_gkd") for r in rows if r["case"] == case]
    lines = ["| case | s/step | tokens/s | " + " | ".join(f"x {r['label']}" for r in refs)
             + " | generation share | peak RSS (MB) |", "|---|---:|---:|" + "---:|" * (len(refs) + 2)]
    for r in rows:
        ratios = "".join(f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f} | " for ref in refs)
        lines.append(f"| {r['label']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.1f} | {ratios}"
                     f"{r['generation_share']:.0%} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 warm-up + 1 timed step, batch 2, 8 new tokens, 2-layer "
                   "student, hf_kd and TRL only (tests)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0 = torch's default)")
    p.add_argument("--max-new-tokens", type=int, default=COMPLETION_TOKENS)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cases", default="hf_kd,trl_distill,trl_gkd")
    p.add_argument("--out", default="results/on_policy_vs_trl.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.folder, a.warmup, a.steps, a.batch, a.max_new_tokens,
                                                 a.threads)), flush=True)
        return
    if a.quick:
        a.steps, a.warmup, a.batch, a.max_new_tokens, a.cases = 1, 1, 2, 8, "hf_kd,trl_distill"
    layers = 2 if a.quick else 6
    cases = a.cases.split(",")
    info = {**machine(), "loadavg_before": os.getloadavg()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="on_policy_vs_trl_") as folder:
        prepare(folder, (a.warmup + a.steps) * a.batch, layers)
        for case in cases:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--folder", folder,
                   "--warmup", str(a.warmup), "--steps", str(a.steps), "--batch", str(a.batch),
                   "--max-new-tokens", str(a.max_new_tokens), "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not found:
                sys.exit(f"{case} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            rows.append(json.loads(found[-1][len("RESULT "):]))
            print(f"{case}: {rows[-1]}", flush=True)
    info["loadavg_after"] = os.getloadavg()
    setup = {"teacher": "SmolLM2-135M-Instruct (packaged, float32)",
             "student": f"{layers} of its 30 layers, uniform", "prompt_tokens": PROMPT_TOKENS,
             "max_new_tokens": a.max_new_tokens, "threads": a.threads or "torch default", "sampling": "temperature 1, no top-k, no top-p", "lmbda": 1.0,
             "loss": "forward KL(teacher||student), T=1, completion tokens (TRL beta=0; hf_kd kd_loss=forward_kl)",
             "optimizer": "AdamW lr 1e-5 constant", "batch": a.batch, "warmup_steps": a.warmup, "steps": a.steps,
             "quick": a.quick, "command": " ".join(["python", "scripts/on_policy_vs_trl.py"] + sys.argv[1:])}
    print(table(rows))
    print(f"load average before {info['loadavg_before']}, after {info['loadavg_after']}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"setup": setup, "machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
