"""Faults during training lose nothing: non-finite losses are reported with step, micro-batch and culprit (or
skipped and counted), signals save a checkpoint and stop cleanly, checkpoints and saved students are complete
or absent."""

import math
import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_kd import DistillationTrainer

from .scripts.tiny import args, one_thread, pair, rows  # noqa: F401  (one_thread: autouse fixture)

CHECKPOINT_FILES = ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "trainer_state.json", "hf_kd_extras.pt")


def make(tmp_path, teacher=None, student=None, **kw):
    if teacher is None:
        teacher, student = pair()
    extra = {k: kw.pop(k) for k in ("eval_dataset", "callbacks") if k in kw}
    return DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path / "out", **kw),
                               train_dataset=rows(), **extra)


def corrupt_at(module, calls, value=float("nan"), field="logits", index=None):
    """Forward hook: on the given (1-based) calls, fill the output's logits (or hidden state ``index``)."""
    seen = [0]

    def hook(mod, inputs, out):
        seen[0] += 1
        if seen[0] in calls:
            if field == "logits":
                out.logits = out.logits.clone().fill_(value)
            else:
                states = list(out.hidden_states)
                states[index] = states[index].clone().fill_(value)
                out.hidden_states = tuple(states)
        return out
    module.register_forward_hook(hook)
    return seen


def assert_finite(model):
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- non-finite losses ---------------------------------------------------------------------------------------
def test_nan_teacher_logits_stop_with_step_batch_and_tensor(tmp_path):
    teacher, student = pair()
    corrupt_at(teacher, {2})
    trainer = make(tmp_path, teacher, student, max_steps=4)
    with pytest.raises(FloatingPointError, match=r"global step 2 \(1 completed.*micro-batch 0 .*teacher logits "
                                                 r"\(\d+ NaN, 0 inf.*teacher_dtype.*nan_policy='skip'"):
        trainer.train()
    assert trainer.state.global_step == 1 and len([h for h in trainer.state.log_history if "loss" in h]) == 1
    assert_finite(student)


def test_inf_student_logits_stop_names_the_micro_batch(tmp_path):
    teacher, student = pair()
    corrupt_at(student, {2}, float("inf"))
    trainer = make(tmp_path, teacher, student, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(FloatingPointError, match=r"global step 1 \(0 completed.*micro-batch 1 \(of 2 per step\).*"
                                                 r"student logits \(0 NaN, \d+ inf.*lower learning_rate"):
        trainer.train()


def test_nan_in_a_hidden_state_is_traced_to_it(tmp_path):
    teacher, student = pair()
    corrupt_at(teacher, {1}, field="hidden_states", index=2)
    with pytest.raises(FloatingPointError, match=r"teacher hidden state 2 \(\d+ NaN.*hidden loss = nan"):
        make(tmp_path, teacher, student).train()


def test_skip_policy_drops_the_micro_batch_counts_it_and_trains_on(tmp_path):
    teacher, student = pair()
    corrupt_at(teacher, {2, 5})  # step 1 micro-batch 1 and step 3 micro-batch 0
    trainer = make(tmp_path, teacher, student, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   nan_policy="skip")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["skipped_batches"] for h in logs] == [1, 1, 2]
    assert trainer.state.log_history[-1]["skipped_batches"] == 2  # final summary
    assert all(math.isfinite(h[k]) for h in logs for k in ("loss", "kd_loss", "task_loss", "hidden_loss", "grad_norm"))
    assert_finite(student)
    assert all(torch.isfinite(p).all() for p in trainer.projections.parameters())


def test_skipped_loss_is_a_connected_zero(tmp_path):
    teacher, student = pair()
    corrupt_at(teacher, {1})
    trainer = make(tmp_path, teacher, student, nan_policy="skip")
    batch = trainer.data_collator([rows()[i] for i in range(4)])
    student.train()
    loss = trainer.compute_loss(student, batch)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for p in list(student.parameters()) + list(trainer.projections.parameters()):
        assert p.grad is not None and not p.grad.any()
    assert trainer._skipped == 1


def test_skip_cannot_hide_non_finite_student_weights(tmp_path):
    teacher, student = pair()
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="weights are not finite.*cannot recover"):
        make(tmp_path, teacher, student, nan_policy="skip").train()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_evaluation(tmp_path, policy):
    teacher, student = pair()
    corrupt_at(teacher, {1})
    trainer = make(tmp_path, teacher, student, nan_policy=policy, eval_dataset=rows(4))
    if policy == "stop":
        with pytest.raises(FloatingPointError, match="evaluation batch 0 .*teacher logits"):
            trainer.evaluate()
    else:  # not averaged in silently: the NaN shows in eval_loss
        assert math.isnan(trainer.evaluate()["eval_loss"])


@pytest.mark.parametrize("kd_loss", ["forward_kl", "jsd"])
def test_minus_inf_on_masked_vocabulary_is_not_a_fault(tmp_path, kd_loss):
    teacher, student = pair()

    def mask_vocab(mod, inputs, out):
        out.logits = out.logits.clone()
        out.logits[..., 30:] = float("-inf")
        return out
    teacher.register_forward_hook(mask_vocab)
    trainer = make(tmp_path, teacher, student, kd_loss=kd_loss)
    trainer.train()
    assert all(math.isfinite(h["kd_loss"]) for h in trainer.state.log_history if "loss" in h)


# ---- signals ---------------------------------------------------------------------------------------------------
class SendSignal(TrainerCallback):
    def __init__(self, at_step, signum, times=1):
        self.at_step, self.signum, self.times = at_step, signum, times

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_stops_cleanly(tmp_path, signum):
    before = signal.getsignal(signum)
    trainer = make(tmp_path, max_steps=10, callbacks=[SendSignal(2, signum)])
    out = trainer.train()  # returns normally
    assert trainer.interrupt.received == signum
    assert out.global_step == 2  # the step during which the signal arrived finished, then it stopped
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert all((ckpt / f).is_file() for f in CHECKPOINT_FILES)
    assert signal.getsignal(signum) is before


def test_second_ctrl_c_aborts_and_restores_handlers(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    trainer = make(tmp_path, max_steps=10, callbacks=[SendSignal(1, signal.SIGINT, times=2)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is before


def test_handlers_are_restored_when_training_fails(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    teacher, student = pair()
    corrupt_at(teacher, {1})
    with pytest.raises(FloatingPointError):
        make(tmp_path, teacher, student).train()
    assert signal.getsignal(signal.SIGTERM) is before


# ---- atomic checkpoints and saves ----------------------------------------------------------------------------
def hidden_leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")]


def test_failed_checkpoint_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    trainer = make(tmp_path, save_strategy="steps", save_steps=1, max_steps=3)
    original = trainer._save_rng_state

    def fail_at_step_2(output_dir):
        if trainer.state.global_step == 2:
            raise OSError(28, "No space left on device")  # after model, optimizer and projections were written
        original(output_dir)
    monkeypatch.setattr(trainer, "_save_rng_state", fail_at_step_2)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1"]
    assert all((out / "checkpoint-1" / f).is_file() for f in CHECKPOINT_FILES)
    assert hidden_leftovers(out) == []
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1")


def test_rotation_and_best_checkpoint_work_with_staging(tmp_path):
    trainer = make(tmp_path, save_strategy="steps", save_steps=1, max_steps=4, save_total_limit=2,
                   eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
                   eval_dataset=rows(4))
    trainer.train()
    out = tmp_path / "out"
    kept = sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))
    best = trainer.state.best_model_checkpoint
    assert os.path.dirname(best) == str(out) and os.path.isdir(best)
    assert len(kept) <= 3 and "checkpoint-4" in kept and os.path.basename(best) in kept
    assert hidden_leftovers(out) == []
    import json
    state = json.load(open(out / "checkpoint-4" / "trainer_state.json"))
    assert state["best_model_checkpoint"] is None or ".hf_kd-tmp" not in state["best_model_checkpoint"]


def test_saving_the_same_step_twice_replaces_the_checkpoint(tmp_path):
    trainer = make(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    (ckpt / "stale.txt").write_text("from an earlier run")
    trainer._save_checkpoint(trainer.model, None)
    assert all((ckpt / f).is_file() for f in CHECKPOINT_FILES) and not (ckpt / "stale.txt").exists()
    assert hidden_leftovers(tmp_path / "out") == []


def failing_save_pretrained(model):
    original = model.save_pretrained

    def save(save_directory, *a, **kw):
        os.makedirs(save_directory, exist_ok=True)
        open(os.path.join(save_directory, "config.json"), "w").write("{}")  # a partial folder
        raise OSError(28, "No space left on device")
    model.save_pretrained = save
    return original


def test_failed_save_model_leaves_no_folder(tmp_path):
    trainer = make(tmp_path, max_steps=1)
    failing_save_pretrained(trainer.model)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model(str(tmp_path / "student"))
    assert not (tmp_path / "student").exists() and hidden_leftovers(tmp_path) == []


def test_failed_save_model_keeps_the_previous_student(tmp_path):
    trainer = make(tmp_path, max_steps=1)
    trainer.save_model(str(tmp_path / "student"))
    before = {n: (tmp_path / "student" / n).read_bytes() for n in os.listdir(tmp_path / "student")}
    original = failing_save_pretrained(trainer.model)
    with pytest.raises(OSError):
        trainer.save_model(str(tmp_path / "student"))
    assert {n: (tmp_path / "student" / n).read_bytes() for n in os.listdir(tmp_path / "student")} == before
    trainer.model.save_pretrained = original
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))  # a successful save replaces it
    assert (tmp_path / "student" / "model.safetensors").read_bytes() != before["model.safetensors"]
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))


def test_save_model_into_the_run_folder_keeps_its_checkpoints(tmp_path):
    trainer = make(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert hidden_leftovers(out) == [] and hidden_leftovers(tmp_path) == []
    AutoModelForCausalLM.from_pretrained(str(out))
