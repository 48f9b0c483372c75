"""Evaluation, speed, report files (JSON, Markdown, learning-curve PNG) and the student's model card."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time

import torch

from ..losses import forward_kl
from ..flow.align import position_masks, predicting, targets
from ..flow.tasks import CAUSAL_LM, CLASSIFICATION, ENCODER, MASKED_LM, as_model_dtype


def _no_cache(model) -> dict:
    """use_cache=False for models that have a KV cache: a single forward needs none."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


def num_parameters(model) -> int:
    """The model's own parameters: the distillation signals' trainable parts attached to a student during training
    (projections, adapters, peers) are not part of it."""
    return sum(p.numel() for n, p in model.named_parameters() if "hf_kd_signals." not in n)


@torch.inference_mode()
def evaluate(model, batches: list[dict], task: str, teacher=None, desc: str | None = None) -> dict:
    """Held-out metrics of ``model`` on fixed ``batches`` (same masking for every model).

    causal_lm: perplexity = exp(mean token cross-entropy); masked_lm: masked-token accuracy (and loss);
    classification: accuracy. With ``teacher``: top-1 agreement and mean KL(teacher || model) at T=1 over the
    positions the KD loss counts. encoder: see :func:`evaluate_encoder`.
    """
    if task == ENCODER:
        return evaluate_encoder(model, batches, teacher)
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    ce, correct, count, agree, kl, kd_count = 0.0, 0, 0, 0, 0.0, 0
    for batch in tqdm(batches, desc=desc or "evaluate", leave=False, disable=desc is None):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**as_model_dtype(model, inputs), **_no_cache(model)).logits.float()
        labels = batch["labels"]
        logits_p, labels_p = predicting(logits, task), targets(labels, task)
        valid = labels_p != -100
        ce += torch.nn.functional.cross_entropy(logits_p[valid], labels_p[valid], reduction="sum").item()
        correct += (logits_p.argmax(-1)[valid] == labels_p[valid]).sum().item()
        count += valid.sum().item()
        if teacher is not None:
            t_logits = teacher(**as_model_dtype(teacher, inputs), **_no_cache(teacher)).logits.float()
            t_logits = t_logits[..., :logits.shape[-1]]
            mask = position_masks(batch, task)["kd"]
            s, t = predicting(logits, task), predicting(t_logits, task)
            agree += (s.argmax(-1)[mask] == t.argmax(-1)[mask]).sum().item()
            kl += forward_kl(s, t, mask=mask, reduction="sum").item()
            kd_count += mask.sum().item()
    model.train(was_training)
    out = {"loss": ce / max(count, 1), "tokens" if task != CLASSIFICATION else "examples": count}
    if task == CAUSAL_LM:
        out["perplexity"] = math.exp(min(out["loss"], 50))
    else:
        out["accuracy"] = correct / max(count, 1)
    if teacher is not None:
        out["teacher_agreement"] = agree / max(kd_count, 1)
        out["teacher_kl"] = kl / max(kd_count, 1)
    return out


def sentence_embeddings(model, batches: list[dict]) -> torch.Tensor:
    """Mean over the attention mask of the last hidden state, L2-normalised (sentence-transformers' pooling)."""
    out = []
    for batch in batches:
        inputs = as_model_dtype(model, {k: v for k, v in batch.items() if k != "labels"})
        hidden = model(**inputs).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out)


@torch.inference_mode()
def evaluate_encoder(model, batches: list[dict], teacher=None) -> dict:
    """Sentence-embedding agreement with ``teacher``: mean cosine of the two embeddings of each sentence, and
    how often a sentence's nearest other sentence is the same under both models (nn_agreement)."""
    was_training = model.training
    model.eval()
    emb = sentence_embeddings(model, batches)
    model.train(was_training)
    out = {"sentences": emb.shape[0]}
    if teacher is not None:
        ref = sentence_embeddings(teacher.eval(), batches)
        out["embedding_cosine"] = (emb * ref).sum(-1).mean().item()
        eye = torch.eye(emb.shape[0], dtype=torch.bool)
        nn_s, nn_t = (emb @ emb.T).masked_fill(eye, -2).argmax(-1), (ref @ ref.T).masked_fill(eye, -2).argmax(-1)
        out["nn_agreement"] = (nn_s == nn_t).float().mean().item()
    return out


@torch.inference_mode()
def latency(model, inputs: dict, repeats: int = 5) -> float:
    """Median seconds of ``repeats`` timed forward passes (after one warm-up)."""
    model.eval()
    inputs = as_model_dtype(model, inputs)
    model(**inputs, **_no_cache(model))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs, **_no_cache(model))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    """The CPU's model name where Linux tells it (/proc/cpuinfo), else the platform's processor or machine."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    """The CPU, cores, torch and its thread count: timings depend on all."""
    return f"{cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def plot_curves(histories: dict[str, list[dict]], path: str, title: str = "") -> str | None:
    """Training-loss components (and eval losses) against steps, one line style per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the JSON and Markdown reports are not
        return None
    keys = sorted({k for h in histories.values() for row in h for k in row
                   if k.endswith("loss") and k not in ("train_loss",)})
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, history in histories.items():
            pts = [(row["step"], row[key]) for row in history if key in row]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("eval_") else None, ms=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


HEADLINE = (("accuracy", True), ("perplexity", False), ("cosine_to_teacher", True))  # (metric, higher is better)


def teacher_warnings(metrics: dict) -> list[str]:
    """A warning when the teacher is no better than the same student trained without it (then distillation has
    nothing to add, and a distilled student that loses to the baseline is expected, not a bug)."""
    teacher, baseline = metrics.get("teacher", {}), metrics.get("baseline_no_teacher", {})
    for name, higher in HEADLINE:
        if name in teacher and name in baseline:
            t, b = teacher[name], baseline[name]
            if (t <= b) if higher else (t >= b):
                return [f"the teacher ({name} {t:.4g}) is no better than the student trained without it ({name} "
                        f"{b:.4g}): distillation cannot be expected to help; train the teacher longer or pick a "
                        "stronger one"]
            return []
    return []


def markdown(report: dict) -> str:
    """Human-readable report: sizes and speed, warnings, then one row of metrics per model."""
    lines = [f"# Distillation report: {report['task']}", "",
             *[f"> **Warning:** {w}\n" for w in report.get("warnings", [])],
             f"- teacher: `{report['teacher']}` ({report['teacher_parameters']:,} parameters)",
             f"- student: {report['student_parameters']:,} parameters, compression {report['compression_ratio']:.2f}x",
             f"- inference speedup: {report['speedup']:.2f}x (median forward, {report['speed_input']})",
             f"- data: {report['data']}", f"- machine: {report['machine']}", ""]
    metrics = report["metrics"]
    cols = sorted({k for m in metrics.values() for k in m})
    lines += ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_fmt(m.get(c, "")) for c in cols) + " |" for name, m in metrics.items()]
    if report.get("train_seconds"):
        lines += ["", "Wall time of training: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["train_seconds"].items())]
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, report: dict, histories: dict[str, list[dict]] | None = None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    if histories:
        png = plot_curves(histories, os.path.join(out_dir, "learning_curves.png"), report.get("task", ""))
        report["learning_curves"] = os.path.basename(png) if png else None
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    return report


def model_card(out_dir: str, report: dict, args) -> str:
    """README.md of the student folder: what it was distilled from, how, on what, and the measured figures."""
    losses = [f"task loss x {args.alpha_task}"] if args.alpha_task else []
    if args.kd_weight:
        losses.append(f"{args.kd_loss} at T={args.temperature} x {args.kd_weight}")
    if args.hidden_weight:
        losses.append(f"hidden {args.hidden_loss} x {args.hidden_weight}")
    pipeline_tag = {CAUSAL_LM: "text-generation", MASKED_LM: "fill-mask", ENCODER: "feature-extraction"}.get(report["task"], "image-classification")
    text = ["---", "library_name: transformers", f"pipeline_tag: {pipeline_tag}", "tags:", "- distillation",
            "- hf_kd", f"base_model: {report['teacher']}" if "/" in report["teacher"] and " " not in report["teacher"] else None, "---", "",
            f"# Student distilled from {report['teacher']}", "",
            f"Distilled with [hf_kd](https://pypi.org/project/hf_kd/) ({report['task']}).", "",
            f"- loss: {' + '.join(losses)}", f"- data: {report['data']}",
            f"- steps: {args.max_steps}, batch {args.per_device_train_batch_size} x accumulation "
            f"{args.gradient_accumulation_steps}, learning rate {args.learning_rate}", "",
            markdown(report).split("\n", 2)[2]]
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(line for line in text if line is not None) + "\n")
    return path


def push_or_dry_run(trainer, out_dir: str, dry_run: bool) -> str | None:
    """Push the student folder through the Trainer's hub support, or write what would be pushed."""
    if dry_run:
        files = sorted(os.path.relpath(os.path.join(r, f), out_dir) for r, _, fs in os.walk(out_dir) for f in fs
                       if "checkpoint-" not in r and not os.path.relpath(r, out_dir).startswith("baseline"))
        manifest = {"repo_id": trainer.args.hub_model_id or os.path.basename(os.path.abspath(out_dir)),
                    "private": trainer.args.hub_private_repo, "files": {f: os.path.getsize(os.path.join(out_dir, f))
                                                                        for f in files}}
        path = os.path.join(out_dir, "push_dry_run.json")
        with open(path, "w") as fh:
            json.dump(manifest, fh, indent=2)
        return path
    trainer.push_to_hub(commit_message="hf_kd distilled student")
    return None
