"""The one-pass KD + cross-entropy loss (hf_kd.losses.kd_ce) equals the reference losses added up: values and
gradients, for every kind, dense and cached (top-k) teachers, vocab limits, extreme and masked inputs."""

import pytest
import torch
import torch.nn.functional as F

from hf_kd.losses import LOGIT_LOSSES
from hf_kd.losses.kd_ce import chunked_kd_ce
from hf_kd.teachers.cache import topk_kl, topk_targets

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("mse", 0.5)]


def reference_grad(zs, zt, labels, mask, kind, beta, temperature, width, kd_coef, ce_coef, topk=None):
    leaf = zs.detach().clone().requires_grad_(True)
    if topk is not None:
        kd = topk_kl(leaf, *topk, temperature=temperature, mask=mask, reduction="sum")
    else:
        extra = {"beta": beta} if kind == "jsd" else {}
        kd = LOGIT_LOSSES[kind](leaf[:, :width], zt[:, :width], temperature=temperature, mask=mask, reduction="sum",
                                **extra)
    ce = F.cross_entropy(leaf, labels, ignore_index=-100, reduction="sum")
    (3.0 * (kd_coef * kd + ce_coef * ce)).backward()  # any common factor (DDP's process count, GA...)
    return kd.detach(), ce.detach(), leaf.grad


def mine_grad(zs, zt, labels, mask, kind, beta, temperature, width, kd_coef, ce_coef, topk=None, chunk=8):
    leaf = zs.detach().clone().requires_grad_(True)
    loss, kd, ce = chunked_kd_ce(leaf, zt, teacher_topk=topk, labels=labels, mask=mask, kind=kind, beta=beta,
                                 temperature=temperature, chunk_size=chunk, vocab_limit=width if width != zs.shape[1]
                                 else None, kd_coef=kd_coef, ce_coef=ce_coef)
    assert not kd.requires_grad and not ce.requires_grad  # logged values; the loss carries the gradient
    torch.testing.assert_close(loss.detach(), kd_coef * kd + ce_coef * ce)
    (3.0 * loss).backward()
    return kd, ce, leaf.grad


def inputs(n=37, v=50, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    mask = torch.rand(n, generator=g) > 0.3
    return zs, zt, labels, mask


def assert_all_close(a, b, rtol=1e-5):
    for x, y in zip(a, b):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.abs().max()) + 1e-6)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("width", [50, 45])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_teacher_matches_reference(kind, beta, width, temperature):
    zs, zt, labels, mask = inputs()
    args = (zs, zt, labels, mask, kind, beta, temperature, width, 0.7, 0.3)
    assert_all_close(mine_grad(*args), reference_grad(*args))


@pytest.mark.parametrize("k", [1, 8, 50])
def test_topk_teacher_matches_reference(k):
    zs, zt, labels, mask = inputs()
    ids, lp, tail = topk_targets(zt, k, 2.0)
    topk = (ids, lp.half(), tail.half())  # the cache's storage dtype: p and r no longer sum to exactly 1
    args = (zs, None, labels, mask, "forward_kl", 0.5, 2.0, 50, 1.0, 0.5)
    assert_all_close(mine_grad(*args, topk=topk), reference_grad(*args, topk=topk))


def test_one_part_only_and_fully_masked_chunks():
    zs, zt, labels, mask = inputs()
    mask[:16] = False  # two whole chunks of 8 without KD positions ...
    labels[:8] = -100  # ... one of them without CE either: zero gradient there
    leaf = zs.clone().requires_grad_(True)
    loss, kd, ce = chunked_kd_ce(leaf, zt, labels=labels, mask=mask, chunk_size=8)
    loss.backward()
    assert torch.equal(leaf.grad[:8], torch.zeros_like(leaf.grad[:8]))
    ref = reference_grad(zs, zt, labels, mask, "forward_kl", 0.5, 1.0, 50, 1.0, 1.0)
    assert_all_close((kd, ce, leaf.grad * 3.0), ref)
    kd_only = chunked_kd_ce(zs, zt, mask=mask, chunk_size=8)  # no labels: CE is 0
    assert float(kd_only[2]) == 0.0 and torch.allclose(kd_only[1], ref[0])
    ce_only = chunked_kd_ce(zs, labels=labels, chunk_size=8)  # no teacher: KD is 0
    assert float(ce_only[1]) == 0.0 and torch.allclose(ce_only[2], ref[1])


def test_extreme_logits_and_masked_vocabulary():
    zs, zt, labels, mask = inputs(scale=1e4)
    zs[:, -5:], zt[:, -5:] = float("-inf"), float("-inf")  # a vocabulary masked out for both models
    labels = labels.clamp(max=40)
    args = (zs, zt, labels, mask, "forward_kl", 0.5, 2.0, 50, 1.0, 1.0)
    mine = mine_grad(*args)
    assert torch.equal(mine[2][:, -5:], torch.zeros_like(mine[2][:, -5:]))
    assert_all_close(mine, reference_grad(*args), rtol=1e-4)


def test_bfloat16_logits_give_bfloat16_gradient():
    zs, zt, labels, mask = inputs()
    leaf = zs.bfloat16().requires_grad_(True)
    loss, _, _ = chunked_kd_ce(leaf, zt.bfloat16(), labels=labels, mask=mask, chunk_size=8)
    loss.backward()
    assert leaf.grad.dtype == torch.bfloat16
    ref = reference_grad(leaf.detach().float(), zt.bfloat16().float(), labels, mask, "forward_kl", 0.5, 1.0, 50, 1, 1)
    torch.testing.assert_close(leaf.grad.float() * 3.0, ref[2], rtol=2e-2, atol=2e-2)


def test_the_loss_is_the_weighted_sum_and_bad_shapes_are_named():
    """No weights-must-match contract: the returned loss is kd_coef * KD + ce_coef * CE with its gradient, and any
    further use of it (a scale, a sum with other terms) is ordinary autograd."""
    zs, zt, labels, mask = inputs()
    leaf = zs.clone().requires_grad_(True)
    loss, kd, ce = chunked_kd_ce(leaf, zt, labels=labels, mask=mask, kd_coef=0.25, ce_coef=2.0)
    (loss * 5.0 + leaf.sum()).backward()
    ref = reference_grad(zs, zt, labels, mask, "forward_kl", 0.5, 1.0, 50, 0.25, 2.0)
    torch.testing.assert_close(leaf.grad, ref[2] * 5.0 / 3.0 + 1.0, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="backward called twice"):
        loss.backward()
    with pytest.raises(ValueError, match="expected \\[37\\]"):
        chunked_kd_ce(zs, zt, labels=labels[:5])
    with pytest.raises(ValueError, match="expected \\[N, V\\]"):
        chunked_kd_ce(zs, zt[:, :10])
    with pytest.raises(ValueError, match="'forward_kl' only"):
        chunked_kd_ce(zs, teacher_topk=topk_targets(zt, 4), kind="reverse_kl")


def test_automatic_chunks_hold_8_mib():
    from hf_kd.losses.chunked import resolve_chunk_size
    assert resolve_chunk_size(None, 151_936) == 13 and resolve_chunk_size(0, 49_152) == 42
    assert resolve_chunk_size(7, 49_152) == 7 and resolve_chunk_size(None, 10 ** 9) == 1
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        resolve_chunk_size(-1, 100)
    zs, zt, labels, mask = inputs()  # the default (automatic) chunking gives the same sums
    assert_all_close(chunked_kd_ce(zs, zt, labels=labels, mask=mask),
                     chunked_kd_ce(zs, zt, labels=labels, mask=mask, chunk_size=5))
