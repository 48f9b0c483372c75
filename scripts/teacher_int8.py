"""An int8 dynamically quantised SmolLM2-135M teacher (``hf_kd.teachers.quantize.quantize_teacher``) against the float32 one.

    python scripts/teacher_int8.py [--out results/teacher_int8.json] [--quick]

The teacher, tokenizer and held-out tales blocks are loaded as the main job (``recipes/distill_clm.py``) loads them.
Measures, with ``--threads`` torch threads (default 2): the teacher's forward time per ``--batch`` x ``--seq`` batch
(default 8 x 128 tokens, ``inference_mode``, ``use_cache=False``, median of ``--repeats`` after 2 warm-ups) for
float32, int8 (every Linear, LM head included), int8 with the LM head kept float32, and bfloat16 for reference;
on ``--eval-blocks`` held-out blocks (default 32): the mean token KL(float32 teacher || variant) at T=1, top-1
agreement and each teacher's perplexity. Records the load average (os.getloadavg) before and after, the other
processes' CPU use during each timing, and lscpu's bf16 / AMX / VNNI flags. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni", "avx_vnni")


def cpu_flags() -> dict:
    """Which of FLAGS lscpu lists (the bf16 and int8 instructions the kernels can use)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"lscpu": "unavailable"}
    line = next((ln for ln in out.splitlines() if ln.startswith("Flags:")), "")
    present = set(line.split()[1:])
    return {f: f in present for f in FLAGS}


def variants(teacher, names: list[str]) -> dict:
    """name -> model: float32 (the teacher), int8, int8_head_fp32, bfloat16 (a cast copy)."""
    import copy

    import torch
    from hf_kd.teachers.quantize import quantize_teacher
    make = {"float32": lambda: teacher, "int8": lambda: quantize_teacher(teacher),
            "int8_head_fp32": lambda: quantize_teacher(teacher, keep_float=["lm_head"]),
            "bfloat16": lambda: copy.deepcopy(teacher).to(torch.bfloat16).eval()}
    return {n: make[n]() for n in names}


def held_out_stats(models: dict, held: list) -> dict:
    """Mean token KL(float32 || model) at T=1, top-1 agreement with float32, and perplexity, over ``held``."""
    import torch
    import torch.nn.functional as F
    from hf_kd.losses import forward_kl
    sums = {n: {"kl": 0.0, "agree": 0, "nll": 0.0} for n in models}
    tokens = predicted = 0
    with torch.inference_mode():
        for batch in held:
            ref = models["float32"](input_ids=batch, use_cache=False).logits.float()
            tokens += ref.shape[0] * ref.shape[1]
            predicted += ref.shape[0] * (ref.shape[1] - 1)
            for name, model in models.items():
                logits = ref if name == "float32" else model(input_ids=batch, use_cache=False).logits.float()
                s = sums[name]
                s["kl"] += float(forward_kl(logits, ref, temperature=1.0, reduction="sum"))
                s["agree"] += int((logits.argmax(-1) == ref.argmax(-1)).sum())
                nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
                s["nll"] += float(nll)
    return {n: {"tokens": tokens, "mean_kl_T1_vs_float32": s["kl"] / tokens, "top1_agreement": s["agree"] / tokens,
                "perplexity": math.exp(s["nll"] / predicted)} for n, s in sums.items()}


def forward_times(models: dict, x, repeats: int) -> dict:
    """name -> median forward seconds on ``x`` (2 warm-ups), all runs, and other processes' CPU use (cores)."""
    import torch
    from bench_measure import Window
    out = {}
    for name, model in models.items():
        times = []
        with Window() as win, torch.inference_mode():
            for rep in range(2 + repeats):
                t0 = time.perf_counter()
                model(input_ids=x, use_cache=False)
                if rep >= 2:
                    times.append(time.perf_counter() - t0)
        out[name] = {"median_s": statistics.median(times), "times_s": times, "other_cpu_cores": win.other_cores}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/teacher_int8.json")
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per block (held-out blocks and timed batch)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="float32,int8,int8_head_fp32,bfloat16")
    p.add_argument("--quick", action="store_true", help="4 blocks of 32 tokens, 2 repeats (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.eval_blocks, args.seq, args.repeats = 4, 32, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    from bench_measure import machine_info, save_json
    from hf_kd.data import pack_for_causal_lm
    from hf_kd.teachers.quantize import quantised_linear_names, weight_bytes
    from hf_kd_recipes.distill_clm import EMBEDDED, load_teacher, load_text

    results = {"machine": machine_info(), "cpu_flags": cpu_flags(), "quantized_engine": torch.backends.quantized.engine,
               "load_before": os.getloadavg(), "settings": vars(args)}
    teacher, tok = load_teacher(EMBEDDED)
    teacher.eval()
    names = ["float32"] + [n for n in args.variants.split(",") if n and n != "float32"]
    models = variants(teacher, names)
    results["weights"] = {n: {**weight_bytes(m), "quantised_linears": len(quantised_linear_names(m))}
                          for n, m in models.items() if n.startswith("int8")}
    held = pack_for_causal_lm(load_text("tales")[1], tok, args.seq, max_blocks=args.eval_blocks)
    ids = torch.tensor(held["input_ids"])
    batches = [ids[i:i + args.batch] for i in range(0, len(ids), args.batch)]
    results["held_out"] = held_out_stats(models, batches)
    x = ids[:args.batch] if len(ids) >= args.batch else ids.repeat(args.batch, 1)[:args.batch]
    results["load_before_timing"] = os.getloadavg()
    results["forward"] = forward_times(models, x, args.repeats)
    results["forward_tokens"] = x.numel()
    results["load_after"] = os.getloadavg()
    save_json(args.out, results)
    print(render(results))
    return results


def render(r: dict) -> str:
    fp32 = r["forward"]["float32"]["median_s"]
    lines = [f"SmolLM2-135M teacher, {r['settings']['threads']} threads, {r['forward_tokens']} tokens per forward; "
             f"load average (1, 5, 15 min) before {r['load_before']}, after {r['load_after']}; "
             f"CPU flags {r['cpu_flags']}", "",
             "| teacher | forward (s, median) | (s, fastest) | speed-up vs fp32 | other CPU (cores) | "
             "mean KL(fp32 ‖ it) T=1 | top-1 agreement | held-out perplexity |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, f in r["forward"].items():
        h = r["held_out"][name]
        lines.append(f"| {name} | {f['median_s']:.3f} | {min(f['times_s']):.3f} | {fp32 / f['median_s']:.2f}x | "
                     f"{f['other_cpu_cores']:.2f} | "
                     f"{h['mean_kl_T1_vs_float32']:.2e} | {h['top1_agreement']:.4f} | {h['perplexity']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
