"""Speed and memory of hf_kd's distillation paths against a naive loss, TRL's GKDTrainer and the floor.

    python scripts/benchmark.py --out outputs/benchmark/benchmark.json          # the real run (~1 h on 2 cores)
    python scripts/benchmark.py --quick --out outputs/benchmark/quick.json      # smoke run (~3 min)
    python scripts/benchmark.py --only loss --out ...                           # loss-alone part only
    python scripts/benchmark.py --only e2e --models smollm2 --sizes 8x128 ...   # end-to-end part only

Every case runs in its own subprocess (``python scripts/benchmark.py --child SPEC_JSON``) with torch threads = 2,
so memory peaks never mix. Peak memory is the process's peak resident set (VmHWM = getrusage's ru_maxrss), reset
with ``/proc/self/clear_refs`` just before the measured phase, so model loading does not count; each child also
runs under RLIMIT_DATA so a case that cannot fit fails with an allocation error instead of waking the OOM killer.

End to end (same machine, same models, same packed tales blocks, same sequence length, same AdamW optimizer,
Trainer's own loop with ``max_steps``, logging off, no saving; step time = time between Trainer's
``on_step_end`` callbacks, the first ``--warmup`` steps excluded):

* ``full``     hf_kd, kd_impl="full": the reference loss, log-softmax over all [B, T, V] of both models
* ``chunked``  hf_kd default (kd_impl="auto" = chunked)
* ``fused``    hf_kd, kd_impl="fused" (no [B, T, V] logits: losses from hidden states + LM heads)
* ``cache``    hf_kd from an offline top-k teacher cache (built beforehand on the same blocks; no teacher)
* ``trl``      TRL GKDTrainer, supervised (lmbda=0, beta=0), fp32, no gradient checkpointing
* ``floor``    teacher forward alone (no_grad, use_cache=False) + a plain Trainer CE step of the student
* ``student``  the student's CE training step alone (no teacher): the reference for the cache's speed

hf_kd cases use the clm job's loss (alpha_task=1, kd_weight=1, forward KL at T=2, no hidden-state loss).

Loss alone (``--only loss``): forward + backward of the forward-KL loss at ``--loss-tokens`` positions, given
logits (``naive`` = hf_kd.losses.forward_kl, ``chunked``) or hidden states + LM heads (``fused``; and
``naive_head`` / ``chunked_head`` which compute the logits from the same hidden states inside the measured
region, the fair time comparison for fused). "Added" memory = peak RSS - RSS with the inputs and weights in
memory - the bytes of the gradients the loss returns (dL/dlogits, or dL/dh and dL/dW). When the naive loss
cannot fit in free memory at the requested size it is measured at the largest fraction that fits and scaled
linearly in tokens (marked "scaled from N").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
CASES = ("full", "chunked", "fused", "cache", "trl", "floor", "student")
CASE_LABELS = {
    "full": "(a) naive full-logit KD (kd_impl=full)",
    "chunked": "(b) hf_kd default (auto = chunked)",
    "fused": "(c) hf_kd fused",
    "cache": "(d) hf_kd from offline cache",
    "trl": "(e) TRL GKDTrainer (lmbda=0, beta=0)",
    "floor": "(f) floor: teacher fwd + student CE",
    "student": "student CE alone (no teacher)",
}
LOSS_IMPLS = ("naive", "chunked", "fused", "naive_head", "chunked_head")
# Synthetic large-vocabulary pair: a small Qwen2-shaped model with Qwen2's vocabulary size.
SYNTH = "qwen151k"
MODELS = ("smollm2", SYNTH)


# ---- process measurements ------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """Peak resident set of this process since start or the last reset_peak() (== ru_maxrss on Linux)."""
    return _status_mb("VmHWM")


def reset_peak() -> bool:
    """Reset the peak resident set (Linux >= 4.0: also resets getrusage's ru_maxrss). False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all processes) from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Window:
    """Wall time, own CPU time and the other processes' CPU use (in cores) over a measured phase."""

    def __enter__(self):
        self.t0, self.busy0, self.self0 = time.perf_counter(), cpu_busy_s(), self_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy, own = cpu_busy_s() - self.busy0, self_cpu_s() - self.self0
        self.other_cores = max(busy - own, 0.0) / max(self.wall, 1e-9)
        return False


def limit_memory(gb: float | None) -> None:
    if not gb:
        return
    import resource
    limit = int(gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def available_gb() -> float:
    try:
        import psutil
        return psutil.virtual_memory().available / (1 << 30)
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return info.get("MemAvailable", 0) / (1 << 20)


def setup_torch(threads: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    torch.set_num_threads(threads)
    return torch


# ---- preparation: models, blocks and caches on disk ------------------------------------------------------

def synthetic_config(hidden: int, layers: int, vocab: int = 151_936):
    """A Qwen2-shaped config (Qwen2.5-0.5B's widths by default) with a large vocabulary and few layers."""
    from transformers import Qwen2Config
    heads = max(hidden // 64, 1)
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 5.43) // 64 * 64 or 64,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 7, 1),
                       max_position_embeddings=4096, tie_word_embeddings=True, use_cache=False,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def prepare(spec: dict) -> dict:
    """Save students (and the synthetic teacher), packed blocks per size, and a teacher cache per model/size."""
    torch = setup_torch(spec["threads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.assets import load_tales, smollm2_path
    from hf_kd.data import pack_for_causal_lm
    from hf_kd.student import make_student
    from hf_kd.teacher_cache import build_teacher_cache
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
            for size in spec["sizes"]:
                key = f"{size[0]}x{size[1]}"
                cdir = os.path.join(mdir, f"cache_k{spec['k']}_{key}")
                if not os.path.isfile(os.path.join(cdir, "hf_kd_teacher_cache.json")):
                    build_teacher_cache(teacher, load_from_disk(out["blocks"][key]), cdir, k=spec["k"],
                                        temperature=spec["temperature"], batch_size=8, teacher_name=name)
                with open(os.path.join(cdir, "hf_kd_teacher_cache.json")) as f:
                    out["caches"][f"{name}/{key}"] = {"path": cdir, **json.load(f)}
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
    return dict(output_dir=out_dir, max_steps=spec["warmup"] + spec["steps"],
                per_device_train_batch_size=spec["batch"], learning_rate=1e-4, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_strategy="no", save_strategy="no",
                report_to="none", seed=0, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)


def build_trainer(case: str, spec: dict, student, teacher, train_dataset, tokenizer, out_dir: str):
    """The Trainer of one end-to-end case (all share data, batch, optimizer, seed and schedule)."""
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_kd import DistillationConfig, DistillationTrainer
    common = _common_args(spec, out_dir)
    kw = dict(train_dataset=train_dataset, data_collator=default_data_collator)
    if case in ("full", "chunked", "fused", "cache"):
        extra = {"teacher_cache": spec["cache_dir"]} if case == "cache" else {}
        impl = {"full": "full", "chunked": "auto", "fused": "fused", "cache": "auto"}[case]
        chunk = {"kd_chunk_size": spec["chunk_size"]} if spec.get("chunk_size") else {}
        args = DistillationConfig(**common, temperature=spec["temperature"], alpha_task=1.0, kd_weight=1.0,
                                  kd_loss="forward_kl", hidden_weight=0.0, kd_impl=impl, **chunk, **extra)
        if case == "cache":
            return DistillationTrainer(model=student, args=args, data_collator=default_data_collator)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, **kw)
    if case == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        # lmbda=0: always the dataset's sequences (supervised); beta=0: forward KL. TRL's own defaults
        # (bf16 autocast on CPU, gradient checkpointing) are switched off so precision and compute match.
        args = GKDConfig(**common, lmbda=0.0, beta=0.0, temperature=spec["temperature"], bf16=False,
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
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = None
    if case not in ("cache", "student"):
        teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
        teacher.config.use_cache = False
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
            "threads": torch.get_num_threads()}


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


# ---- the orchestrating parent -------------------------------------------------------------------------------

def child(kind: str, spec: dict, mem_gb: float | None, timeout: int = 7200) -> dict:
    """Run ``kind`` (prepare / case / loss) in a fresh interpreter; its JSON result or an error record."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 2)), MKL_NUM_THREADS=str(spec.get("threads", 2)),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONWARNINGS="ignore")
    payload = json.dumps({"kind": kind, "spec": spec, "mem_gb": mem_gb})
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, HERE, "--child", payload], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-900:], "wall_s": time.time() - t0}
    result = json.loads(marker[-1][len("@@RESULT@@"):])
    result["wall_s"] = time.time() - t0
    return result


def child_main(payload: str) -> None:
    job = json.loads(payload)
    limit_memory(job.get("mem_gb"))
    fn = {"prepare": prepare, "case": run_case, "loss": run_loss_case}[job["kind"]]
    result = fn(job["spec"])
    print("@@RESULT@@" + json.dumps(result), flush=True)


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 60) -> dict:
    """Poll the 1-minute load average until it is below ``max_load`` (or give up after ``max_wait_s``)."""
    t0 = time.time()
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.time() - t0 >= max_wait_s:
            return {"load_1min": load, "waited_s": round(time.time() - t0), "quiet": load < max_load}
        print(f"load average {load:.2f} >= {max_load}: waiting {poll_s:.0f} s", flush=True)
        time.sleep(poll_s)


def best_of_rounds(runs: list[dict]) -> list[dict]:
    """One row per (model, size, case): the fastest successful run, with the largest peak over the runs."""
    groups = {}
    for r in runs:
        groups.setdefault((r["model"], r["size"], r["case"]), []).append(r)
    out = []
    for items in groups.values():
        ok = [r for r in items if "error" not in r]
        if not ok:
            out.append(items[-1])
            continue
        best = dict(min(ok, key=lambda r: r["step_s"]))
        best["peak_train_mb"] = max(r["peak_train_mb"] for r in ok)
        best["rounds_step_s"] = [r["step_s"] for r in ok]
        out.append(best)
    return out


def parse_size(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:,.{nd}f}"


def e2e_table(rows: list[dict]) -> str:
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["size"]), []).append(r)
    for (model, size), items in groups.items():
        floor = next((r for r in items if r["case"] == "floor" and "error" not in r), None)
        b, t = parse_size(size)
        lines += [f"\n**{model}, {size} = {b * t:,} tokens per step**\n",
                  "| case | step (s) | tokens/s | x floor step | peak RSS train (MB) | RSS at start (MB) | "
                  "peak - start (MB) | other CPU (cores) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in items:
            if "error" in r:
                lines.append(f"| {CASE_LABELS[r['case']]} | failed: {r['error'][:160]} | | | | | | |")
                continue
            ratio = r["step_s"] / floor["step_s"] if floor else None
            lines.append(f"| {CASE_LABELS[r['case']]} | {_fmt(r['step_s'])} | {_fmt(r['tokens_per_s'], 0)} | "
                         f"{_fmt(ratio)} | {_fmt(r['peak_train_mb'], 0)} | {_fmt(r['rss_start_mb'], 0)} | "
                         f"{_fmt(r['peak_train_mb'] - r['rss_start_mb'], 0)} | {_fmt(r['other_cpu_cores'])} |")
    return "\n".join(lines)


def loss_table(rows: list[dict]) -> str:
    lines = ["| vocab | impl | tokens | chunk | time (s) | added peak (MB) | above inputs (MB) | naive/this memory "
             "| this/naive time |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['vocab']:,} | {r['impl']} | {r['tokens']} | | failed: {r['error'][:120]} | | | | |")
            continue
        ref_name = "naive_head" if r["impl"] in ("fused", "naive_head", "chunked_head") else "naive"
        ref = next((x for x in rows if x["impl"] == ref_name and x["vocab"] == r["vocab"] and "error" not in x
                    and x["tokens"] == r["tokens"]), None)
        mem = ref["added_mb"] / max(r["added_mb"], 1.0) if ref else None
        tim = r["time_s"] / ref["time_s"] if ref else None
        note = f" (scaled from {r['measured_tokens']})" if r.get("measured_tokens") else ""
        lines.append(f"| {r['vocab']:,} | {r['impl']}{note} | {r['tokens']:,} | {r['chunk_size']} | "
                     f"{_fmt(r['time_s'])} | {_fmt(r['added_mb'], 0)} | {_fmt(r['above_inputs_mb'], 0)} | "
                     f"{_fmt(mem, 1)} | {_fmt(tim)} |")
    return "\n".join(lines)


def targets(e2e: list[dict], losses: list[dict], caches: dict) -> list[dict]:
    """The issue's targets as measured ratios (met or not)."""
    out = []

    def add(name, value, goal, ok):
        out.append({"target": name, "measured": value, "goal": goal, "met": ok})

    for v in sorted({r["vocab"] for r in losses if "error" not in r}):
        by = {r["impl"]: r for r in losses if r["vocab"] == v and "error" not in r and r.get("chunk_size") is not None
              and not r.get("sweep")}
        for impl, ref in (("chunked", "naive"), ("fused", "naive_head"), ("fused", "naive")):
            if impl in by and ref in by:
                m = by[ref]["added_mb"] / max(by[impl]["added_mb"], 1.0)
                t = by[impl]["time_s"] / by[ref]["time_s"]
                add(f"loss alone V={v:,}, {by[impl]['tokens']:,} tokens: {impl} added memory, {ref}/{impl}",
                    round(m, 1), ">= 10", m >= 10)
                add(f"loss alone V={v:,}: {impl} time / {ref} time", round(t, 2), "<= 1.0", t <= 1.0)
    groups = {}
    for r in e2e:
        if "error" not in r:
            groups.setdefault((r["model"], r["size"]), {})[r["case"]] = r
    for (model, size), c in groups.items():
        tag = f"{model} {size}"
        if "floor" in c:
            for case, goal in (("chunked", 1.10), ("fused", 1.05)):
                if case in c:
                    x = c[case]["step_s"] / c["floor"]["step_s"]
                    add(f"{tag}: {case} step / floor step", round(x, 3), f"<= {goal}", x <= goal)
        if "trl" in c:
            for case in ("chunked", "fused"):
                if case in c:
                    x = c[case]["tokens_per_s"] / c["trl"]["tokens_per_s"]
                    add(f"{tag}: {case} tokens/s / TRL tokens/s", round(x, 2), ">= 1.5", x >= 1.5)
                    y = c[case]["peak_train_mb"] / c["trl"]["peak_train_mb"]
                    add(f"{tag}: {case} peak RSS / TRL peak RSS", round(y, 2), "<= 0.5", y <= 0.5)
                    w = ((c[case]["peak_train_mb"] - c[case]["rss_start_mb"])
                         / max(c["trl"]["peak_train_mb"] - c["trl"]["rss_start_mb"], 1.0))
                    add(f"{tag}: {case} (peak - start) / TRL (peak - start) [working memory]", round(w, 2),
                        "(info)", None)
        if "cache" in c and "student" in c:
            x = c["cache"]["tokens_per_s"] / c["student"]["tokens_per_s"]
            add(f"{tag}: cache tokens/s / student-only tokens/s", round(x, 3), ">= 0.95", x >= 0.95)
    for key, meta in caches.items():
        add(f"cache bytes/token ({key}, k={meta['k']}, {meta['storage_dtype']})",
            round(meta["cache_bytes_per_token"], 1), "<= 200", meta["cache_bytes_per_token"] <= 200)
        add(f"cache disk bytes/token incl. input_ids/labels/attention_mask ({key})",
            round(meta["disk_bytes_per_token"], 1), "(info)", None)
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['target']} | {r['measured']} | {r['goal']} | {met} |")
    return "\n".join(lines)


def machine_info() -> dict:
    import torch
    import transformers
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(available_gb(), 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl
        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", default="outputs/benchmark/benchmark.json", help="JSON results file")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 measured step")
    p.add_argument("--only", choices=("all", "e2e", "loss"), default="all")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of smollm2, " + SYNTH)
    p.add_argument("--sizes", default="8x128", help="batch x sequence, comma list (e.g. 8x128,64x128)")
    p.add_argument("--synth-sizes", default=None, help="sizes for the synthetic model (default: --sizes)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=1, help="run every end-to-end case this many times (order "
                   "alternating) and keep the fastest run's time and the largest peak: robust on a shared machine")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--k", type=int, default=32, help="cache top-k (hf_kd's default)")
    p.add_argument("--chunk-size", type=int, default=None, help="kd_chunk_size for hf_kd cases (default: hf_kd's)")
    p.add_argument("--synth-hidden", type=int, default=896)
    p.add_argument("--synth-layers", type=int, default=4, help="teacher layers of the synthetic model (student: half)")
    p.add_argument("--loss-tokens", type=int, default=4096)
    p.add_argument("--loss-vocabs", default="49152,151936")
    p.add_argument("--loss-impls", default=",".join(LOSS_IMPLS))
    p.add_argument("--loss-chunk", type=int, default=None, help="chunk size of the loss-alone cases "
                   "(default: DistillationConfig's kd_chunk_size)")
    p.add_argument("--chunk-sweep", default="", help="also time chunked/fused loss-alone at these chunk sizes")
    p.add_argument("--loss-reps", type=int, default=2)
    p.add_argument("--max-load", type=float, default=1.5, help="wait until the 1-min load average is below this")
    p.add_argument("--max-wait", type=float, default=1500, help="seconds to wait for a quiet machine")
    p.add_argument("--mem-margin-gb", type=float, default=3.0, help="free memory left to others per child")
    p.add_argument("--workdir", default="outputs/benchmark/work")
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child)

    if args.quick:
        args.sizes, args.synth_sizes = "2x32", "2x32"
        args.steps, args.warmup = 1, 1
        args.synth_hidden, args.synth_layers = 64, 2
        args.loss_tokens, args.loss_reps = 256, 1
        args.max_wait = 0
        args.workdir = args.workdir.rstrip("/") + "_quick"
    args.workdir = os.path.abspath(args.workdir)
    from hf_kd import DistillationConfig
    default_chunk = DistillationConfig.__dataclass_fields__["kd_chunk_size"].default
    loss_chunk = args.loss_chunk or args.chunk_size or default_chunk
    models = [m for m in args.models.split(",") if m]
    cases = [c for c in args.cases.split(",") if c]
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    synth_sizes = [parse_size(s) for s in (args.synth_sizes or args.sizes).split(",")]
    results = {"machine": machine_info(), "settings": {k: v for k, v in vars(args).items() if k != "child"},
               "kd_chunk_size": loss_chunk, "e2e": [], "e2e_runs": [], "loss": []}
    results["load_before"] = wait_for_quiet(args.max_load, args.max_wait)
    print(f"machine: {results['machine']}\nload before measuring: {results['load_before']}", flush=True)

    def mem_gb():
        return max(available_gb() - args.mem_margin_gb, 1.0)

    if args.only in ("all", "e2e"):
        all_sizes = sorted(set(sizes) | (set(synth_sizes) if SYNTH in models else set()))
        prep_spec = {"workdir": args.workdir, "threads": args.threads, "sizes": all_sizes, "models": models,
                     "steps_total": args.warmup + args.steps, "cases": cases, "k": args.k,
                     "temperature": args.temperature, "synth_hidden": args.synth_hidden,
                     "synth_layers": args.synth_layers}
        print("preparing models, blocks and caches ...", flush=True)
        prep = child("prepare", prep_spec, None)
        if "error" in prep:
            raise SystemExit(f"preparation failed: {prep['error']}")
        results["prepared"] = prep
        for rnd in range(args.rounds):
            for model in models:
                for b, t in (synth_sizes if model == SYNTH else sizes):
                    key = f"{b}x{t}"
                    for case in (cases if rnd % 2 == 0 else cases[::-1]):  # alternate the order between rounds
                        spec = {"case": case, "model": model, "batch": b, "seq": t, "warmup": args.warmup,
                                "steps": args.steps, "threads": args.threads, "temperature": args.temperature,
                                "chunk_size": args.chunk_size, "tokenizer": prep["tokenizer"],
                                "teacher": prep["models"][model]["teacher"], "student": prep["models"][model]["student"],
                                "blocks": prep["blocks"][key],
                                "cache_dir": prep["caches"].get(f"{model}/{key}", {}).get("path")}
                        load = os.getloadavg()[0]
                        r = child("case", spec, mem_gb())
                        r.update(case=case, model=model, size=key, load_1min_before=load, round=rnd)
                        results["e2e_runs"].append(r)
                        results["e2e"] = best_of_rounds(results["e2e_runs"])
                        msg = r.get("error") or (f"step {r['step_s']:.2f} s, {r['tokens_per_s']:.0f} tok/s, "
                                                 f"peak {r['peak_train_mb']:.0f} MB, other CPU {r['other_cpu_cores']:.2f}")
                        print(f"[round {rnd} {model} {key} {case}] {msg}", flush=True)
                        _save(args.out, results)

    if args.only in ("all", "loss"):
        hidden = {49152: 576, 151936: 896}  # SmolLM2-135M's and Qwen2.5-0.5B's widths
        impls = [i for i in args.loss_impls.split(",") if i]
        plan = [(v, impl, loss_chunk, False) for v in (int(x) for x in args.loss_vocabs.split(",")) for impl in impls]
        for c in (int(x) for x in args.chunk_sweep.split(",") if x):
            plan += [(v, impl, c, True) for v in (int(x) for x in args.loss_vocabs.split(","))
                     for impl in ("chunked", "fused") if c != loss_chunk]
        for v, impl, chunk, sweep in plan:
            n = args.loss_tokens
            spec = {"impl": impl, "tokens": n, "vocab": v, "hidden": hidden.get(v, 896), "chunk_size": chunk,
                    "temperature": args.temperature, "threads": args.threads, "warmup": 1, "reps": args.loss_reps}
            budget = mem_gb() * (1 << 30)
            while impl.startswith("naive") and naive_bytes(spec["tokens"], v, impl) > budget and spec["tokens"] > 256:
                spec["tokens"] //= 2
            r = child("loss", spec, mem_gb())
            if "error" not in r and spec["tokens"] != n:  # linear in tokens: scale to the requested size
                f = n / spec["tokens"]
                r.update(measured_tokens=spec["tokens"], tokens=n, time_s=r["time_s"] * f,
                         added_mb=r["added_mb"] * f, above_inputs_mb=r["above_inputs_mb"] * f)
            r.setdefault("impl", impl)
            r.setdefault("vocab", v)
            r.setdefault("tokens", n)
            r["chunk_size"], r["sweep"], r["load_1min_before"] = chunk, sweep, os.getloadavg()[0]
            results["loss"].append(r)
            print(f"[loss V={v} {impl} chunk={chunk}] " + (r.get("error") or
                  f"{r['time_s']:.2f} s, added {r['added_mb']:.0f} MB"), flush=True)
            _save(args.out, results)

    caches = {k: v for k, v in results.get("prepared", {}).get("caches", {}).items()}
    results["targets"] = targets(results["e2e"], [r for r in results["loss"] if not r.get("sweep")], caches)
    results["load_after"] = os.getloadavg()[0]
    _save(args.out, results)
    print(render(results))
    return results


def render(results: dict) -> str:
    parts = [f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; torch "
             f"{results['machine']['torch']}, transformers {results['machine']['transformers']}, trl "
             f"{results['machine']['trl']}. Load (1 min) before: {results['load_before']['load_1min']:.2f}, "
             f"after: {results.get('load_after', float('nan')):.2f}."]
    if results["e2e"]:
        parts.append("\n### End to end\n" + e2e_table(results["e2e"]))
    if results["loss"]:
        main_rows = [r for r in results["loss"] if not r.get("sweep")]
        parts.append("\n### Loss alone (forward + backward)\n\n" + loss_table(main_rows))
        sweep = [r for r in results["loss"] if r.get("sweep")]
        if sweep:
            parts.append("\nChunk-size sweep:\n\n" + loss_table(sweep + [r for r in main_rows
                                                                         if r["impl"] in ("chunked", "fused")]))
    if results.get("targets"):
        parts.append("\n### Targets\n\n" + targets_table(results["targets"]))
    return "\n".join(parts)


def _save(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
