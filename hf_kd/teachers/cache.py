"""Offline teacher cache: run the teacher once, keep per token its top-k log-probabilities at the training
temperature, their ids and the log of the remaining mass; train later with no teacher in memory.

The KL against a cached teacher treats the tail as one bucket:

    KL_k(p_T || p_S) = sum_{i in K} p_i (log p_i - log q_i) + r (log r - log q_rest),
    r = 1 - sum_{i in K} p_i,  q_rest = 1 - sum_{i in K} q_i,

(times T^2), where K is the teacher's top-k set. By the log-sum inequality KL_k <= KL (exact when the
teacher's tail is proportional to the student's); the student is still pushed to give the tail the mass
the teacher gives it, not to shape it. ``scripts/cache_error.py`` measures the gap for several k.

:func:`topk_kl` is the reference; the trainer computes the same loss (and the student's CE) chunk by chunk
with an analytic gradient (:mod:`hf_kd.losses.kd_ce`), so no full-vocabulary float32 log-probabilities of the
student are built either.

One cache (or served teacher, :mod:`hf_kd.teachers.served`) made at T0 = 1 serves every training temperature T by
re-tempering (:func:`retemper`): p_T(v) is proportional to p_T0(v)^b with b = T0 / T, exact for the top-k
entries; the tail needs sum_{v not in K} p_v^b, which the mass r alone does not fix. If the tail were n equal
tokens it would be n^(1-b) r^b; every tail token is at most p_k (the k-th largest probability), so n lies between
n_min = max(r / p_k, 1) (the tail piled up at p_k) and n_max = V - k (spread evenly, the largest value for T > T0).
:func:`retemper` takes the geometric midpoint n = sqrt(n_min n_max) and renormalises over the k + 1 buckets: exact
at T = T0, and the ids and the ratios inside the top-k are always exact (only the head/tail split is estimated).
On SmolLM2-135M at k = 32 (``scripts/retemper_error.py``, 256 held-out tokens) the re-tempered head mass is off by
a factor of about exp(0.05) at T = 1.5, exp(0.21) at T = 2 and exp(0.86) at T = 3 (the uniform tail, n = n_max:
exp(0.69), exp(1.23), exp(1.29)); the gradient of the top-k KL keeps a cosine of 0.9996 / 0.993 / 0.982 with the
exact one. Above T = 2, or to be exact, make the cache at the training temperature.
"""

from __future__ import annotations

import json
import math
import os
import hashlib
import shutil
import time

import torch
import torch.nn.functional as F

from ..flow.align import predicting
from ..flow.tasks import CAUSAL_LM, CLASSIFICATION, MASKED_LM, task_of
from ..data.cache import cache_dir
from ..losses.kd_ce import log1mexp
from ..losses.logits import reduce

CACHE_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logmass")
META_NAME = "hf_kd_teacher_cache.json"


def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """(ids [..., k], log-probs [..., k], log tail mass [...]) of softmax(teacher_logits / T)."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    return ids, values, log1mexp(torch.logsumexp(values, dim=-1))


def retemper(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, vocab_size: int, temperature: float,
             from_temperature: float = 1.0):
    """(log-probs [..., k], log tail mass [...]) at ``temperature`` from top-k targets made at ``from_temperature``
    over a ``vocab_size`` vocabulary; the tail's tempered mass is estimated (module doc). Unchanged (the same
    tensors) when the temperatures are equal; otherwise float32."""
    if temperature == from_temperature:
        return topk_logprobs, tail_logmass
    b = from_temperature / temperature
    head = topk_logprobs.float() * b
    k = head.shape[-1]
    if vocab_size <= k:  # no tail: the top-k is the whole distribution
        head = head - torch.logsumexp(head, dim=-1, keepdim=True)
        return head, log1mexp(torch.logsumexp(head, dim=-1))
    log_r = tail_logmass.float()
    log_n_min = (log_r - topk_logprobs.float().amin(dim=-1)).clamp(min=0.0)  # log max(r / p_k, 1)
    log_n = 0.5 * (log_n_min + math.log(vocab_size - k))
    tail = b * log_r + (1.0 - b) * log_n
    z = torch.logsumexp(torch.cat([head, tail.unsqueeze(-1)], dim=-1), dim=-1)
    return head - z.unsqueeze(-1), tail - z


def topk_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
            tail_logmass: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """T^2 * KL_k(p_T || p_S) with the teacher given by its cached top-k and tail (formula in the module doc)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_k = log_q.gather(-1, topk_ids.long())
    log_q_rest = log1mexp(torch.logsumexp(log_q_k, dim=-1))
    log_p_k, log_r = topk_logprobs.float(), tail_logmass.float()
    head = (log_p_k.exp() * (log_p_k - log_q_k)).sum(-1)
    r = log_r.exp()
    tail = r * (log_r - log_q_rest)  # both masses >= 1e-7 (float32's resolution), so finite
    return reduce((head + tail) * temperature**2, mask, reduction)


def cached_kl_sum(student_logits, cached: dict, mask, task: str, temperature: float) -> torch.Tensor:
    """The KD sum against cached columns, over the positions that predict (hf_kd.flow.align: causal shift)."""
    ids, lp, tail = (predicting(cached[c], task) for c in CACHE_COLUMNS)
    return topk_kl(predicting(student_logits, task), ids, lp, tail, temperature=temperature, mask=mask,
                   reduction="sum")


def check_cache(meta: dict, student, signals, task: str) -> None:
    """Fail fast when a cache (or a served teacher: ``meta['source']``) cannot serve this student and its
    logit-distillation signal. Targets made at T = 1 serve any one training temperature (:func:`retemper`)."""
    problems, source = [], meta.get("source", "teacher_cache")
    for sig in signals:
        temperature = getattr(sig, "temperature", None)
        if temperature is None:
            continue
        if temperature.varies:
            problems.append(f"signal {sig.name!r} schedules its temperature, but the targets are re-tempered to one "
                            f"temperature: drop temperature_end or train online")
        elif abs(meta["temperature"] - temperature.start) > 1e-9 and meta["temperature"] != 1.0:
            problems.append(f"the cache was made at temperature {meta['temperature']}, the config asks for "
                            f"{temperature.start} (set temperature={meta['temperature']}, or remake the cache at "
                            "temperature 1, which serves every temperature)")
        if sig.kind != "forward_kl":  # checked whatever its weight, also one that starts at 0
            problems.append(f"a top-k cache supports kd_loss='forward_kl' only, not {sig.kind!r}")
    if task not in (CAUSAL_LM, MASKED_LM, CLASSIFICATION) or meta.get("task", CAUSAL_LM) != task:
        problems.append(f"the targets were made by a {meta.get('task', CAUSAL_LM)} teacher; this student is a {task} "
                        "model (caches serve causal and masked LMs and sequence classifiers)")
    elif meta["vocab_size"] != output_size(student):
        problems.append(f"cache vocabulary {meta['vocab_size']} != student vocabulary {output_size(student)}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def output_size(model) -> int:
    """The number of classes a model's logits range over: the vocabulary of a language model, the labels of a
    sequence / image classifier."""
    c = model.config
    return c.num_labels if task_of(model) == CLASSIFICATION else c.vocab_size


@torch.inference_mode()
def build_teacher_cache(teacher, dataset, output_dir: str, *, k: int = 32, temperature: float = 2.0,
                        storage_dtype: str = "float16", batch_size: int = 8, teacher_name: str = "") -> dict:
    """Add the cache columns to ``dataset`` (equal-length input_ids rows) and save it with metadata.

    A causal or masked LM's cache holds k targets per token ([T, k] per row; a masked LM's rows are masked once and
    for all, :func:`hf_kd.data.masked_views`, since its targets depend on the masks); a sequence classifier's one
    per example ([k] per row: with k = its number of labels the cache is the teacher's exact distribution).
    Written to a temporary folder and renamed, so ``output_dir`` is complete or absent.
    """
    from datasets import Dataset, Sequence, Value
    from tqdm.auto import tqdm
    size, causal = output_size(teacher), task_of(teacher) == CAUSAL_LM
    if k <= 0 or k > size:
        raise ValueError(f"k must be in 1..{size} (the teacher's {'vocabulary' if causal else 'labels'}), got {k}")
    if storage_dtype not in ("float16", "float32"):
        raise ValueError(f"storage_dtype must be float16 or float32, got {storage_dtype!r}")
    np_dtype, began, cpu_began, training = storage_dtype, time.perf_counter(), time.process_time(), teacher.training
    teacher.eval()  # given back in its own mode below
    rows = {c: [] for c in CACHE_COLUMNS}
    for start in tqdm(range(0, len(dataset), batch_size), desc="teacher cache"):
        batch = dataset[start:start + batch_size]
        ids = torch.tensor(batch["input_ids"])
        attn = torch.tensor(batch["attention_mask"]) if "attention_mask" in batch else None
        logits = teacher(input_ids=ids, attention_mask=attn, **({"use_cache": False} if causal else {})).logits
        for column, values in zip(CACHE_COLUMNS, topk_targets(logits, k, temperature)):
            rows[column] += (values.to(torch.int32) if column == CACHE_COLUMNS[0] else values).tolist()
    teacher.train(training)
    per_token = logits.dim() == 3  # [B, T, V]: a target per token (LMs); [B, C]: one per example (classifiers)
    per_row = (lambda v: Sequence(v)) if per_token else (lambda v: v)
    features = dataset.features.copy()
    features["teacher_topk_ids"] = per_row(Sequence(Value("int32"), length=k))  # fixed size: no offsets
    features["teacher_topk_logprobs"] = per_row(Sequence(Value(np_dtype), length=k))
    features["teacher_tail_logmass"] = per_row(Value(np_dtype))
    cached = Dataset.from_dict({**dataset.to_dict(), **rows}, features=features)
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cached.save_to_disk(tmp)
    tokens = len(dataset) * len(dataset[0]["input_ids"])
    positions = tokens if per_token else len(dataset)  # targets held
    meta = {"k": k, "temperature": temperature, "storage_dtype": storage_dtype, "vocab_size": size,
            "task": task_of(teacher), "teacher": teacher_name, "tokens": tokens, "positions": positions,
            "cache_bytes_per_token": _column_bytes(cached, CACHE_COLUMNS) / tokens,
            "disk_bytes_per_token": _dir_bytes(tmp) / tokens, "build_seconds": time.perf_counter() - began,
            "build_cpu_seconds": time.process_time() - cpu_began}  # CPU time of this process: less sensitive to load
    with open(os.path.join(tmp, META_NAME), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(tmp, output_dir)
    return meta


def reusable_cache(teacher, dataset, *, teacher_name: str, k: int = 32, temperature: float = 1.0,
                   storage_dtype: str = "float16", batch_size: int = 8, root: str | None = None) -> tuple[str, dict]:
    """A teacher cache of ``dataset`` made once and reused by every later run, seed and epoch: the folder is keyed by
    the content (the rows' token ids, a masked LM's labels too, the teacher's name and dtype, k, temperature, storage
    dtype), under ``root`` (default: ``hf_kd.tools.assets.cache_dir()/teacher_caches``). Returns (folder, metadata);
    the metadata's ``build_seconds`` is what making it cost once (count it once in a comparison at equal compute)
    and ``reused`` says whether this call found it made."""
    key = hashlib.sha256(json.dumps([teacher_name, str(next(teacher.parameters()).dtype), k, temperature,
                                     storage_dtype]).encode())
    for column in ("input_ids", "labels") if task_of(teacher) == MASKED_LM else ("input_ids",):
        for ids in dataset[column]:  # a masked LM's rows: the masks and their labels
            key.update(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes())
    folder = os.path.join(root or str(cache_dir() / "teacher_caches"), key.hexdigest()[:16])
    if os.path.isfile(os.path.join(folder, META_NAME)):
        return folder, {**load_teacher_cache(folder)[1], "reused": True}
    meta = build_teacher_cache(teacher, dataset, folder, k=k, temperature=temperature, storage_dtype=storage_dtype,
                               batch_size=batch_size, teacher_name=teacher_name)
    return folder, {**meta, "reused": False}


def _column_bytes(dataset, columns) -> int:
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    return sum(table.column(c).nbytes for c in columns)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def load_teacher_cache(path: str):
    """(dataset with torch format, metadata) of a cache made by :func:`build_teacher_cache`."""
    from datasets import load_from_disk
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path} is not an hf_kd teacher cache (no {META_NAME}); make one with "
                                "`hf-kd cache-teacher`")
    with open(meta_path) as f:
        meta = json.load(f)
    return load_from_disk(path).with_format("torch"), meta
