"""The jobs of scripts/benchmark.py, each run in its own process: ``prepare`` (models, packed blocks and teacher
caches on disk), ``run_case`` (one end-to-end training case) and ``run_loss_case`` (one KD loss alone).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time

from bench_measure import Window, peak_mb, reset_peak, rss_mb, setup_torch

CASES = ("full", "chunked", "fused", "cache", "trl", "floor", "student")
EXTRA_CASES = ("chunked_kl", "fused_kl")  # not run by default: hf_kd without its task CE, TRL GKD's loss terms
HF_KD_CASES = ("full", "chunked", "fused", "cache", "chunked_kl", "fused_kl")
LOSS_IMPLS = ("naive", "chunked", "fused", "naive_head", "chunked_head")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
# Synthetic large-vocabulary pair: a small Qwen2-shaped model with Qwen2's vocabulary size.
SYNTH = "qwen151k"
MODELS = ("smollm2", SYNTH)


# ---- preparation: models, blocks and caches on disk ------------------------------------------------------

def synthetic_config(hidden: int, layers: int, vocab: int = 151_936):
    """A Qwen2-shaped config (Qwen2.5-0.5B's widths by default) with a large vocabulary and few layers."""
    from transformers import Qwen2Config
    heads = max(hidden // 64, 1)
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 5.43) // 64 * 64 or 64,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 7, 1),
                       max_position_embeddings=4096, tie_word_embeddings=True, use_cache=False,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def cache_dir_name(k: int, size_key: str, teacher_dtype: str = "float32") -> str:
    """Folder of the teacher cache built by a ``teacher_dtype`` teacher (float32: the name caches always had)."""
    return f"cache_k{k}_{size_key}" + ("" if teacher_dtype == "float32" else f"_{teacher_dtype}")


def load_teacher(path: str, teacher_dtype: str = "float32"):
    """The teacher loaded in float32 (as saved) and then cast to ``teacher_dtype``; no KV cache."""
    import torch
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher.config.use_cache = False
    return teacher if teacher_dtype == "float32" else teacher.to(getattr(torch, teacher_dtype))


def prepare(spec: dict) -> dict:
    """Save students (and the synthetic teacher), packed blocks per size, and a teacher cache per model/size.

    The cache is built by the teacher cast to ``spec["teacher_dtype"]`` (a float32 teacher's cache keeps its old
    folder name, so existing caches are reused; other dtypes get their own folder).
    """
    torch = setup_torch(spec["threads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.tools.assets import load_tales, smollm2_path
    from hf_kd.data import pack_for_causal_lm
    from hf_kd.tools.student import make_student
    from hf_kd.teachers.cache import build_teacher_cache
    work = spec["workdir"]
    os.makedirs(work, exist_ok=True)
    tok_dir = smollm2_path()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = {"tokenizer": tok_dir, "models": {}, "blocks": {}, "caches": {}}
    text = load_tales("train")
    for size in spec["sizes"]:
        b, t = size
        n = b * spec["steps_total"]
        path = os.path.join(work, f"blocks_{t}_{n}")
        if not os.path.isdir(path):
            pack_for_causal_lm(text, tok, t, max_blocks=n).save_to_disk(path)
        out["blocks"][f"{b}x{t}"] = path
    for name in spec["models"]:
        mdir = os.path.join(work, name)
        teacher_dir, student_dir = (smollm2_path() if name == "smollm2" else os.path.join(mdir, "teacher"),
                                    os.path.join(mdir, "student"))
        if name == SYNTH and not os.path.isfile(os.path.join(teacher_dir, "config.json")):
            torch.manual_seed(0)
            cfg = synthetic_config(spec["synth_hidden"], spec["synth_layers"])
            AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(teacher_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        teacher.config.use_cache = False
        if not os.path.isfile(os.path.join(student_dir, "config.json")):
            n_layers = teacher.config.num_hidden_layers // 2
            make_student(teacher, num_layers=n_layers, strategy="uniform").save_pretrained(student_dir)
        out["models"][name] = {"teacher": teacher_dir, "student": student_dir,
                               "vocab": teacher.config.vocab_size, "hidden": teacher.config.hidden_size,
                               "teacher_layers": teacher.config.num_hidden_layers,
                               "student_layers": teacher.config.num_hidden_layers // 2,
                               "teacher_params": sum(p.numel() for p in teacher.parameters())}
        if "cache" in spec["cases"]:
            from datasets import load_from_disk
            dtype = spec.get("teacher_dtype", "float32")
            cache_teacher = teacher if dtype == "float32" else teacher.to(getattr(torch, dtype))
            for size in spec["sizes"]:
                key = f"{size[0]}x{size[1]}"
                cdir = os.path.join(mdir, cache_dir_name(spec["k"], key, dtype))
                if not os.path.isfile(os.path.join(cdir, "hf_kd_teacher_cache.json")):
                    build_teacher_cache(cache_teacher, load_from_disk(out["blocks"][key]), cdir, k=spec["k"],
                                        temperature=spec["temperature"], batch_size=8, teacher_name=name)
                with open(os.path.join(cdir, "hf_kd_teacher_cache.json")) as f:
                    out["caches"][f"{name}/{key}"] = {"path": cdir, "teacher_dtype": dtype, **json.load(f)}
            del cache_teacher
        del teacher
        gc.collect()
    return out


# ---- end-to-end cases ---------------------------------------------------------------------------------------

def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    return StepTimer()


def _common_args(spec: dict, out_dir: str) -> dict:
    """Arguments every case's TrainingArguments / DistillationConfig / GKDConfig shares. ``bf16`` = the student's
    CPU bf16 autocast (--student-bf16)."""
    return dict(output_dir=out_dir, bf16=bool(spec.get("student_bf16", False)),
                max_steps=spec["warmup"] + spec["steps"],
                per_device_train_batch_size=spec["batch"], learning_rate=1e-4, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_strategy="no", save_strategy="no",
                report_to="none", seed=0, dataloader_num_workers=0, disable_tqdm=True,
                use_cpu=spec.get("device", "cpu") == "cpu")


def build_trainer(case: str, spec: dict, student, teacher, train_dataset, tokenizer, out_dir: str):
    """The Trainer of one end-to-end case (all share data, batch, optimizer, seed and schedule)."""
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_kd import DistillationConfig, DistillationTrainer
    common = _common_args(spec, out_dir)
    kw = dict(train_dataset=train_dataset, data_collator=default_data_collator)
    if case in HF_KD_CASES:
        extra = {"teacher_cache": spec["cache_dir"]} if case == "cache" else {}
        impl = {"full": "full", "chunked": "auto", "fused": "fused", "cache": "auto", "chunked_kl": "auto",
                "fused_kl": "fused"}[case]
        chunk = {"kd_chunk_size": spec["chunk_size"]} if spec.get("chunk_size") else {}
        alpha = 0.0 if case.endswith("_kl") else 1.0
        args = DistillationConfig(**common, temperature=spec["temperature"], alpha_task=alpha, kd_weight=1.0,
                                  kd_loss="forward_kl", hidden_weight=0.0, kd_impl=impl,
                                  teacher_dtype=spec.get("teacher_dtype", "float32"), **chunk, **extra)
        if case == "cache":
            return DistillationTrainer(model=student, args=args, data_collator=default_data_collator)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, **kw)
    if case == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        # lmbda=0: always the dataset's sequences (supervised); beta=0: forward KL. TRL's own defaults
        # (bf16 autocast on CPU, gradient checkpointing) are switched off so precision and compute match; bf16
        # comes from ``common`` (on only with --student-bf16, as for the other cases).
        args = GKDConfig(**common, lmbda=0.0, beta=0.0, temperature=spec["temperature"],
                         gradient_checkpointing=False, max_length=None, remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True})
        return GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer, **kw)

    class FloorTrainer(Trainer):
        """Plain CE training of the student, plus (floor) a teacher forward whose output is dropped."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if teacher is not None:
                with torch.no_grad():
                    teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                            use_cache=False)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    if case == "floor":
        teacher.eval().requires_grad_(False)
    return FloorTrainer(model=student, args=TrainingArguments(**common), **kw)


def run_case(spec: dict) -> dict:
    """One end-to-end case in this process: load, build the trainer, train warmup + steps, measure."""
    torch = setup_torch(spec["threads"])
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    case = spec["case"]
    teacher_dtype, student_bf16 = spec.get("teacher_dtype", "float32"), bool(spec.get("student_bf16", False))
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = None
    if case not in ("cache", "student"):
        teacher = load_teacher(spec["teacher"], teacher_dtype)
    student.config.use_cache = False
    blocks = load_from_disk(spec["blocks"])
    with tempfile.TemporaryDirectory(prefix="hf_kd_bench_") as out_dir:
        trainer = build_trainer(case, spec, student, teacher, blocks, tokenizer, os.path.join(out_dir, "run"))
        timer = _step_timer()
        trainer.add_callback(timer)
        gc.collect()
        load_peak = peak_mb()
        start_rss = rss_mb()
        reset_ok = reset_peak()
        with Window() as win:
            trainer.train()
        train_peak = peak_mb()
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    measured = steps[spec["warmup"]:]
    tokens = spec["batch"] * spec["seq"]
    med = statistics.median(measured)
    return {"case": case, "model": spec["model"], "batch": spec["batch"], "seq": spec["seq"], "tokens_per_step": tokens,
            "step_times_s": steps, "warmup_steps": spec["warmup"], "step_s": med,
            "step_s_mean": statistics.mean(measured), "tokens_per_s": tokens / med,
            "rss_start_mb": start_rss, "peak_train_mb": train_peak if reset_ok else max(train_peak, load_peak),
            "peak_load_mb": load_peak, "peak_reset": reset_ok, "other_cpu_cores": win.other_cores,
            "threads": torch.get_num_threads(), "teacher_dtype": teacher_dtype, "student_bf16": student_bf16}


# ---- loss alone -------------------------------------------------------------------------------------------

def run_loss_case(spec: dict) -> dict:
    """Forward + backward of one KD loss implementation at ``tokens`` positions; time and added memory."""
    torch = setup_torch(spec["threads"])
    import torch.nn.functional as F

    from hf_kd.losses import chunked_forward_kl, forward_kl, fused_kd_loss
    impl, n, v, d, chunk, temp = (spec[k] for k in ("impl", "tokens", "vocab", "hidden", "chunk_size",
                                                     "temperature"))
    g = torch.Generator().manual_seed(0)
    leaves = []
    if impl in ("naive", "chunked"):
        zs = (torch.randn(n, v, generator=g) * 3).requires_grad_()
        zt = torch.randn(n, v, generator=g) * 3
        leaves = [zs]
    else:
        hs = torch.randn(n, d, generator=g).requires_grad_()
        ws = (torch.randn(v, d, generator=g) * d ** -0.5 * 3).requires_grad_()
        ht = torch.randn(n, d, generator=g)
        wt = torch.randn(v, d, generator=g) * d ** -0.5 * 3
        leaves = [hs, ws]

    def step():
        if impl == "naive":
            loss = forward_kl(zs, zt, temperature=temp, reduction="sum")
        elif impl == "chunked":
            loss = chunked_forward_kl(zs, zt, temperature=temp, reduction="sum", chunk_size=chunk)
        elif impl == "fused":
            loss = fused_kd_loss(hs, ws, ht, wt, temperature=temp, reduction="sum", chunk_size=chunk)
        else:
            s_logits = F.linear(hs, ws)
            with torch.no_grad():
                t_logits = F.linear(ht, wt)
            fn = forward_kl if impl == "naive_head" else (
                lambda a, b, **kw: chunked_forward_kl(a, b, chunk_size=chunk, **kw))
            loss = fn(s_logits, t_logits, temperature=temp, reduction="sum")
            del s_logits, t_logits
        loss.backward()
        return float(loss.detach())

    times, added, above = [], [], []
    for rep in range(spec["warmup"] + spec["reps"]):
        for p in leaves:
            p.grad = None
        gc.collect()
        base = rss_mb()
        reset_peak()
        t0 = time.perf_counter()
        value = step()
        dt = time.perf_counter() - t0
        grad_mb = sum(p.grad.numel() * p.grad.element_size() for p in leaves) / 2 ** 20
        if rep >= spec["warmup"]:
            times.append(dt)
            above.append(peak_mb() - base)
            added.append(peak_mb() - base - grad_mb)
    inputs_mb = sum(x.numel() * x.element_size() for x in ([zs, zt] if impl in ("naive", "chunked")
                                                           else [hs, ws, ht, wt])) / 2 ** 20
    return {"impl": impl, "tokens": n, "vocab": v, "hidden": d, "chunk_size": chunk, "time_s": statistics.median(times),
            "times_s": times, "added_mb": max(added), "above_inputs_mb": max(above), "inputs_mb": inputs_mb,
            "grad_mb": grad_mb, "loss": value}


def naive_bytes(n: int, v: int, impl: str) -> float:
    """Rough upper estimate of what the naive loss case needs (inputs + ~8 [n, v] float32 temporaries)."""
    return (3 + 8) * n * v * 4 if impl.startswith("naive") else 4 * n * v * 4 + 6 * 2048 * v * 4
