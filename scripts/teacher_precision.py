"""What a lower-precision teacher does to its distribution and speed (evidence for ``teacher_dtype``).

    python scripts/teacher_precision.py --out outputs/benchmark/teacher_precision.json [--quick]

On held-out tales blocks: mean token KL(p_fp32 || p_low) at T=1 and T=2, top-1 agreement and the largest logit
difference, for the packaged SmolLM2-135M teacher cast to bfloat16 (and float16). Then the teacher's forward time
at ``--batch`` x ``--seq`` tokens (default 4 x 128) for float32 / bfloat16 / float16 under ``torch.no_grad()``
and ``torch.inference_mode()``, ``use_cache=False``, median of ``--repeats`` runs after warm-up, torch threads = 2.
Prints Markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/benchmark/teacher_precision.json")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks for the distribution error")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.eval_blocks, args.block_size, args.seq, args.repeats = 4, 32, 32, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    from bench_measure import Window, machine_info, save_json
    from hf_kd.tools.assets import load_smollm2, load_tales
    from hf_kd.data import pack_for_causal_lm
    from hf_kd.losses import forward_kl

    teacher, tok = load_smollm2()
    teacher.eval()
    models = {"float32": teacher}
    for name in (d for d in args.dtypes.split(",") if d):
        models[name] = copy.deepcopy(teacher).to(getattr(torch, name)).eval()
    held = pack_for_causal_lm(load_tales("heldout"), tok, args.block_size, max_blocks=args.eval_blocks)
    ids = torch.tensor(held["input_ids"])
    results = {"machine": machine_info(), "load_before": os.getloadavg()[0], "settings": vars(args),
               "distribution": {}, "speed": []}

    # ---- distribution error ------------------------------------------------------------------------------
    sums = {name: {"kl_t1": 0.0, "kl_t2": 0.0, "agree": 0, "max_abs_logit_diff": 0.0} for name in models if name != "float32"}
    n_tokens = 0
    with torch.inference_mode():
        for start in range(0, len(ids), 8):
            batch = ids[start:start + 8]
            ref = teacher(input_ids=batch, use_cache=False).logits.float()
            n_tokens += ref.shape[0] * ref.shape[1]
            for name, model in models.items():
                if name == "float32":
                    continue
                low = model(input_ids=batch, use_cache=False).logits.float()
                s = sums[name]
                s["kl_t1"] += float(forward_kl(low, ref, temperature=1.0, reduction="sum"))
                s["kl_t2"] += float(forward_kl(low, ref, temperature=2.0, reduction="sum")) / 4  # KL without T^2
                s["agree"] += int((low.argmax(-1) == ref.argmax(-1)).sum())
                s["max_abs_logit_diff"] = max(s["max_abs_logit_diff"], float((low - ref).abs().max()))
                s["finite"] = bool(torch.isfinite(low).all()) and s.get("finite", True)
    for name, s in sums.items():
        results["distribution"][name] = {"tokens": n_tokens, "mean_kl_T1": s["kl_t1"] / n_tokens,
                                         "mean_kl_T2": s["kl_t2"] / n_tokens, "top1_agreement": s["agree"] / n_tokens,
                                         "max_abs_logit_diff": s["max_abs_logit_diff"], "all_finite": s["finite"]}

    # ---- forward speed ------------------------------------------------------------------------------------
    x = ids[:args.batch, :args.seq]
    if x.shape[0] < args.batch:
        x = x.repeat(args.batch // max(x.shape[0], 1) + 1, 1)[:args.batch]
    for mode_name, mode in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        for name, model in models.items():
            times = []
            with Window() as win:
                for rep in range(2 + args.repeats):
                    with mode():
                        t0 = time.perf_counter()
                        model(input_ids=x, use_cache=False)
                        dt = time.perf_counter() - t0
                    if rep >= 2:
                        times.append(dt)
            results["speed"].append({"dtype": name, "mode": mode_name, "tokens": x.numel(),
                                     "median_s": statistics.median(times), "times_s": times,
                                     "tokens_per_s": x.numel() / statistics.median(times),
                                     "other_cpu_cores": win.other_cores})
    results["load_after"] = os.getloadavg()[0]
    save_json(args.out, results)
    print(render(results))
    return results


def render(results: dict) -> str:
    lines = [f"Teacher SmolLM2-135M, float32 reference; load (1 min) before {results['load_before']:.2f}, after "
             f"{results['load_after']:.2f}.", "",
             "| teacher dtype | tokens | mean KL(fp32 ‖ low) T=1 | mean KL T=2 | top-1 agreement | max abs logit diff |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, d in results["distribution"].items():
        lines.append(f"| {name} | {d['tokens']:,} | {d['mean_kl_T1']:.2e} | {d['mean_kl_T2']:.2e} | "
                     f"{d['top1_agreement']:.4f} | {d['max_abs_logit_diff']:.3f} |")
    fp32 = {r["mode"]: r["median_s"] for r in results["speed"] if r["dtype"] == "float32"}
    lines += ["", "| teacher dtype | mode | tokens | forward (s, median) | tokens/s | speed-up vs fp32 same mode | "
              "other CPU (cores) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["speed"]:
        lines.append(f"| {r['dtype']} | {r['mode']} | {r['tokens']} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{fp32[r['mode']] / r['median_s']:.2f}x | {r['other_cpu_cores']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
