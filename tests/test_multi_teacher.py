"""Several teachers: the mixture target (fixed, learned, confidence and entropy weights, per-teacher temperatures)
against references written here, and through DistillationTrainer (teachers frozen and run only when read, learned
weights trained and logged, feature signals reading any teacher by name)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_kd import DistillationConfig, DistillationTrainer, make_student
from hf_kd.losses.multi import confidence_weights, mixture_logits
from hf_kd.signals import HiddenStates

from .scripts.tiny import llama, one_thread, rows  # noqa: F401  (one_thread: autouse fixture)


def test_mixture_logits_is_the_weighted_mixture():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 3, 7, generator=g) * 3 for _ in range(3)]
    w = torch.tensor([0.5, 0.3, 0.2])
    mix = mixture_logits(z, w, temperature=2.0, temperatures=[1.0, 2.0, 4.0])
    expected = sum(wk * F.softmax(zk / tk, -1) for wk, zk, tk in zip(w, z, (1.0, 2.0, 4.0)))
    torch.testing.assert_close(F.softmax(mix / 2.0, -1), expected)
    per_position = torch.softmax(torch.randn(2, 3, 3, generator=g), -1)  # weights [B, T, K]
    mix = mixture_logits(z, per_position, temperature=1.0)
    expected = sum(per_position[..., k:k + 1] * F.softmax(z[k], -1) for k in range(3))
    torch.testing.assert_close(F.softmax(mix, -1), expected)
    assert mixture_logits(z[:1], torch.ones(1), 3.0).allclose(3.0 * F.log_softmax(z[0] / 3.0, -1), atol=1e-5)
    with pytest.raises(ValueError, match="temperatures"):
        mixture_logits(z, w, 1.0, temperatures=[1.0])


def test_confidence_weights():
    sure, unsure = torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    w = confidence_weights([sure, unsure], torch.tensor([0]))
    p_sure = math.exp(10) / (math.exp(10) + 2)
    assert w[0].tolist() == pytest.approx([p_sure / (p_sure + 1 / 3), (1 / 3) / (p_sure + 1 / 3)])
    wrong = confidence_weights([sure, unsure], torch.tensor([1]))  # the sure teacher is wrong: it counts less
    assert wrong[0, 0] < wrong[0, 1]
    by_entropy = confidence_weights([sure, unsure], torch.tensor([-100]))  # no label: the sharper teacher
    assert by_entropy[0, 0] > 0.5 and by_entropy.sum().item() == pytest.approx(1.0)
    assert torch.equal(by_entropy, confidence_weights([sure, unsure], None, "entropy"))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                teacher_dtype="model", temperature=2.0)
    return DistillationConfig(**{**base, **kw})


def teachers():
    return {"deep": llama(layers=4, seed=0), "wide": llama(hidden=48, layers=2, seed=5)}  # different models


def test_two_teachers_fixed_weights_value(tmp_path):
    """One batch: the KD term is KL(0.7 p_deep + 0.3 p_wide || p_student) at T = 2 (times T^2), per token."""
    t = teachers()
    student = make_student(t["deep"], num_layers=2)
    trainer = DistillationTrainer(model=student, teacher_model=t, train_dataset=rows(),
                                  args=args(tmp_path, alpha_task=0.0, teacher_weights="0.7,0.3", kd_impl="full"))
    batch = trainer.data_collator([rows()[i] for i in range(4)])
    loss = float(trainer.compute_loss(student, dict(batch)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        p = [F.softmax(m(**inputs).logits[:, :-1] / 2.0, -1) for m in (t["deep"], t["wide"])]
        log_q = F.log_softmax(student(**inputs).logits[:, :-1] / 2.0, -1)
    target = 0.7 * p[0] + 0.3 * p[1]
    kl = (target * (target.log() - log_q)).sum(-1) * 4.0
    mask = batch["labels"][:, 1:] != -100
    assert loss == pytest.approx(float(kl[mask].sum() / mask.sum()), rel=1e-4)
    chunked = DistillationTrainer(model=student, teacher_model=t, train_dataset=rows(),
                                  args=args(tmp_path / "c", alpha_task=0.0, teacher_weights="0.7,0.3"))
    assert chunked.kd_impl == "chunked"
    assert float(chunked.compute_loss(student, dict(batch))) == pytest.approx(loss, rel=1e-5)  # the fast path too


@pytest.mark.parametrize("mixing", ["uniform", "confidence", "entropy"])
def test_two_teachers_train_and_stay_frozen(tmp_path, mixing):
    t = teachers()
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in t.items()}
    student = make_student(t["deep"], num_layers=2)
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher_model=t, train_dataset=rows(),
                                  args=args(tmp_path, teacher_weights=mixing, teacher_temperatures="2,4"))
    trainer.train()
    for n, m in t.items():
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before[n].items()), n
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s_before.items())
    assert all(math.isfinite(h["kd_loss"]) for h in trainer.state.log_history if "loss" in h)


def test_learned_teacher_weights_are_trained_and_logged(tmp_path):
    t = teachers()
    student = make_student(t["deep"], num_layers=2)
    with pytest.raises(ValueError, match="kd_impl='full'"):
        DistillationTrainer(model=student, teacher_model=t, train_dataset=rows(),
                            args=args(tmp_path, teacher_weights="learned"))
    with pytest.raises(ValueError, match="use kd_impl='chunked'"):  # fused makes one teacher's logits only
        DistillationTrainer(model=student, teacher_model=t, train_dataset=rows(), args=args(tmp_path, kd_impl="fused"))
    trainer = DistillationTrainer(model=student, teacher_model=t, train_dataset=rows(),
                                  args=args(tmp_path, teacher_weights="learned", kd_impl="full", learning_rate=0.2))
    kd = next(s for s in trainer.signals if s.name == "kd")
    trainer.train()
    assert any(p is kd.mix_logits for g in trainer.optimizer.param_groups for p in g["params"])
    assert not torch.equal(kd.mix_logits.detach(), torch.zeros(2))  # the optimizer really moved them
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        assert h["kd_weight_deep"] + h["kd_weight_wide"] == pytest.approx(1.0, abs=1e-5)
    assert logs[0]["kd_weight_deep"] != logs[-1]["kd_weight_deep"]


def test_a_feature_signal_reads_the_teacher_it_names_and_unread_teachers_do_not_run(tmp_path):
    t = teachers()
    calls = {n: 0 for n in t}
    for n, m in t.items():
        m.register_forward_hook(lambda *a, n=n: calls.__setitem__(n, calls[n] + 1))
    student = make_student(t["deep"], num_layers=2)  # width 32; "wide" has width 48: a projection is learned
    wide_hidden = HiddenStates("wide_hidden", 1.0, pairs=[(0, 0), (2, 2)], teacher="wide",
                               projections=torch.nn.ModuleList([torch.nn.Linear(32, 48), torch.nn.Linear(32, 48)]))
    trainer = DistillationTrainer(model=student, teacher_model=t, train_dataset=rows(), signals=[wide_hidden],
                                  args=args(tmp_path, kd_weight=0.0))
    trainer.train()
    assert calls == {"deep": 0, "wide": 3}  # only the teacher a signal reads runs, once per micro-batch
    assert all(math.isfinite(h["wide_hidden_loss"]) for h in trainer.state.log_history if "loss" in h)
    with pytest.raises(ValueError, match="teachers are"):
        DistillationTrainer(model=student, teacher_model=t, train_dataset=rows(), args=args(tmp_path / "x"),
                            signals=[HiddenStates("h2", 1.0, pairs=[(0, 0)], teacher="nope")])
