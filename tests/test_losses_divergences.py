"""The divergences for LLM distillation (issue #11): skew forward / reverse KL (DistiLLM), total variation and the
teacher-entropy mix of forward and reverse KL. Each is checked against a plain float64 reference written here from its
formula (not the library's reference function): the reference functions, the chunked one-pass loss, the chunked
reference-shaped loss and the fused head loss, values and gradients, with masks, ignored labels, padded teacher
vocabularies and masked (-inf) vocabulary entries; then through DistillationTrainer with kd_impl full / chunked /
fused; and a bad skew_alpha is refused everywhere."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_kd import DistillationConfig
from hf_kd.losses import LOGIT_LOSSES, chunked_kd_ce, chunked_logit_loss, fused_kd_ce, loss_kwargs
from hf_kd.signals import LogitKD

from .scripts.tiny import one_thread  # noqa: F401  (autouse fixture)

NEW = ["skew_forward_kl", "skew_reverse_kl", "tvd", "entropy_kl"]
CASES = [("skew_forward_kl", 0.1), ("skew_forward_kl", 0.6), ("skew_reverse_kl", 0.1), ("skew_reverse_kl", 0.6),
         ("tvd", 0.1), ("entropy_kl", 0.1)]


def kl(a, b):
    """sum_v a log(a / b) with 0 log 0 = 0 (float64 probabilities)."""
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def plain(kind, zs, zt, temperature=1.0, alpha=0.1, vocab=None):
    """Per-position loss from the formula, in float64, T^2 included. ``vocab``: the V of log V (entropy_kl)."""
    q, p = F.softmax(zs.double() / temperature, -1), F.softmax(zt.double() / temperature, -1)
    if kind == "skew_forward_kl":
        loss = kl(p, alpha * p + (1 - alpha) * q)
    elif kind == "skew_reverse_kl":
        loss = kl(q, (1 - alpha) * p + alpha * q)
    elif kind == "tvd":
        loss = 0.5 * (p - q).abs().sum(-1)
    else:
        h = -torch.xlogy(p, p).sum(-1) / math.log(vocab or zs.shape[-1])
        loss = h * kl(p, q) + (1 - h) * kl(q, p)
    return loss * temperature ** 2


def plain_sum(kind, zs, zt, mask, **kw):
    return torch.where(mask, plain(kind, zs, zt, **kw), 0.0).sum()


def pair(n=29, v=37, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale
    mask = torch.rand(n, generator=g) > 0.3
    return zs, zt, mask


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def close(actual, expected, rtol=1e-5):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()) + 1e-9)


# ---- the reference functions against the formulas -------------------------------------------------------------

@pytest.mark.parametrize("kind,alpha", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_reference_matches_the_formula(kind, alpha, temperature):
    zs, zt, mask = pair()
    fn, extra = LOGIT_LOSSES[kind], loss_kwargs(kind, skew_alpha=alpha)
    kw = dict(temperature=temperature, alpha=alpha)
    per_pos = fn(zs, zt, temperature=temperature, reduction="none", **extra)
    close(per_pos, plain(kind, zs, zt, **kw))
    mine, theirs = leaf(zs), leaf(zs.double())
    (fn(mine, zt, temperature=temperature, mask=mask, reduction="sum", **extra) * 1.7).backward()
    (plain_sum(kind, theirs, zt, mask, **kw) * 1.7).backward()
    close(mine.grad, theirs.grad)
    mean = fn(zs, zt, temperature=temperature, mask=mask, reduction="mean", **extra)
    close(mean, plain_sum(kind, zs, zt, mask, **kw) / mask.sum())


def test_special_cases():
    zs, zt, _ = pair()
    for skew, plain_kl in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        assert torch.equal(LOGIT_LOSSES[skew](zs, zt, skew_alpha=0.0, temperature=2.0),
                           LOGIT_LOSSES[plain_kl](zs, zt, temperature=2.0))  # alpha 0 is the plain KL
        assert LOGIT_LOSSES[skew](zs, zt, skew_alpha=0.5) < LOGIT_LOSSES[skew](zs, zt, skew_alpha=0.1)
    for kind in NEW:  # 0 when the student is the teacher
        assert float(LOGIT_LOSSES[kind](zt, zt, reduction="sum", **loss_kwargs(kind))) < 1e-5
    tvd = LOGIT_LOSSES["tvd"](zs * 100, zt * 100, temperature=3.0, reduction="none")
    assert (tvd <= 9.0 + 1e-4).all() and tvd.max() > 8.0  # bounded by T^2 (disjoint supports reach it)
    flat = torch.zeros_like(zt)  # a uniform teacher (h = 1): the forward KL; a one-hot one (h = 0): the reverse KL
    torch.testing.assert_close(LOGIT_LOSSES["entropy_kl"](zs, flat), LOGIT_LOSSES["forward_kl"](zs, flat))
    peaked = torch.full_like(zt, -1e4)
    peaked[:, 3] = 0.0
    torch.testing.assert_close(LOGIT_LOSSES["entropy_kl"](zs, peaked), LOGIT_LOSSES["reverse_kl"](zs, peaked))


# ---- the chunked and fused paths against the formulas ----------------------------------------------------------

@pytest.mark.parametrize("kind,alpha", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_kd_ce_matches_the_formula(kind, alpha, temperature):
    """KD + CE in one pass, ignored labels (-100), a KD mask, a teacher with 5 padding columns (vocab_limit)."""
    zs, zt, mask = pair()
    zt = torch.cat([zt, torch.randn(len(zt), 5)], 1)
    labels = torch.randint(0, 37, (len(zs),), generator=torch.Generator().manual_seed(3))
    labels[::3] = -100
    for width in (37, 30):
        mine = leaf(zs)
        loss, kd, ce = chunked_kd_ce(mine, zt, labels=labels, mask=mask, kind=kind, skew_alpha=alpha,
                                     temperature=temperature, chunk_size=4, vocab_limit=width, kd_coef=0.7,
                                     ce_coef=0.4)
        (2.0 * loss).backward()
        theirs = leaf(zs.double())
        ref_kd = plain_sum(kind, theirs[:, :width], zt[:, :width], mask, temperature=temperature, alpha=alpha)
        ref_ce = F.cross_entropy(theirs, labels, ignore_index=-100, reduction="sum")
        (2.0 * (0.7 * ref_kd + 0.4 * ref_ce)).backward()
        close(kd, ref_kd.detach())
        close(ce, ref_ce.detach())
        close(mine.grad, theirs.grad)


@pytest.mark.parametrize("kind,alpha", CASES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_chunked_logit_loss_matches_the_formula(kind, alpha, reduction):
    """Leading shape [batch, seq] with padded positions masked out, a strided view of the logits."""
    zs, zt, _ = pair(n=3 * 11)
    zs, zt = zs.view(3, 11, 37), zt.view(3, 11, 37)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:], mask[2, 4:] = False, False  # right padding
    mine = leaf(zs)
    out = chunked_logit_loss(mine[:, :-1], zt[:, :-1], kind, skew_alpha=alpha, temperature=2.0, mask=mask[:, :-1],
                             reduction=reduction, chunk_size=3)
    weight = torch.rand(3, 10, generator=torch.Generator().manual_seed(2)) if reduction == "none" else 1.0
    (out * weight).sum().backward()
    theirs = leaf(zs.double())
    ref = torch.where(mask[:, :-1], plain(kind, theirs[:, :-1], zt[:, :-1], temperature=2.0, alpha=alpha), 0.0)
    ref = {"none": ref, "sum": ref.sum(), "mean": ref.sum() / mask[:, :-1].sum()}[reduction]
    (ref * weight).sum().backward()
    close(out, ref.detach())
    close(mine.grad, theirs.grad)
    assert (mine.grad[:, -1] == 0).all()


@pytest.mark.parametrize("kind,alpha", CASES)
def test_masked_vocabulary_and_extreme_logits(kind, alpha):
    """Entries -inf for both models count 0 and get a zero gradient; logits of a few hundred stay finite."""
    zs, zt, mask = pair(scale=100.0, seed=4)
    banned = torch.tensor([0, 11, 36])
    keep = torch.ones(37, dtype=torch.bool)
    keep[banned] = False
    zs[:, banned], zt[:, banned] = -math.inf, -math.inf
    theirs = leaf(zs[:, keep].double())
    ref = plain_sum(kind, theirs, zt[:, keep], mask, temperature=2.0, alpha=alpha, vocab=37)
    ref.backward()
    for impl in ("reference", "chunked"):
        mine = leaf(zs)
        if impl == "reference":
            out = LOGIT_LOSSES[kind](mine, zt, temperature=2.0, mask=mask, reduction="sum",
                                     **loss_kwargs(kind, skew_alpha=alpha))
        else:
            out = chunked_kd_ce(mine, zt, mask=mask, kind=kind, skew_alpha=alpha, temperature=2.0, chunk_size=5)[0]
        out.backward()
        close(out, ref.detach(), rtol=1e-4)
        close(mine.grad[:, keep], theirs.grad, rtol=1e-4)
        assert (mine.grad[:, banned] == 0).all()


@pytest.mark.parametrize("kind,alpha", CASES)
def test_fused_kd_ce_matches_the_formula(kind, alpha):
    """Logits h W^T + b of both models built chunk by chunk: gradients w.r.t. the student's hidden states, head
    weight and bias; the teacher head has 4 padding rows (vocab_limit), some positions masked or unlabelled."""
    g = torch.Generator().manual_seed(5)
    n, d, v = 23, 12, 37
    hs, ws, bs = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / 2, torch.randn(v, generator=g)
    ht, wt, bt = torch.randn(n, 20, generator=g), torch.randn(v + 4, 20, generator=g) / 2, torch.randn(v + 4, generator=g)
    mask = torch.rand(n, generator=g) > 0.25
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    mine = [leaf(x) for x in (hs, ws, bs)]
    loss, kd, _ = fused_kd_ce(mine[0], mine[1], ht, wt, labels=labels, mask=mask, kind=kind, skew_alpha=alpha,
                              temperature=2.0, chunk_size=5, vocab_limit=v, student_head_bias=mine[2],
                              teacher_head_bias=bt, kd_coef=0.8, ce_coef=0.3)
    loss.backward()
    theirs = [leaf(x.double()) for x in (hs, ws, bs)]
    zs, zt = F.linear(*theirs), F.linear(ht.double(), wt[:v].double(), bt[:v].double())
    ref_kd = plain_sum(kind, zs, zt, mask, temperature=2.0, alpha=alpha)
    (0.8 * ref_kd + 0.3 * F.cross_entropy(zs, labels, ignore_index=-100, reduction="sum")).backward()
    close(kd, ref_kd.detach())
    for a, b in zip(mine, theirs):
        close(a.grad, b.grad)


# ---- through the trainer, and the checks ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", NEW)
def test_trainer_full_chunked_fused_agree(tmp_path, kind):
    """One micro-batch of a tiny Llama pair through DistillationTrainer.compute_loss: the three engines give the same
    loss and the same student gradients for every new kd_loss."""
    from hf_kd import DistillationTrainer, make_student

    from .scripts.tiny import args, llama, rows
    teacher = llama()
    losses, grads = {}, {}
    for impl in ("full", "chunked", "fused"):
        student = make_student(teacher, num_layers=2)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(n=4),
                                      args=args(tmp_path / impl, kd_impl=impl, kd_loss=kind, skew_alpha=0.3,
                                                hidden_weight=0.0, alpha_task=0.5, kd_weight=1.3, temperature=2.0,
                                                kd_chunk_size=5))
        assert [s.skew_alpha for s in trainer.signals if s.name == "kd"] == [0.3]  # the config reaches the signal
        batch = trainer.data_collator([rows(n=4)[i] for i in range(4)])
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        losses[impl] = float(loss)
        grads[impl] = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    for impl in ("chunked", "fused"):
        assert losses[impl] == pytest.approx(losses["full"], rel=1e-5)
        assert grads[impl].keys() == grads["full"].keys()
        for k, g in grads["full"].items():
            torch.testing.assert_close(grads[impl][k], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, -0.1, 1.5, float("nan")])
def test_bad_skew_alpha_is_refused(tmp_path, alpha):
    zs, zt, _ = pair(n=4, v=6)
    with pytest.raises(ValueError, match="skew_alpha"):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, kd_loss="skew_forward_kl",
                           skew_alpha=alpha)
    with pytest.raises(ValueError, match="skew_alpha"):
        LogitKD(kind="skew_reverse_kl", skew_alpha=alpha)
    for kind in ("skew_forward_kl", "skew_reverse_kl"):
        with pytest.raises(ValueError, match="skew_alpha"):
            LOGIT_LOSSES[kind](zs, zt, skew_alpha=alpha)
        with pytest.raises(ValueError, match="skew_alpha"):
            chunked_kd_ce(zs, zt, kind=kind, skew_alpha=alpha)
        with pytest.raises(ValueError, match="skew_alpha"):
            fused_kd_ce(zs, torch.eye(6), zs, torch.eye(6), kind=kind, skew_alpha=alpha)
