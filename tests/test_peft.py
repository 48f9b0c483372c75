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


def lora(base, **kw):
    return peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw))


def test_lora_student_merges_into_a_plain_folder_that_pipeline_loads(tmp_path, tiny_tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, pipeline

    from hf_kd import DistillationTrainer
    from hf_kd.tools.peft_utils import merge_student
    teacher, _ = pair()
    student = lora(make_student(teacher, num_layers=2))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=args(tmp_path, hidden_weight=1.0, learning_rate=5e-2))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    student.eval()
    with torch.no_grad():
        before = student(input_ids=ids).logits
    merged = merge_student(student, str(tmp_path / "plain"), processing_class=tiny_tokenizer)
    assert not any("lora_" in n or "hf_kd_signals" in n for n, _ in merged.named_parameters())
    folder = tmp_path / "plain"
    assert not (folder / "adapter_config.json").exists()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not any("lora_" in k or "hf_kd_signals" in k or "base_layer" in k for k in f.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)
    generate = pipeline("text-generation", model=str(folder), device="cpu")
    text = generate("once upon a time", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("once upon a time")


def test_same_base_teacher_is_the_base_with_adapters_off_and_one_copy_of_the_weights(tmp_path):
    import copy

    from hf_kd import DistillationTrainer
    from hf_kd.tools.peft_utils import SameBaseTeacher, parameter_bytes
    from tests.scripts.tiny import llama
    base = llama(layers=2)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        reference = base.eval()(input_ids=ids).logits
    separate = copy.deepcopy(base)  # what a second teacher copy would hold
    student = lora(base, lora_dropout=0.1)
    teacher = SameBaseTeacher(student)
    assert list(teacher.parameters()) == []
    passes = []  # (inference mode, adapters disabled, training) at a LoRA layer, for every forward
    layer = student.get_base_model().model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda m, *_: passes.append(
        (torch.is_inference_mode_enabled(), m.disable_adapters, m.training)))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=args(tmp_path, hidden_weight=0.0, kd_weight=1.0, learning_rate=5e-2))
    trainer.train()
    assert passes[:2] == [(True, True, False), (False, False, True)]  # teacher first, then the student
    assert set(passes) == {(True, True, False), (False, False, True)} and len(passes) == 2 * 3
    assert all(p.requires_grad for n, p in student.named_parameters() if "lora_" in n)  # left trainable
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, reference)  # the base, untouched by training
        assert not torch.allclose(student.eval()(input_ids=ids).logits, reference)  # the adapters trained
    shared = {p.data_ptr() for p in teacher.get_base_model().parameters()}
    assert {p.data_ptr() for n, p in student.named_parameters() if "lora_" not in n} <= shared
    one, two = parameter_bytes(student, teacher), parameter_bytes(student, separate)
    base_bytes = parameter_bytes(separate)
    assert one == parameter_bytes(student) and two - one == base_bytes  # the saving: one whole copy of the base
    with pytest.raises(ValueError, match="teacher_dtype"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                            args=args(tmp_path, teacher_dtype="bfloat16"))


def test_qlora_student_needs_a_gpu_and_bitsandbytes():
    from hf_kd.tools.peft_utils import qlora_student
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA GPU"):
            qlora_student("unused", peft.LoraConfig(r=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels)")
def test_qlora_student_trains_with_its_base_as_teacher(tmp_path):
    pytest.importorskip("bitsandbytes")
    from hf_kd import DistillationTrainer
    from hf_kd.tools.peft_utils import SameBaseTeacher, qlora_student
    from tests.scripts.tiny import llama
    llama(hidden=64, layers=2).save_pretrained(str(tmp_path / "base"))
    student = qlora_student(str(tmp_path / "base"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = DistillationTrainer(model=student, teacher_model=SameBaseTeacher(student), train_dataset=rows(),
                                  args=args(tmp_path / "run", hidden_weight=0.0, use_cpu=False, bf16=True,
                                            learning_rate=5e-2))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) and math.isfinite(h["kd_loss"]) for h in logged)
    lora_b = [p for n, p in student.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)
