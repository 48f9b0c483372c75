"""Tiny random models, datasets and configs shared by the reliability tests and their subprocess scripts."""

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_kd import DistillationConfig

V = 40  # >= the tiny tokenizer's 37 tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and steadier than two on a busy 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama(hidden=32, layers=4, vocab=V, seed=0, max_positions=64):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=max_positions, pad_token_id=0,
                                        attention_dropout=0.0))


def pair(student_hidden=16):
    """A 4-layer teacher and a narrower 2-layer student (so hidden losses need trained projections)."""
    return llama(), llama(hidden=student_hidden, layers=2, seed=1)


def rows(n=16, length=12, vocab=V, seed=1, labels=True):
    """Right-padded rows of different lengths (labels -100 on padding): token counts differ per row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        keep = 3 + i % (length - 2)
        ids = torch.randint(1, vocab, (length,), generator=g)
        lab, mask = ids.clone(), torch.ones(length, dtype=torch.long)
        lab[keep:], mask[keep:], ids[keep:] = -100, 0, 0
        row = {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
        if labels:
            row["labels"] = lab.tolist()
        out.append(row)
    return Dataset.from_list(out)


def args(output_dir, **kw):
    base = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                hidden_weight=1.0, teacher_dtype="model")  # exact comparisons across process/thread layouts:
    return DistillationConfig(**{**base, **kw})          # keep the float32 teacher ('auto' may pick bf16)


def losses(trainer):
    """The logged per-step trajectory: (step, loss, kd_loss, task_loss, hidden_loss, grad_norm)."""
    keys = ("loss", "kd_loss", "task_loss", "hidden_loss", "grad_norm")
    return [(h["step"],) + tuple(h.get(k) for k in keys) for h in trainer.state.log_history if "loss" in h]


def train_and_record(output_dir, batch, accumulation=1, save=False, max_steps=4):
    """Train the pair; return (world size, logged trajectory, per step the sorted row sums of the global batch).
    Row sums identify which rows each step trained on across all processes. save: checkpoint every 2 steps."""
    from hf_kd import DistillationTrainer
    teacher, student = pair()
    save = {"save_strategy": "steps", "save_steps": 2} if save else {}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=args(output_dir, max_steps=max_steps,
                                            per_device_train_batch_size=batch,
                                            gradient_accumulation_steps=accumulation, **save))
    seen, original = [], trainer.training_step

    def record(model, inputs, num_items_in_batch=None):
        seen.append((trainer.state.global_step + 1, inputs["input_ids"].sum(-1).tolist()))
        return original(model, inputs, num_items_in_batch)
    trainer.training_step = record
    trainer.train()
    world = trainer.accelerator.num_processes
    everyone = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(everyone, seen)
    else:
        everyone = [seen]
    steps = {}
    for per_process in everyone:
        for step, sums in per_process:
            steps.setdefault(step, []).extend(sums)
    return world, losses(trainer), {step: sorted(v) for step, v in steps.items()}
