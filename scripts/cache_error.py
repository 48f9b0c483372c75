"""How much the offline teacher cache (top-k + one tail bucket) costs in bytes and in accuracy.

    python scripts/cache_error.py --out outputs/benchmark/cache_error.json [--quick]

1. For k in --ks (8, 16, 32, 64, 128): bytes per token of a real cache (``build_teacher_cache``, float16
   log-probabilities, int32 ids) and, on held-out tales blocks, the error of the top-k KL
   (:func:`hf_kd.teachers.cache.topk_kl`) against the exact KL(teacher || student) at the training temperature,
   for the half-depth SmolLM2 student (uniform layers) before training and again after the online run of part 2
   (a student closer to the teacher): relative error of the mean KL, mean
   per-token |relative error|, the teacher's mean tail mass, and the cosine between the gradients w.r.t. the
   student logits of the top-k and the exact loss.
2. Training: the same student trained --train-steps steps (batch --train-batch x --block-size, same seed, same
   batches) online from the teacher (hf_kd default, kd_impl=auto) and from the cache for each k in --train-ks,
   plus a CE-only baseline (no teacher); held-out KL(teacher || student) at T=1 (:func:`hf_kd.tools.report.evaluate`).
   Target: the cache-trained student's KL within 2% of the online one's.
3. (--precision-runs 1) the same online run with the teacher in bfloat16 (teacher_dtype), and with a bfloat16
   teacher plus bf16 autocast for the student (bf16=True): what lower precision does to the student's result.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/benchmark/cache_error.json")
    p.add_argument("--ks", default="8,16,32,64,128")
    p.add_argument("--train-ks", default="8,32", help="k values to train from (default k=32 is hf_kd's)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--size-blocks", type=int, default=16, help="blocks cached to measure bytes/token")
    p.add_argument("--train-steps", type=int, default=25)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision-runs", type=int, default=1, help="also train online with a bfloat16 teacher, and "
                   "with a bfloat16 teacher + bf16 autocast student (evidence for teacher_dtype / bf16 defaults)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.ks, args.train_ks = "8,32", "32"
        args.block_size, args.eval_blocks, args.size_blocks, args.train_steps, args.train_batch = 32, 4, 2, 2, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    from bench_measure import machine_info, save_json

    from hf_kd.tools.assets import load_smollm2, load_tales
    from hf_kd.data import pack_for_causal_lm
    from hf_kd.losses import forward_kl
    from hf_kd.tools.student import make_student
    from hf_kd.teachers.cache import build_teacher_cache, topk_kl, topk_targets

    t_start = time.time()
    teacher, tok = load_smollm2()
    teacher.eval().requires_grad_(False)
    student0 = make_student(teacher, num_layers=teacher.config.num_hidden_layers // 2, strategy="uniform")
    state = {k: v.clone() for k, v in student0.state_dict().items()}
    ks = [int(k) for k in args.ks.split(",") if k]
    held = pack_for_causal_lm(load_tales("heldout"), tok, args.block_size, max_blocks=args.eval_blocks)
    results = {"machine": machine_info(), "load_before": os.getloadavg()[0], "settings": vars(args),
               "student_layers": student0.config.hf_kd_teacher_layers, "error": [], "training": []}
    T = args.temperature

    # ---- 1a. bytes per token of real caches -------------------------------------------------------------
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="hf_kd_cache_err_") as tmp:
        small = held.select(range(min(args.size_blocks, len(held))))
        for k in ks:
            meta = build_teacher_cache(teacher, small, os.path.join(tmp, f"k{k}"), k=k, temperature=T)
            sizes[k] = meta

    # ---- 1b. top-k KL error on held-out blocks ----------------------------------------------------------
    def topk_error(student, label):
        acc = {k: {"approx": 0.0, "abs_rel": 0.0, "tail": 0.0, "cos": 0.0} for k in ks}
        exact_sum, n_tok = 0.0, 0
        student.eval()
        for start in range(0, len(held), 8):
            ids = torch.tensor(held[start:start + 8]["input_ids"])
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
                s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
            s_leaf = s_logits.clone().requires_grad_()
            exact = forward_kl(s_leaf, t_logits, temperature=T, reduction="none")  # [B, T-1], includes T^2
            (g_exact,) = torch.autograd.grad(exact.sum(), s_leaf)
            exact = exact.detach()
            exact_sum += float(exact.sum())
            n_tok += exact.numel()
            for k in ks:
                ids_k, lp_k, tail = topk_targets(t_logits, k, T)
                s_leaf = s_logits.clone().requires_grad_()
                approx = topk_kl(s_leaf, ids_k, lp_k.half().float(), tail.half().float(), temperature=T,
                                 reduction="none")  # float16 storage, as in the cache
                (g_k,) = torch.autograd.grad(approx.sum(), s_leaf)
                approx = approx.detach()
                a = acc[k]
                a["approx"] += float(approx.sum())
                a["abs_rel"] += float(((approx - exact).abs() / exact.clamp_min(1e-12)).sum())
                a["tail"] += float(tail.float().exp().sum())
                a["cos"] += float(torch.nn.functional.cosine_similarity(g_k.flatten(0, 1), g_exact.flatten(0, 1),
                                                                       dim=-1).sum())
        for k in ks:
            a = acc[k]
            results["error"].append({
                "student": label, "k": k, "cache_bytes_per_token": sizes[k]["cache_bytes_per_token"],
                "disk_bytes_per_token": sizes[k]["disk_bytes_per_token"], "tokens": n_tok,
                "mean_exact_kl": exact_sum / n_tok, "mean_topk_kl": a["approx"] / n_tok,
                "rel_error_of_mean": (exact_sum - a["approx"]) / exact_sum,
                "mean_abs_rel_error_per_token": a["abs_rel"] / n_tok, "mean_teacher_tail_mass": a["tail"] / n_tok,
                "grad_cosine": a["cos"] / n_tok})

    topk_error(student0, "before training")

    # ---- 2. training from the cache vs online -----------------------------------------------------------
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_kd import DistillationConfig, DistillationTrainer
    from hf_kd.tools.report import evaluate
    train_blocks = pack_for_causal_lm(load_tales("train"), tok, args.block_size,
                                      max_blocks=args.train_steps * args.train_batch)
    eval_batches = [{k: torch.tensor(held[i:i + 8][k]) for k in ("input_ids", "attention_mask", "labels")}
                    for i in range(0, len(held), 8)]

    def new_student():
        model = type(student0)(student0.config)
        model.load_state_dict(state)
        model.config.use_cache = False
        return model

    def common(out):
        return dict(output_dir=out, max_steps=args.train_steps, per_device_train_batch_size=args.train_batch,
                    learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.0,
                    logging_strategy="no", save_strategy="no", report_to="none", seed=args.seed,
                    dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)

    def kd_args(out, **extra):
        return DistillationConfig(**common(out), temperature=T, alpha_task=1.0, kd_weight=1.0, kd_loss="forward_kl",
                                  hidden_weight=0.0, **extra)

    def record(name, model, seconds, k=None):
        m = evaluate(model, eval_batches, "causal_lm", teacher=teacher)
        row = {"run": name, "k": k, "steps": args.train_steps, "train_s": seconds, **m}
        results["training"].append(row)
        print(f"[{name}] held-out KL {m['teacher_kl']:.4f}, ppl {m['perplexity']:.2f}, {seconds:.0f} s", flush=True)

    record("student before training", new_student(), 0.0)
    with tempfile.TemporaryDirectory(prefix="hf_kd_cache_train_") as tmp:
        runs = [("online (fp32 teacher)", None)] + [(f"from cache k={k}", int(k)) for k in args.train_ks.split(",") if k]
        if args.precision_runs:
            runs += [("online, teacher bf16", "bf16"), ("online, teacher bf16 + student bf16 autocast", "bf16+bf16")]
        for name, k in runs:
            model = new_student()
            t0 = time.time()
            if k is None or isinstance(k, str):
                extra = ({"teacher_dtype": "float32"} if k is None  # explicit: hf_kd's 'auto' may pick bf16
                         else {"teacher_dtype": "bfloat16", "bf16": k == "bf16+bf16"})
                # the trainer casts its teacher in place: a copy keeps the float32 teacher for the evaluation
                run_teacher = teacher if k is None else copy.deepcopy(teacher)
                trainer = DistillationTrainer(model=model, teacher_model=run_teacher,
                                              args=kd_args(os.path.join(tmp, "on"), **extra),
                                              train_dataset=train_blocks, data_collator=default_data_collator)
            else:
                cdir = os.path.join(tmp, f"cache_k{k}")
                build_teacher_cache(teacher, train_blocks, cdir, k=k, temperature=T)
                t0 = time.time()  # training time only
                trainer = DistillationTrainer(model=model, args=kd_args(os.path.join(tmp, f"c{k}"), teacher_cache=cdir),
                                              data_collator=default_data_collator)
            trainer.train()
            record(name, model.float(), time.time() - t0, k if isinstance(k, int) else None)
            if k is None:
                topk_error(model, f"after {args.train_steps} online steps")
        model = new_student()
        t0 = time.time()
        Trainer(model=model, args=TrainingArguments(**common(os.path.join(tmp, "ce"))), train_dataset=train_blocks,
                data_collator=default_data_collator).train()
        record("CE only (no teacher)", model, time.time() - t0)
    online = next(r for r in results["training"] if r["run"].startswith("online"))
    for r in results["training"]:
        r["kl_vs_online"] = r["teacher_kl"] / online["teacher_kl"] - 1.0
    results["load_after"] = os.getloadavg()[0]
    results["wall_s"] = time.time() - t_start
    save_json(args.out, results)
    print(render(results))
    return results


def render(results: dict) -> str:
    s = results["settings"]
    lines = [f"SmolLM2-135M teacher -> {len(results['student_layers'])}-layer student (uniform layers), "
             f"T={s['temperature']}, {results['error'][0]['tokens']:,} held-out tokens; load (1 min) before "
             f"{results['load_before']:.2f}, after {results['load_after']:.2f}.", "",
             "| student | k | cache bytes/token | disk bytes/token | mean exact KL | mean top-k KL | rel. error of "
             "mean | mean per-token abs rel. error | teacher tail mass | grad cosine |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["error"]:
        lines.append(f"| {r['student']} | {r['k']} | {r['cache_bytes_per_token']:.1f} | {r['disk_bytes_per_token']:.1f} | "
                     f"{r['mean_exact_kl']:.4f} | {r['mean_topk_kl']:.4f} | {r['rel_error_of_mean']:.2%} | "
                     f"{r['mean_abs_rel_error_per_token']:.2%} | {r['mean_teacher_tail_mass']:.4f} | "
                     f"{r['grad_cosine']:.4f} |")
    lines += ["", f"Training: {s['train_steps']} steps x {s['train_batch']} x {s['block_size']} tokens, lr "
              f"{s['learning_rate']}, seed {s['seed']}; held-out KL(teacher || student) at T=1.", "",
              "| run | held-out KL | vs online | perplexity | teacher top-1 agreement | train time (s) |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in results["training"]:
        lines.append(f"| {r['run']} | {r['teacher_kl']:.4f} | {r['kl_vs_online']:+.2%} | {r['perplexity']:.2f} | "
                     f"{r['teacher_agreement']:.4f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
