"""A PEFT (LoRA) student: only the adapters and the signals' parts train, the saved folder is a PEFT adapter
without the signals, and it reloads."""

import math

import pytest
import torch

from hf_kd import make_student

from .scripts.tiny import args, one_thread, pair, rows  # noqa: F401  (one_thread: autouse fixture)

peft = pytest.importorskip("peft")


def test_lora_student_with_a_hidden_signal(tmp_path):
    from hf_kd import DistillationTrainer
    teacher, _ = pair()
    base = make_student(teacher, num_layers=2)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    student = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=args(tmp_path, hidden_weight=1.0, learning_rate=5e-2))
    trainer.train()
    after = base.state_dict()
    lora = [k for k in after if "lora_" in k]
    assert lora and any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if "lora_B" in k)
    untouched = [k for k in frozen if "lora_" not in k and "hf_kd_signals" not in k]
    assert all(torch.equal(frozen[k], after[k.replace(".weight", ".base_layer.weight")] if k not in after else after[k])
               for k in untouched)  # the base weights did not train
    assert all(math.isfinite(h["hidden_loss"]) for h in trainer.state.log_history if "loss" in h)
    trainer.save_model(str(tmp_path / "adapter"))
    saved = peft.PeftModel.from_pretrained(make_student(teacher, num_layers=2), str(tmp_path / "adapter"))
    assert not any("hf_kd_signals" in k for k in saved.state_dict())
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(saved(input_ids=ids).logits, student(input_ids=ids).logits)
