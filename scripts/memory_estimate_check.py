"""Check hf_kd.tools.memory's estimate (``hf-kd estimate-memory``) against the memory a real DistillationTrainer step takes.

    python scripts/memory_estimate_check.py [--cases NAME,...] [--threads 1] [--out results/memory_estimate.json]
                                            [--append] | --reestimate results/memory_estimate.json

Each case runs in its own process: a teacher (the packaged SmolLM2-135M, or a small random Llama), a student made
from it with ``make_student``, random token batches (no padding), AdamW, three training steps. Measured, with
glibc's free heap returned (``malloc_trim``) before each reading:

* baseline: resident set (RSS) after the imports and the data, before any model is loaded
* teacher / student weights: RSS added by loading the teacher (weights copied out of the memory map) / the student
* gradients: RSS added between the start of step 1 and its optimizer step (``on_pre_optimizer_step``)
* optimizer state: RSS added by step 1 once the Trainer has freed the gradients (``on_step_end``)
* saved by the forward: bytes of the distinct non-parameter tensors the student's forward saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``; exact, not RSS): the estimate's activations + autocast copies
* step working set: peak RSS of steps 2-3 (``/proc/self/clear_refs`` at the step's start, VmHWM before the optimizer
  step) minus the RSS at the step's start: what the forward, the loss and the backward add over weights + optimizer
* logit loss: the step working set minus what the forward saved (so it also holds the teacher's transient and any
  allocator slack); the estimate's side: its largest phase minus its activations
* peak: the largest VmHWM of the three steps minus the baseline (the estimate's ``peak``; ``total`` is the sum)

each compared with ``hf_kd.tools.memory.estimate`` for the same setup (ratio = estimate / measured).

Every case runs twice: with glibc's allocator as it comes ("glibc": what a CPU user sees; freed heap is kept and
reused only where sizes fit) and with ``MALLOC_MMAP_THRESHOLD_=65536`` ("live": every buffer of 64 KiB or more is
its own mapping, returned on free, so RSS follows the live tensors, which is what the estimate adds up). The
estimate's constants come from reading the code (logit buffers) and from saved-tensor counts on a 2-layer Llama of
width 256 (activations), not from these cases. ``os.getloadavg()`` is recorded with each run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_measure import machine_info, peak_mb, reset_peak, rss_mb  # noqa: E402

MB = 2 ** 20
SYNTH = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=16000, tie_word_embeddings=False)
CASES = {  # name: teacher, student layers, batch, seq_len, kd_impl, precision, teacher dtype, attention
    "smollm2_4x128_chunked": ("smollm2", 15, 4, 128, "chunked", "fp32", "float32", "sdpa"),
    "smollm2_8x256_chunked": ("smollm2", 15, 8, 256, "chunked", "fp32", "float32", "sdpa"),
    "smollm2_4x128_full": ("smollm2", 15, 4, 128, "full", "fp32", "float32", "sdpa"),
    "smollm2_8x256_fused": ("smollm2", 15, 8, 256, "fused", "fp32", "float32", "sdpa"),
    "smollm2_4x128_bf16": ("smollm2", 15, 4, 128, "chunked", "bf16", "bfloat16", "sdpa"),
    "llama_synth_8x256_bf16": ("synthetic", 4, 8, 256, "chunked", "bf16", "bfloat16", "sdpa"),
    "llama_synth_8x256_chunked": ("synthetic", 4, 8, 256, "chunked", "fp32", "float32", "sdpa"),
    "llama_synth_8x256_eager": ("synthetic", 4, 8, 256, "chunked", "fp32", "float32", "eager"),
}
DEFAULT_CASES = [c for c in CASES if c != "llama_synth_8x256_bf16"]  # bf16 on this CPU: ~5 min a case, 1 thread


def trim() -> None:
    """Give glibc's free heap back to the system so that RSS counts live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def live_mb() -> float:
    trim()
    return rss_mb()


def models(name: str, attention: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_kd.tools import assets
    if name == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(assets.smollm2_path(), dtype=torch.float32,
                                                     attn_implementation=attention)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SYNTH, attn_implementation=attention))
    with torch.no_grad():  # weights may be memory-mapped: bring every page in so the load counts them all
        for p in model.parameters():
            p.data = p.data.clone()
    return model


class SavedBytes:
    """Bytes of the distinct non-parameter storages a module's forward saves for backward (last forward)."""

    def __init__(self, module):
        import torch
        self.module, self.bytes, self.seen, self.ctx = module, 0, {}, None
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._hooks = torch.autograd.graph.saved_tensors_hooks
        module.register_forward_pre_hook(self.enter)
        module.register_forward_hook(self.exit)

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def enter(self, *_):
        if self.module.training:
            self.seen, self.ctx = {}, self._hooks(self.pack, lambda t: t)
            self.ctx.__enter__()

    def exit(self, *_):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx, self.bytes = None, sum(self.seen.values())


def run_case(name: str, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import TrainerCallback

    from hf_kd import DistillationConfig, DistillationTrainer, make_student
    teacher_name, layers, batch, seq, impl, precision, teacher_dtype, attention = CASES[name]
    g = torch.Generator().manual_seed(0)
    vocab = 49152 if teacher_name == "smollm2" else SYNTH["vocab_size"]
    ids = torch.randint(100, vocab - 100, (3 * batch, seq), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    base = live_mb()
    teacher = models(teacher_name, attention)
    if teacher_dtype != "float32":
        teacher = teacher.to(getattr(torch, teacher_dtype))
    after_teacher = live_mb()
    student = make_student(teacher, num_layers=layers).to(torch.float32)
    after_student = live_mb()
    saved = SavedBytes(student)
    rec = {"steps": []}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            rec["steps"].append({"begin": live_mb()})
            reset_peak()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            step = rec["steps"][-1]
            step["fwd_bwd_peak"] = peak_mb()
            step["with_grads"] = live_mb()

        def on_step_end(self, args, state, control, **kw):
            step = rec["steps"][-1]
            step["peak"], step["end"], step["saved_activations_mb"] = peak_mb(), live_mb(), saved.bytes / MB

    args = DistillationConfig(output_dir=tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=batch,
                              report_to=[], use_cpu=True, save_strategy="no", teacher_dtype="model", kd_impl=impl,
                              bf16=precision == "bf16", disable_tqdm=True, logging_steps=100, seed=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  callbacks=[Probe()])
    after_trainer = live_mb()
    trainer.train()
    s1, later = rec["steps"][0], rec["steps"][1:]
    measured = {
        "baseline_mb": base, "teacher_weights": after_teacher - base, "student_weights": after_student - after_teacher,
        "trainer_setup": after_trainer - after_student,
        "gradients": s1["with_grads"] - s1["begin"], "optimizer_state": s1["end"] - s1["begin"],
        "saved_by_forward": max(s["saved_activations_mb"] for s in later),
        "step_working_set": max(s["fwd_bwd_peak"] - s["begin"] for s in later),
        "peak": max(s["peak"] for s in rec["steps"]) - base,
    }
    measured["logit_loss"] = measured["step_working_set"] - measured["saved_by_forward"]
    return {"measured_mb": measured, "steps": rec["steps"], "load": os.getloadavg()}


def full_loss_buffers(threads: int) -> dict:
    """The reference (kd_impl='full') loss alone, forward KL at T = 2 plus the task CE on [4, 128, 49152] logits:
    peak RSS above the two logits tensors, in float32 [N, V] buffers (hf_kd.tools.memory.FULL_BUFFERS)."""
    import torch
    import torch.nn.functional as F

    from hf_kd.losses import LOGIT_LOSSES
    torch.set_num_threads(threads)
    b, t, v = 4, 128, 49152
    g = torch.Generator().manual_seed(0)
    leaf = torch.randn(b, t, v, generator=g, requires_grad=True)
    student, teacher, labels = leaf * 1.0, torch.randn(b, t, v, generator=g), torch.randint(0, v, (b, t), generator=g)
    base = live_mb()
    reset_peak()
    ce = F.cross_entropy(student[:, :-1].float().reshape(-1, v), labels[:, 1:].reshape(-1), reduction="sum")
    kd = LOGIT_LOSSES["forward_kl"](student[:, :-1], teacher[:, :-1], temperature=2.0, reduction="sum")
    forward = peak_mb() - base
    held = rss_mb() - base
    unit = b * t * v * 4 / MB
    return {"forward_peak_buffers": round(forward / unit, 3), "held_after_forward_buffers": round(held / unit, 3),
            "loss": float(ce + kd), "load": os.getloadavg()}


def estimate_case(name: str) -> dict:
    """The estimate for a case in MiB, with the measured quantities' counterparts (module doc)."""
    from transformers import AutoConfig, LlamaConfig

    from hf_kd.tools import assets
    from hf_kd.tools.memory import Setup, estimate, student_config
    teacher_name, layers, batch, seq, impl, precision, teacher_dtype, attention = CASES[name]
    cfg = AutoConfig.from_pretrained(assets.smollm2_path()) if teacher_name == "smollm2" else LlamaConfig(**SYNTH)
    e = estimate(cfg, student_config(cfg, layers), Setup(batch, seq, precision=precision, teacher_dtype=teacher_dtype,
                                                          kd_impl=impl, attention=attention))
    c = {k: v / MB for k, v in e.components.items()}
    c["saved_by_forward"] = c["activations"] + c["autocast_copies"]
    c["step_working_set"] = max(e.phases["teacher_forward"], e.phases["forward"], e.phases["backward"]) / MB
    c.update(logit_loss=c["step_working_set"] - c["saved_by_forward"], total=e.total / MB, peak=e.peak / MB)
    return c


COMPARED = ("teacher_weights", "student_weights", "gradients", "optimizer_state", "saved_by_forward", "logit_loss",
            "step_working_set", "peak")
# glibc as it comes, and with every allocation of 64 KiB or more served by mmap and returned on free (no heap reuse
# or retention): the second measures the live tensors, which is what the estimate adds up
ALLOCATORS = {"glibc": {}, "live": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def compare(row: dict) -> dict:
    """(Re)compute a row's estimate and its ratios to the stored measurements with the current hf_kd.tools.memory."""
    est = estimate_case(row["case"])
    row["estimate_mb"] = {k: round(v, 1) for k, v in est.items()}
    row["ratio_estimate_over_measured"] = {}
    for alloc, meas in row["measured_mb"].items():
        ratios = {k: round(est[k] / meas[k], 3) if meas[k] > 1 else None for k in COMPARED}
        ratios["total_over_peak"] = round(est["total"] / meas["peak"], 3)
        row["ratio_estimate_over_measured"][alloc] = ratios
    return row


def measure(name: str, alloc: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
               **ALLOCATORS[alloc])
    proc = subprocess.run([sys.executable, __file__, "--one", name, "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        raise RuntimeError(f"{name} ({alloc}): exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(marker[-1][len("@@RESULT@@"):])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--allocators", default="glibc,live", help=f"comma-separated, of: {', '.join(ALLOCATORS)}")
    parser.add_argument("--out", default=None)
    parser.add_argument("--reestimate", default=None, metavar="JSON",
                        help="Measure nothing: recompute the estimates and ratios of a results file with the current "
                             "hf_kd.tools.memory (written back to it, or to --out).")
    parser.add_argument("--append", action="store_true", help="Keep the other cases already in --out.")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.one:
        got = full_loss_buffers(a.threads) if a.one == "loss_full" else run_case(a.one, a.threads)
        print("@@RESULT@@" + json.dumps(got))
        return {}
    if a.reestimate:
        with open(a.reestimate) as f:
            result = json.load(f)
        result["rows"] = [compare(row) for row in result["rows"]]
        result["reestimated"] = "python scripts/memory_estimate_check.py " + " ".join(argv or sys.argv[1:])
        a.out = a.out or a.reestimate
    else:
        rows = []
        for name in a.cases.split(","):
            if name not in CASES:
                parser.error(f"unknown case {name!r}; known: {', '.join(CASES)}")
            row = {"case": name, "spec": dict(zip(("teacher", "student_layers", "batch", "seq_len", "kd_impl",
                                                    "precision", "teacher_dtype", "attention"), CASES[name])),
                   "measured_mb": {}, "steps_mb": {}, "load": {}}
            for alloc in a.allocators.split(","):
                got = measure(name, alloc, a.threads)
                row["measured_mb"][alloc] = {k: round(v, 1) for k, v in got["measured_mb"].items()}
                row["steps_mb"][alloc], row["load"][alloc] = got["steps"], got["load"]
            rows.append(compare(row))
            print(json.dumps({"case": name, "ratios": row["ratio_estimate_over_measured"], "load": row["load"]}),
                  flush=True)
        command = "python scripts/memory_estimate_check.py " + " ".join(argv or sys.argv[1:])
        result = {"rows": rows, "machine": machine_info(), "load_end": os.getloadavg(), "commands": [command],
                  "full_loss_buffers": {alloc: measure("loss_full", alloc, a.threads)
                                        for alloc in a.allocators.split(",")}}
        if a.append and a.out and os.path.exists(a.out):
            with open(a.out) as f:
                old = json.load(f)
            names = {row["case"] for row in rows}
            result["rows"] = [row for row in old["rows"] if row["case"] not in names] + rows
            result["commands"] = old.get("commands", [old.get("command")]) + [command]
    for row in result["rows"]:
        est, ratios = row["estimate_mb"], row["ratio_estimate_over_measured"]
        print(f"{row['case']:<28} estimate peak {est['peak']:7.0f} MiB, total {est['total']:7.0f}; measured peak "
              + ", ".join(f"{k} {row['measured_mb'][k]['peak']:.0f} (x{r['peak']})" for k, r in ratios.items()))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
