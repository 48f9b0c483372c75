"""Chunked and fused logit losses equal the reference losses: values and gradients (w.r.t. student logits,
hidden states, LM-head weight and bias), on random and extreme inputs, and through DistillationTrainer."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from hf_kd.config import DistillationConfig
from hf_kd.losses import LOGIT_LOSSES, chunked_logit_loss, fused_cross_entropy, fused_kd_ce, fused_kd_loss
from hf_kd.trainer import DistillationTrainer

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation latency on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("mse", 0.5)]


def reference(kind, beta, zs, zt, **kw):
    extra = {"beta": beta} if kind == "jsd" else {}
    return LOGIT_LOSSES[kind](zs, zt, **extra, **kw)


def assert_close(actual, expected, rtol=1e-5):
    """Relative tolerance, with an absolute floor scaled to the largest expected entry."""
    assert torch.isfinite(actual).all(), actual
    atol = rtol * float(expected.abs().max()) + 1e-12 if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def grad_of(loss_fn, *tensors, weight=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = loss_fn(*leaves)
    (loss if weight is None else (loss * weight).sum()).backward()
    return loss.detach(), [t.grad for t in leaves]


def logits_pair(shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


# ---- chunked losses on logits ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,beta", KINDS)
def test_chunked_matches_reference(kind, beta):
    zs, zt = logits_pair((3, 11, 37))
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    weight = torch.rand(3, 11)
    for temperature in (1.0, 2.5):
        for reduction in ("sum", "mean", "none"):
            kw = dict(temperature=temperature, mask=mask, reduction=reduction)
            w = weight if reduction == "none" else None
            ref, (ref_g,) = grad_of(lambda s: reference(kind, beta, s, zt, **kw), zs, weight=w)
            for chunk_size in (4, 1000):
                out, (g,) = grad_of(lambda s: chunked_logit_loss(s, zt, kind, beta=beta, chunk_size=chunk_size, **kw),
                                    zs, weight=w)
                assert_close(out, ref)
                assert_close(g, ref_g)


@pytest.mark.parametrize("kind,beta", KINDS[:5])
def test_chunked_extreme_inputs(kind, beta):
    """Logits of +-1e4 scale, vocabulary entries -inf for both models, fully masked chunks, all masked."""
    zs, zt = logits_pair((2, 9, 40), scale=1e4, seed=2)
    banned = torch.tensor([3, 17, 39])
    zs[..., banned], zt[..., banned] = -math.inf, -math.inf
    keep = torch.ones(40, dtype=torch.bool)
    keep[banned] = False
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :6] = False  # chunks of 3 that are entirely masked
    for temperature in (1.0, 4.0):
        kw = dict(temperature=temperature, mask=mask, reduction="sum")
        # reference on the finite columns only (its autograd gives NaN through 0 * log 0 for reverse KL)
        ref, (ref_g,) = grad_of(lambda s: reference(kind, beta, s, zt[..., keep], **kw), zs[..., keep])
        out, (g,) = grad_of(lambda s: chunked_logit_loss(s, zt, kind, beta=beta, chunk_size=3, **kw), zs)
        assert_close(out, ref)
        assert_close(g[..., keep], ref_g)
        assert (g[..., banned] == 0).all() and (g[~mask] == 0).all()
    out, (g,) = grad_of(lambda s: chunked_logit_loss(s, zt, kind, beta=beta, mask=torch.zeros(2, 9, dtype=torch.bool),
                                                     reduction="mean", chunk_size=4), zs)
    assert out == 0 and (g == 0).all()


def test_chunked_vocab_limit_noncontiguous_and_no_grad():
    """A [:, :-1] view of the logits and vocab_limit read in place; the rest of the vocabulary gets 0."""
    big_s, big_t = logits_pair((2, 8, 30), seed=3)
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(4)) > 0.2
    kw = dict(temperature=2.0, reduction="sum")
    ref, (ref_g,) = grad_of(lambda s: reference("jsd", 0.3, s[:, :-1, :24], big_t[:, :-1, :24], mask=mask, **kw), big_s)
    out, (g,) = grad_of(lambda s: chunked_logit_loss(s[:, :-1], big_t[:, :-1], "jsd", beta=0.3, mask=mask,
                                                     vocab_limit=24, chunk_size=5, **kw), big_s)
    assert_close(out, ref)
    assert_close(g, ref_g)
    with torch.no_grad():
        out = chunked_logit_loss(big_s[:, :-1], big_t[:, :-1], "jsd", beta=0.3, mask=mask, vocab_limit=24, **kw)
    assert_close(out, ref)
    teacher = big_t.clone().requires_grad_(True)
    chunked_logit_loss(big_s.clone().requires_grad_(True), teacher, "forward_kl").backward()
    assert teacher.grad is None


def test_chunked_bfloat16_gradient_dtype():
    zs, zt = logits_pair((16, 50), seed=5)
    zs, zt = zs.bfloat16(), zt.bfloat16()
    ref, (ref_g,) = grad_of(lambda s: reference("forward_kl", 0.5, s, zt, temperature=2.0), zs)
    out, (g,) = grad_of(lambda s: chunked_logit_loss(s, zt, "forward_kl", temperature=2.0, chunk_size=5), zs)
    assert g.dtype == torch.bfloat16
    assert_close(out, ref, rtol=1e-5)
    assert_close(g.float(), ref_g.float(), rtol=1e-2)


# ---- fused losses on hidden states and heads ---------------------------------------------------------------

def head_inputs(n=23, ds=12, dt=20, v=45, vt=None, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(hs=r(n, ds) * scale, ws=r(v, ds) / math.sqrt(ds), bs=r(v), ht=r(n, dt) * scale,
                wt=r(vt or v, dt) / math.sqrt(dt), bt=r(vt or v))


def reference_sums(hs, ws, bs, x, kind, beta, labels=None, vocab=None, **kw):
    zs, zt = F.linear(hs, ws, bs), F.linear(x["ht"], x["wt"], x["bt"])
    v = vocab or ws.shape[0]
    kd = reference(kind, beta, zs[:, :v], zt[:, :v], reduction="sum", **kw)
    ce = F.cross_entropy(zs, labels, ignore_index=-100, reduction="sum") if labels is not None else zs.new_zeros(())
    return kd, ce


@pytest.mark.parametrize("kind,beta", KINDS)
def test_fused_kd_matches_reference(kind, beta):
    x = head_inputs()
    mask = torch.rand(23, generator=torch.Generator().manual_seed(1)) > 0.25
    for temperature in (1.0, 3.0):
        kw = dict(temperature=temperature, mask=mask)
        ref, ref_g = grad_of(lambda h, w, b: reference_sums(h, w, b, x, kind, beta, **kw)[0], x["hs"], x["ws"], x["bs"])
        for chunk_size in (4, 100):
            out, g = grad_of(lambda h, w, b: fused_kd_loss(h, w, x["ht"], x["wt"], kind=kind, beta=beta,
                                                           chunk_size=chunk_size, student_head_bias=b,
                                                           teacher_head_bias=x["bt"], **kw),
                             x["hs"], x["ws"], x["bs"])
            assert_close(out, ref)
            for a, b in zip(g, ref_g):
                assert_close(a, b)
    mean = fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"], kind=kind, beta=beta, reduction="mean", **kw,
                         student_head_bias=x["bs"], teacher_head_bias=x["bt"])
    assert_close(mean, ref / mask.sum())


@pytest.mark.parametrize("coefs", [(0.3, 0.7), (1.0, 1.0), (1.0, 0.0)])
def test_fused_kd_and_ce_sums(coefs):
    """One pass gives the weighted loss kd_coef * KD + ce_coef * CE, and its gradients are exact."""
    x = head_inputs(v=45, vt=52, seed=3)  # teacher head has padding rows: compare the first 40 entries only
    labels = torch.randint(0, 45, (23,), generator=torch.Generator().manual_seed(2))
    labels[::4] = -100
    mask = labels != -100
    mask[1] = False
    kw = dict(temperature=2.0, mask=mask)
    ref, ref_g = grad_of(lambda h, w, b: (lambda kd, ce: coefs[0] * kd + coefs[1] * ce)(
        *reference_sums(h, w, b, x, "reverse_kl", 0.5, labels=labels, vocab=40, **kw)), x["hs"], x["ws"], x["bs"])

    def fused(h, w, b):
        loss, _, _ = fused_kd_ce(h, w, x["ht"], x["wt"], labels=labels, kind="reverse_kl", chunk_size=5,
                                 vocab_limit=40, student_head_bias=b, teacher_head_bias=x["bt"], kd_coef=coefs[0],
                                 ce_coef=coefs[1], **kw)
        return loss
    out, g = grad_of(fused, x["hs"], x["ws"], x["bs"])
    assert_close(out, ref)
    for a, b in zip(g, ref_g):
        assert_close(a, b)
    ce_ref, ce_g = grad_of(lambda h, w: F.cross_entropy(h @ w.T, labels, reduction="sum"), x["hs"], x["ws"])
    ce, g = grad_of(lambda h, w: fused_cross_entropy(h, w, labels, chunk_size=4), x["hs"], x["ws"])
    assert_close(ce, ce_ref)
    for a, b in zip(g, ce_g):
        assert_close(a, b)


@pytest.mark.parametrize("kind,beta", KINDS[:5])
def test_fused_extreme_inputs(kind, beta):
    """Logits of a few hundred, vocabulary entries banned by -inf biases (both heads), masked chunks, all masked.

    At this scale float32 log-probabilities carry ~eps * |z| ~ 3e-5 absolute error (the float32 reference
    too), so both are compared with a float64 reference on the finite columns at rtol 1e-4.
    """
    x = head_inputs(n=14, scale=300.0, seed=4)
    banned = torch.tensor([0, 7, 44])
    keep = torch.ones(45, dtype=torch.bool)
    keep[banned] = False
    x["bs"][banned], x["bt"][banned] = -math.inf, -math.inf
    labels = torch.randint(1, 7, (14,), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(14, dtype=torch.bool)
    mask[:8] = False
    labels[:8] = -100
    kw = dict(temperature=2.0, mask=mask)
    kept = {k: v.double() for k, v in {**x, "wt": x["wt"][keep], "bt": x["bt"][keep]}.items()}
    kept_labels = torch.where(labels >= 0, (torch.cumsum(keep.long(), 0) - 1)[labels.clamp(min=0)], -100)
    ref, ref_g = grad_of(lambda h, w, b: sum(reference_sums(h, w, b, kept, kind, beta, labels=kept_labels, **kw)),
                         kept["hs"], kept["ws"][keep], kept["bs"][keep])
    out, g = grad_of(lambda h, w, b: fused_kd_ce(h, w, x["ht"], x["wt"], labels=labels, kind=kind, beta=beta,
                                                 chunk_size=4, student_head_bias=b, teacher_head_bias=x["bt"],
                                                 **kw)[0], x["hs"], x["ws"], x["bs"])
    assert_close(out.double(), ref, rtol=1e-4)
    for actual, expected in zip((g[0], g[1][keep], g[2][keep]), ref_g):
        assert_close(actual.double(), expected, rtol=1e-4)
    assert (g[1][banned] == 0).all() and (g[2][banned] == 0).all() and (g[0][:8] == 0).all()
    none = torch.zeros(14, dtype=torch.bool)
    out, g = grad_of(lambda h, w: fused_kd_ce(h, w, x["ht"], x["wt"], labels=torch.full((14,), -100),
                                              mask=none, kind=kind, beta=beta)[0], x["hs"], x["ws"])
    assert out == 0 and all((t == 0).all() for t in g)


# ---- through DistillationTrainer ----------------------------------------------------------------------------

def llama(hidden, layers, tie, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=32, tie_word_embeddings=tie, pad_token_id=0))


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (2, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    ids[1, 9:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[0, :3] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def run(tmp_path, impl, inputs, models=lambda: (llama(24, 2, True, 1), llama(32, 3, False, 2)), **config):
    """One micro-batch through a trainer built with kd_impl=impl (the engine and the signals are fixed at
    construction, from the config): the loss and every trainable parameter's gradient (projections included)."""
    student, teacher = models()
    torch.manual_seed(0)  # the same projection initialisation in every trainer
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, kd_chunk_size=5, kd_impl=impl,
                              **config)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("hidden_weight", [0.0, 0.5])
def test_trainer_full_chunked_fused_agree(tmp_path, hidden_weight):
    inputs = batch()
    for overrides in ({"kd_loss": "forward_kl"}, {"kd_loss": "jsd", "jsd_beta": 0.3},
                      {"kd_loss": "reverse_kl", "alpha_task": 0.0}, {"kd_loss": "forward_kl", "kd_weight": 0.0}):
        config = {"temperature": 2.0, "alpha_task": 0.4, "kd_weight": 1.0, "hidden_weight": hidden_weight,
                  **overrides}
        ref, ref_g = run(tmp_path, "full", inputs, **config)
        for impl in ("chunked", "fused"):
            loss, g = run(tmp_path, impl, inputs, **config)
            assert_close(loss, ref)
            for a, b in zip(g, ref_g):
                assert_close(a, b, rtol=2e-5)


def test_fused_rejects_other_tasks(tmp_path):
    torch.manual_seed(0)
    bert = lambda: BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, vocab_size=128, max_position_embeddings=32))
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, kd_impl="fused")
    with pytest.raises(ValueError, match="fused"):  # refused at construction, before any step
        DistillationTrainer(model=bert(), teacher_model=bert(), args=args)


def test_trainer_masked_lm_chunked_agrees_with_full(tmp_path):
    torch.manual_seed(0)
    bert = lambda layers: BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                                     num_attention_heads=4, vocab_size=128, max_position_embeddings=32,
                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    inputs = batch()
    inputs["labels"] = torch.where(torch.rand(inputs["labels"].shape) < 0.4, inputs["labels"], -100)
    for positions in ("all", "labels"):
        args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, kd_positions=positions)
        assert DistillationTrainer(model=bert(1), teacher_model=bert(2), args=args).kd_impl == "chunked"  # default
        config = dict(temperature=2.0, alpha_task=0.4, kd_weight=1.0, kd_positions=positions)
        models = lambda: (torch.manual_seed(0), bert(1), bert(2))[1:]  # noqa: E731  (the same pair every call)
        ref, ref_g = run(tmp_path, "full", inputs, models=models, **config)
        loss, g = run(tmp_path, "chunked", inputs, models=models, **config)
        assert_close(loss, ref)
        for a, b in zip(g, ref_g):
            assert_close(a, b, rtol=2e-5)


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_trainer_trains_under_bf16_autocast(tmp_path, impl):
    """bf16=True on CPU (autocast): the fused path's logits check must not mistake bf16 rounding for a wrong
    head, and both fast paths must give finite losses that change the student."""
    from datasets import Dataset
    data = Dataset.from_dict({k: v.tolist() for k, v in batch().items()})
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=True, kd_impl=impl,
                              max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_strategy="no",
                              learning_rate=1e-2)
    student = llama(24, 2, True, 1)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = DistillationTrainer(model=student, teacher_model=llama(32, 3, False, 2), args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_fused_refuses_a_model_that_rescales_its_logits(tmp_path):
    """The once-per-model check (logits == lm_head(last hidden)) catches logit scaling / soft-capping."""
    class ScaledLlamaForCausalLM(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if out.logits is not None:
                out.logits = out.logits * 0.8
            return out

    torch.manual_seed(0)
    teacher = llama(32, 3, False, 2)
    student = ScaledLlamaForCausalLM(teacher.config)
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, kd_impl="fused")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    with pytest.raises(ValueError, match="does not compute logits as lm_head"):
        trainer.compute_loss(student, batch())
