"""Tables and targets of scripts/benchmark.py's results: best-of-rounds rows, Markdown tables, the issue's targets.

Rows measured with a non-default teacher dtype or a bf16 student (``teacher_dtype`` / ``student_bf16`` in the row;
rows without them are float32 / False) are never merged with other rows, are labelled apart (e.g. "(b) hf_kd
default (auto = chunked) [teacher bf16]") and are compared only with the floor / TRL rows of the same setting.
"""

from __future__ import annotations

CASE_LABELS = {
    "full": "(a) naive full-logit KD (kd_impl=full)",
    "chunked": "(b) hf_kd default (auto = chunked)",
    "fused": "(c) hf_kd fused",
    "cache": "(d) hf_kd from offline cache",
    "trl": "(e) TRL GKDTrainer (lmbda=0, beta=0)",
    "floor": "(f) floor: teacher fwd + student CE",
    "student": "student CE alone (no teacher)",
    "chunked_kl": "hf_kd chunked, KL only (alpha_task=0, as TRL)",
    "fused_kl": "hf_kd fused, KL only (alpha_task=0, as TRL)",
}

SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def failure(row: dict) -> str:
    """A failed case in one short phrase: out of memory (with the child's limit), else the error's last line."""
    err = row["error"]
    if "can't allocate memory" in err or "Cannot allocate memory" in err or "MemoryError" in err:
        limit = row.get("mem_limit_gb")
        return "out of memory" + (f" (process limited to {limit} GB, the machine's free memory minus a margin)"
                                  if limit else "")
    return err.strip().split("|")[-1].strip()[:160]


def variant(row: dict) -> tuple[str, bool]:
    """(teacher_dtype, student_bf16) of a row; rows from before these options were float32 / False."""
    return row.get("teacher_dtype") or "float32", bool(row.get("student_bf16", False))


def variant_suffix(row: dict) -> str:
    """"" for the default (float32 teacher, float32 student), else e.g. " [teacher bf16, student bf16]"."""
    dtype, bf16 = variant(row)
    tags = ([f"teacher {SHORT_DTYPES.get(dtype, dtype)}"] if dtype != "float32" else []) + (
        ["student bf16"] if bf16 else [])
    return f" [{', '.join(tags)}]" if tags else ""


def case_label(row: dict) -> str:
    return CASE_LABELS.get(row["case"], row["case"]) + variant_suffix(row)


def best_of_rounds(runs: list[dict]) -> list[dict]:
    """One row per (model, size, case, teacher dtype, student bf16): the fastest successful run, with the largest
    peak over the runs."""
    groups = {}
    for r in runs:
        groups.setdefault((r["model"], r["size"], r["case"], *variant(r)), []).append(r)
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
        floors = {variant(r): r for r in items if r["case"] == "floor" and "error" not in r}
        b, t = parse_size(size)
        lines += [f"\n**{model}, {size} = {b * t:,} tokens per step**\n",
                  "| case | step (s) | tokens/s | x floor step | peak RSS train (MB) | RSS at start (MB) | "
                  "peak - start (MB) | other CPU (cores) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in items:
            if "error" in r:
                lines.append(f"| {case_label(r)} | failed: {failure(r)} | | | | | | |")
                continue
            floor = floors.get(variant(r))  # the floor of the same teacher dtype and student precision
            ratio = r["step_s"] / floor["step_s"] if floor else None
            lines.append(f"| {case_label(r)} | {_fmt(r['step_s'])} | {_fmt(r['tokens_per_s'], 0)} | "
                         f"{_fmt(ratio)} | {_fmt(r['peak_train_mb'], 0)} | {_fmt(r['rss_start_mb'], 0)} | "
                         f"{_fmt(r['peak_train_mb'] - r['rss_start_mb'], 0)} | {_fmt(r['other_cpu_cores'])} |")
    return "\n".join(lines)


def loss_table(rows: list[dict]) -> str:
    lines = ["| vocab | impl | tokens | chunk | time (s) | added peak (MB) | above inputs (MB) | naive/this memory "
             "| this/naive time |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['vocab']:,} | {r['impl']} | {r['tokens']} | | failed: {failure(r)} | | | | |")
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
    """The issue's targets as measured ratios (met or not). End-to-end rows are compared only with the floor /
    TRL / student rows of the same model, size, teacher dtype and student precision."""
    out = []

    def add(name, value, goal, ok):
        out.append({"target": name, "measured": value, "goal": goal, "met": ok})

    for v in sorted({r["vocab"] for r in losses if "error" not in r}):
        by = {r["impl"]: r for r in losses if r["vocab"] == v and "error" not in r and r.get("chunk_size") is not None
              and not r.get("sweep")}
        for impl, ref in (("chunked", "naive"), ("fused", "naive_head"), ("fused", "naive")):
            if impl in by and ref in by:
                info = ref == "naive" and impl == "fused"  # fused also runs both heads' matmuls: not like for like
                m = by[ref]["added_mb"] / max(by[impl]["added_mb"], 1.0)
                t = by[impl]["time_s"] / by[ref]["time_s"]
                add(f"loss alone V={v:,}, {by[impl]['tokens']:,} tokens: {impl} added memory, {ref}/{impl}",
                    round(m, 1), "(info)" if info else ">= 10", None if info else m >= 10)
                add(f"loss alone V={v:,}: {impl} time / {ref} time" + (" (fused includes the head matmuls)"
                                                                     if info else ""),
                    round(t, 2), "(info)" if info else "<= 1.0", None if info else t <= 1.0)
    groups = {}
    for r in e2e:
        if "error" not in r:
            groups.setdefault((r["model"], r["size"], *variant(r)), {})[r["case"]] = r
    for (model, size, *_), c in groups.items():
        tag = f"{model} {size}" + variant_suffix(next(iter(c.values())))
        if "floor" in c:
            for case, goal in (("chunked", 1.10), ("fused", 1.05)):
                if case in c:
                    x = c[case]["step_s"] / c["floor"]["step_s"]
                    add(f"{tag}: {case} step / floor step", round(x, 3), f"<= {goal}", x <= goal)
        if "trl" in c:
            for case in ("chunked", "fused", "chunked_kl", "fused_kl"):
                if case in c:
                    x = c[case]["tokens_per_s"] / c["trl"]["tokens_per_s"]
                    info = case.endswith("_kl")  # not the target rows: same loss terms as TRL
                    add(f"{tag}: {case} tokens/s / TRL tokens/s", round(x, 2), "(info)" if info else ">= 1.5",
                        None if info else x >= 1.5)
                    y = c[case]["peak_train_mb"] / c["trl"]["peak_train_mb"]
                    add(f"{tag}: {case} peak RSS / TRL peak RSS", round(y, 2), "(info)" if info else "<= 0.5",
                        None if info else y <= 0.5)
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
