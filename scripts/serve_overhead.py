"""What a served teacher costs per training step, against the same teacher in process, on a small random Llama.

    python scripts/serve_overhead.py [--steps 10] [--batch 4] [--block 128] [--k 32] [--threads 1]

Median step time (forward + backward + optimizer step, after 2 warm-up steps) of a DistillationTrainer with
 1. the teacher in process, full-vocabulary KD (hf_kd's default online path);
 2. the teacher in process, top-k targets (the served format, no HTTP: the overhead's baseline);
 3. the teacher in a `serve-teacher` process on 127.0.0.1 (teacher_url), float32 and float16 on the wire;
plus the bytes per token of the /topk answer (base64 vs JSON lists) and the machine's load average, since the
numbers mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, default_data_collator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model(hidden, layers, vocab, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=1024))


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.start)


class LocalTopk:
    """The server's work without the server: the teacher's top-k at T = 1 in this process."""

    def __init__(self, teacher, k):
        self.teacher, self.k = teacher.eval(), k

    @torch.inference_mode()
    def topk(self, input_ids, attention_mask=None):
        from hf_kd.teachers.cache import topk_targets
        ids, lp, tail = topk_targets(self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits, self.k)
        return ids, lp, tail


def step_time(a, data, out, teacher=None, local=None, wire_dtype=None, **config) -> float:
    from hf_kd import DistillationConfig, DistillationTrainer
    timer = StepTimer()
    cfg = DistillationConfig(output_dir=out, max_steps=a.steps + 2, per_device_train_batch_size=a.batch,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1000,
                             temperature=1.0, teacher_dtype="model", **config)
    trainer = DistillationTrainer(model=model(128, 2, a.vocab, 1), teacher_model=teacher, args=cfg,
                                  train_dataset=data, data_collator=default_data_collator, callbacks=[timer])
    if local is not None:
        trainer.data_collator.client = local  # the same collator and loss, the top-k computed here
    if wire_dtype is not None:
        trainer.data_collator.client.dtype = wire_dtype
    trainer.train()
    return statistics.median(timer.times[2:])


def wire_sizes(url, ids) -> dict:
    from hf_kd.teachers.served import TeacherClient
    out = {}
    for dtype in ("float32", "float16"):
        for encoding in ("b64", "json"):
            client = TeacherClient(url, dtype=dtype, encoding=encoding)
            payload = {"input_ids": ids.tolist(), "dtype": dtype, "encoding": encoding}
            start = time.perf_counter()
            answer = client.call("POST", "/topk", payload)
            took = time.perf_counter() - start
            out[f"{dtype}/{encoding}"] = {"bytes_per_token": round(len(json.dumps(answer)) / ids.numel(), 1),
                                          "request_ms": round(took * 1000, 1)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sys.path.insert(0, ROOT)
    from datasets import Dataset
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch * (a.steps + 2), a.block), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})
    teacher = model(256, 4, a.vocab, 0)
    result = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        teacher.save_pretrained(os.path.join(tmp, "teacher"))
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(a.threads)}
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "recipes", "serve_teacher.py"),
                                   os.path.join(tmp, "teacher"), "--port", "0", "--top_k", str(a.k), "--threads",
                                   str(a.threads)], stdout=subprocess.PIPE, text=True, env=env)
        try:
            line = ""
            while "serving at " not in line:
                line = server.stdout.readline()
                if not line:
                    raise RuntimeError("serve-teacher did not start")
            url = line.split("serving at ")[1].split()[0]
            out = os.path.join(tmp, "out")
            result["in_process_full_kd_s"] = step_time(a, data, out, teacher=teacher)
            result["in_process_topk_s"] = step_time(a, data, out, local=LocalTopk(teacher, a.k), teacher_url=url)
            result["served_topk_s"] = step_time(a, data, out, teacher_url=url)
            result["served_topk_float16_wire_s"] = step_time(a, data, out, wire_dtype="float16", teacher_url=url)
            result["wire"] = wire_sizes(url, ids[:a.batch])
        finally:
            server.kill()
    result["load_after"] = os.getloadavg()
    result["setting"] = vars(a)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
