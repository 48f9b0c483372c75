"""hf_kd.teachers.pairs: the teacher dtype choice ('auto' loads in bf16 on native-bf16 hardware and never casts a model
object; an explicit dtype casts), and the trainer applying it."""

import math

import pytest
import torch

from hf_kd import DistillationConfig, DistillationTrainer, make_student
from hf_kd.teachers import pairs
from hf_kd.teachers.pairs import cast_teacher, load_dtype

from .test_trainer import CAUSAL, padded_rows

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def real_hardware_check(monkeypatch):
    """These tests check the hardware check itself: CI also runs this file with HF_KD_NATIVE_BF16 forcing it."""
    monkeypatch.delenv(pairs.NATIVE_BF16_ENV, raising=False)


@pytest.mark.parametrize("native", [True, False])
def test_auto_loads_in_bf16_only_on_native_bf16_and_never_casts_an_object(monkeypatch, native):
    monkeypatch.setattr(pairs, "native_bf16", lambda device: native)
    assert load_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert load_dtype("model", CPU) is None
    assert load_dtype("float16", CPU) == torch.float16
    fp32 = torch.nn.Linear(2, 2)
    for choice in ("auto", "model"):
        cast_teacher(fp32, choice)
        assert fp32.weight.dtype == torch.float32


def test_the_environment_variable_forces_the_hardware_check(monkeypatch):
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv(pairs.NATIVE_BF16_ENV, value)
        assert pairs.native_bf16(CPU) is expected
        assert pairs.native_bf16(torch.device("meta")) is expected


@pytest.mark.parametrize("amx,avx512_bf16", [(False, False), (True, False), (False, True), (True, True)])
def test_native_bf16_on_cpu_follows_torchs_capability_flags(monkeypatch, amx, avx512_bf16):
    """True iff torch reports AMX tiles or AVX512-BF16 (raising=False: the private helpers may be missing)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert pairs.native_bf16(CPU) is (amx or avx512_bf16)


def test_native_bf16_without_torchs_private_helpers_is_false(monkeypatch):
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert pairs.native_bf16(CPU) is False


@pytest.mark.parametrize("supported", [True, False])
def test_native_bf16_on_cuda_asks_torch_cuda(monkeypatch, supported):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: calls.append(a) or supported)
    # the CPU flags say the opposite: a CUDA device must not be answered from them
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not supported, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: not supported, raising=False)
    assert pairs.native_bf16(torch.device("cuda", 0)) is supported and len(calls) == 1


def test_native_bf16_is_false_for_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert pairs.native_bf16(torch.device("meta")) is False


def test_an_explicit_teacher_dtype_casts_the_teacher_and_trains(tmp_path):
    teacher = CAUSAL["llama"]()
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2, logging_steps=1,
                              per_device_train_batch_size=4, save_strategy="no", hidden_weight=1.0,
                              teacher_dtype="bfloat16")
    with pytest.warns(UserWarning, match="in place"):
        trainer = DistillationTrainer(model=make_student(teacher, num_layers=2), teacher_model=teacher, args=args,
                                      train_dataset=padded_rows())
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # the student is not touched
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
