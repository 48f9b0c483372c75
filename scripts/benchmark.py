"""Speed and memory of hf_kd's distillation paths against a naive loss, TRL's GKDTrainer and the floor.

    python scripts/benchmark.py --out outputs/benchmark/benchmark.json          # the real run (~1 h on 2 cores)
    python scripts/benchmark.py --quick --out outputs/benchmark/quick.json      # smoke run (~3 min)
    python scripts/benchmark.py --only loss --out ...                           # loss-alone part only
    python scripts/benchmark.py --only e2e --models smollm2 --sizes 8x128 ...   # end-to-end part only
    python scripts/benchmark.py --only e2e --cases chunked,trl,floor --teacher-dtype bfloat16 --append --out X.json
                                                      # add bf16-teacher rows to an earlier run's X.json
    python scripts/benchmark.py --only e2e --student-bf16 --append --out X.json  # add bf16-autocast-student rows
    python scripts/benchmark.py --render X.json       # print an earlier run's tables again (targets recomputed)

Options beyond sizes and counts:

* ``--teacher-dtype {float32,bfloat16,float16}`` (default float32): the teacher of every case that has one (full,
  chunked, fused, *_kl, trl, floor) is loaded in float32 and cast to this dtype; hf_kd cases also get
  ``DistillationConfig(teacher_dtype=...)`` so the trainer agrees. The ``cache`` case's cache is built by the teacher
  cast to this dtype (float32 caches keep their folder ``cache_k{k}_{B}x{T}``, so existing caches are reused; other
  dtypes get ``cache_k{k}_{B}x{T}_{dtype}``).
* ``--student-bf16``: ``bf16=True`` (CPU bf16 autocast of the training step) in every case's TrainingArguments /
  DistillationConfig / GKDConfig. Without it all cases train in float32 (TRL's own bf16 default is turned off).
* Every end-to-end row records ``teacher_dtype`` and ``student_bf16`` (also ``student``, which has no teacher: it
  carries its run's setting). Rows of different settings are never merged (``--rounds``, ``--append``); the tables
  label them apart (e.g. "(b) hf_kd default (auto = chunked) [teacher bf16, student bf16]") and each case is
  compared with the floor / TRL / student row of the same setting. The loss-alone part ignores both options (its
  rows say float32 / False).
* ``--rounds N``: every case N times, alternating the order; the fastest time and the largest peak are kept.
* ``--append``: keep the runs already in ``--out`` and add this run's (round numbers continue).
* ``--render JSON``: print the tables of a finished run without measuring anything.
* ``--max-load`` / ``--max-wait``: wait (up to max-wait seconds; 0 with ``--quick``) for the 1-minute load average
  to fall below max-load before measuring.

Code: this file is the entry point (options, the orchestrating parent, the ``--child`` dispatch); the measurements
and the child process runner are in ``bench_measure.py``, the jobs (prepare, end-to-end case, loss alone) in
``bench_cases.py``, the tables and targets in ``bench_report.py``.

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
* ``trl``      TRL GKDTrainer, supervised (lmbda=0, beta=0), no bf16 autocast unless --student-bf16, no gradient
               checkpointing
* ``floor``    teacher forward alone (no_grad, use_cache=False) + a plain Trainer CE step of the student
* ``student``  the student's CE training step alone (no teacher): the reference for the cache's speed

hf_kd cases use the clm job's loss (alpha_task=1, kd_weight=1, forward KL at T=2, no hidden-state loss). Extra
cases (``--cases chunked_kl,fused_kl``): the same with alpha_task=0, i.e. without the student's CE, which TRL's GKD
loss does not compute either (TRL's supervised GKD loss is the KL at T=1 only).

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
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench_* modules (also when imported by path)

from bench_cases import (CASES, EXTRA_CASES, LOSS_IMPLS, MODELS, SYNTH, TEACHER_DTYPES,  # noqa: E402
                         build_trainer, load_teacher, naive_bytes, prepare, run_case, run_loss_case,
                         synthetic_config)
from bench_measure import (Window, available_gb, child, limit_memory, machine_info, peak_mb,  # noqa: E402
                           reset_peak, rss_mb, save_json, setup_torch, wait_for_quiet)
from bench_report import (CASE_LABELS, best_of_rounds, e2e_table, loss_table, parse_size, render,  # noqa: E402
                          targets, targets_table, variant_suffix)

HERE = os.path.abspath(__file__)  # children run this file with --child (bench_measure.child's default script)
# Re-exported: other scripts and tests use the building blocks through this module.
__all__ = ["CASES", "EXTRA_CASES", "LOSS_IMPLS", "MODELS", "SYNTH", "TEACHER_DTYPES", "CASE_LABELS",
           "Window", "available_gb", "best_of_rounds", "build_trainer", "child", "child_main",
           "e2e_table", "limit_memory", "load_teacher", "loss_table", "machine_info", "main",
           "naive_bytes", "parse_size", "peak_mb", "prepare", "render", "reset_peak", "rss_mb",
           "run_case", "run_loss_case", "setup_torch", "synthetic_config", "targets", "targets_table",
           "wait_for_quiet"]


def child_main(payload: str) -> None:
    job = json.loads(payload)
    limit_memory(job.get("mem_gb"))
    fn = {"prepare": prepare, "case": run_case, "loss": run_loss_case}[job["kind"]]
    result = fn(job["spec"])
    print("@@RESULT@@" + json.dumps(result), flush=True)


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
    p.add_argument("--append", action="store_true", help="add to the runs already in --out (more rounds later; rows "
                   "of another --teacher-dtype / --student-bf16 are kept apart)")
    p.add_argument("--teacher-dtype", choices=TEACHER_DTYPES, default="float32", help="teacher loaded in float32, "
                   "then cast to this dtype (every case with a teacher, and the cache's teacher); hf_kd cases also "
                   "get DistillationConfig(teacher_dtype=...)")
    p.add_argument("--student-bf16", action="store_true", help="bf16=True (CPU autocast) in every case's "
                   "TrainingArguments / DistillationConfig / GKDConfig")
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
    p.add_argument("--render", metavar="JSON", help="print the tables (targets recomputed) of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child)
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        results["targets"] = targets(results.get("e2e", []), [r for r in results.get("loss", []) if not r.get("sweep")],
                                     results.get("prepared", {}).get("caches", {}))
        print(render(results))
        return results

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
    if args.append and os.path.isfile(args.out):
        with open(args.out) as f:
            old = json.load(f)
        results["e2e_runs"], results["loss"] = old.get("e2e_runs", []), old.get("loss", [])
        results["e2e"] = best_of_rounds(results["e2e_runs"])
        results["earlier_loads"] = old.get("earlier_loads", []) + [old.get("load_before")]
    results["load_before"] = wait_for_quiet(args.max_load, args.max_wait)
    print(f"machine: {results['machine']}\nload before measuring: {results['load_before']}", flush=True)

    def mem_gb():
        return max(available_gb() - args.mem_margin_gb, 1.0)

    if args.only in ("all", "e2e"):
        all_sizes = sorted(set(sizes) | (set(synth_sizes) if SYNTH in models else set()))
        prep_spec = {"workdir": args.workdir, "threads": args.threads, "sizes": all_sizes, "models": models,
                     "steps_total": args.warmup + args.steps, "cases": cases, "k": args.k,
                     "temperature": args.temperature, "synth_hidden": args.synth_hidden,
                     "synth_layers": args.synth_layers, "teacher_dtype": args.teacher_dtype}
        print("preparing models, blocks and caches ...", flush=True)
        prep = child("prepare", prep_spec, None)
        if "error" in prep:
            raise SystemExit(f"preparation failed: {prep['error']}")
        results["prepared"] = prep
        first_round = 1 + max((r.get("round", 0) for r in results["e2e_runs"]), default=-1)
        for rnd in range(first_round, first_round + args.rounds):
            for model in models:
                for b, t in (synth_sizes if model == SYNTH else sizes):
                    key = f"{b}x{t}"
                    for case in (cases if rnd % 2 == 0 else cases[::-1]):  # alternate the order between rounds
                        spec = {"case": case, "model": model, "batch": b, "seq": t, "warmup": args.warmup,
                                "steps": args.steps, "threads": args.threads, "temperature": args.temperature,
                                "chunk_size": args.chunk_size, "tokenizer": prep["tokenizer"],
                                "teacher": prep["models"][model]["teacher"], "student": prep["models"][model]["student"],
                                "blocks": prep["blocks"][key],
                                "cache_dir": prep["caches"].get(f"{model}/{key}", {}).get("path"),
                                "teacher_dtype": args.teacher_dtype, "student_bf16": args.student_bf16}
                        load, limit = os.getloadavg()[0], mem_gb()
                        r = child("case", spec, limit)
                        r.update(case=case, model=model, size=key, load_1min_before=load, round=rnd,
                                 mem_limit_gb=round(limit, 1), teacher_dtype=args.teacher_dtype,
                                 student_bf16=args.student_bf16)
                        results["e2e_runs"].append(r)
                        results["e2e"] = best_of_rounds(results["e2e_runs"])
                        msg = r.get("error") or (f"step {r['step_s']:.2f} s, {r['tokens_per_s']:.0f} tok/s, "
                                                 f"peak {r['peak_train_mb']:.0f} MB, other CPU {r['other_cpu_cores']:.2f}")
                        print(f"[round {rnd} {model} {key} {case}{variant_suffix(r)}] {msg}", flush=True)
                        save_json(args.out, results)

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
            r.update(teacher_dtype="float32", student_bf16=False)  # loss alone: float32 tensors, no teacher model
            r["chunk_size"], r["sweep"], r["load_1min_before"] = chunk, sweep, os.getloadavg()[0]
            results["loss"].append(r)
            print(f"[loss V={v} {impl} chunk={chunk}] " + (r.get("error") or
                  f"{r['time_s']:.2f} s, added {r['added_mb']:.0f} MB"), flush=True)
            save_json(args.out, results)

    if args.append and not results.get("prepared") and os.path.isfile(args.out):
        with open(args.out) as f:
            results["prepared"] = json.load(f).get("prepared", {})
    caches = {k: v for k, v in results.get("prepared", {}).get("caches", {}).items()}
    results["targets"] = targets(results["e2e"], [r for r in results["loss"] if not r.get("sweep")], caches)
    results["load_after"] = os.getloadavg()[0]
    save_json(args.out, results)
    print(render(results))
    return results


if __name__ == "__main__":
    main()
