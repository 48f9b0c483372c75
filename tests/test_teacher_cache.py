"""Offline teacher cache: the top-k KL, its exactness at k = V, and a cache built from a real (tiny) model."""

import os

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_kd.losses import forward_kl
from hf_kd.teachers.cache import CACHE_COLUMNS, build_teacher_cache, load_teacher_cache, topk_kl, topk_targets


def rand(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_full_k_equals_forward_kl(t):
    s, te = rand(2, 5, 11, seed=1), rand(2, 5, 11, seed=2)
    mask = torch.rand(2, 5) > 0.3
    ids, lp, tail = topk_targets(te, 11, t)
    got = topk_kl(s, ids, lp, tail, temperature=t, mask=mask)
    assert got.item() == pytest.approx(forward_kl(s, te, temperature=t, mask=mask).item(), rel=1e-4, abs=1e-6)


def test_tail_bucket_formula_and_lower_bound():
    s, te = rand(6, 20, seed=3), rand(6, 20, seed=4)
    k, t = 5, 2.0
    ids, lp, tail = topk_targets(te, k, t)
    p, q = torch.softmax(te / t, -1), torch.softmax(s / t, -1)
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    r, qr = 1 - pk.sum(-1), 1 - qk.sum(-1)
    want = ((pk * (pk / qk).log()).sum(-1) + r * (r / qr).log()).mean() * t * t
    got = topk_kl(s, ids, lp, tail, temperature=t)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert got.item() <= forward_kl(s, te, temperature=t).item() + 1e-6  # log-sum inequality


def test_gradients_are_finite_for_peaked_teacher():
    te = torch.zeros(3, 30)
    te[:, 0] = 1e4  # all mass on one token: tail mass 0
    s = rand(3, 30, seed=5).requires_grad_(True)
    ids, lp, tail = topk_targets(te, 4, 1.0)
    loss = topk_kl(s, ids, lp, tail)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_build_and_load_cache(tmp_path):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    ids = torch.randint(0, 64, (5, 12)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 5, "labels": ids})
    meta = build_teacher_cache(teacher, ds, str(tmp_path / "cache"), k=8, temperature=2.0, batch_size=2)
    assert meta["k"] == 8 and meta["tokens"] == 60
    assert meta["cache_bytes_per_token"] == pytest.approx(8 * 4 + 8 * 2 + 2, rel=0.05)
    cached, meta2 = load_teacher_cache(str(tmp_path / "cache"))
    assert meta2 == meta and set(CACHE_COLUMNS) <= set(cached.column_names)
    row = cached[0]
    with torch.no_grad():
        ref_ids, ref_lp, ref_tail = topk_targets(teacher(input_ids=torch.tensor([ids[0]])).logits[0], 8, 2.0)
    assert torch.equal(row["teacher_topk_ids"].long(), ref_ids)
    torch.testing.assert_close(row["teacher_topk_logprobs"].float(), ref_lp, atol=2e-2, rtol=1e-3)
    assert not os.path.exists(str(tmp_path / "cache") + ".tmp")
    with pytest.raises(FileNotFoundError, match="cache-teacher"):
        load_teacher_cache(str(tmp_path))


def test_trainer_trains_from_cache_with_no_teacher(tmp_path):
    from hf_kd import DistillationConfig, DistillationTrainer, make_student
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    ids = torch.randint(0, 64, (8, 12)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 8, "labels": ids})
    build_teacher_cache(teacher, ds, str(tmp_path / "cache"), k=64, temperature=2.0, storage_dtype="float32")
    student = make_student(teacher, num_layers=1)
    base = dict(output_dir=str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                save_strategy="no", disable_tqdm=True, logging_steps=1, temperature=2.0, seed=0)
    trainer = DistillationTrainer(model=student, args=DistillationConfig(teacher_cache=str(tmp_path / "cache"), **base))
    assert trainer.teacher is None
    trainer.train()
    cached_logs = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    online = DistillationTrainer(model=make_student(teacher, num_layers=1), teacher_model=teacher,
                                 args=DistillationConfig(kd_impl="full", teacher_dtype="model", **base), train_dataset=ds)
    online.train()
    online_logs = [h["kd_loss"] for h in online.state.log_history if "kd_loss" in h]
    assert cached_logs == pytest.approx(online_logs, rel=1e-3)  # k = V, float32: the same objective
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=student, args=DistillationConfig(teacher_cache=str(tmp_path / "cache"),
                                                                   **{**base, "temperature": 1.0}))


def test_a_reusable_cache_is_made_once_and_keyed_by_content(tmp_path):
    from hf_kd.teachers.cache import reusable_cache
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    ids = torch.randint(0, 64, (4, 12)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 4, "labels": ids})
    folder, meta = reusable_cache(teacher, ds, teacher_name="t", k=8, root=str(tmp_path))
    assert not meta["reused"] and meta["build_seconds"] > 0 and teacher.training  # its mode given back
    again, meta2 = reusable_cache(teacher, ds, teacher_name="t", k=8, root=str(tmp_path))
    assert again == folder and meta2["reused"] and meta2["build_seconds"] == meta["build_seconds"]
    other = Dataset.from_dict({"input_ids": ids[::-1], "attention_mask": [[1] * 12] * 4, "labels": ids[::-1]})
    assert reusable_cache(teacher, other, teacher_name="t", k=8, root=str(tmp_path))[0] != folder  # other rows
    assert reusable_cache(teacher, ds, teacher_name="t", k=4, root=str(tmp_path))[0] != folder  # other k


def tiny_classifier(num_labels=5, seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    num_labels=num_labels))


def test_a_classifier_cache_holds_the_exact_distribution_and_trains_like_the_online_teacher(tmp_path):
    from hf_kd import DistillationConfig, DistillationTrainer, make_student
    teacher = tiny_classifier()
    ids = torch.randint(1, 40, (8, 10), generator=torch.Generator().manual_seed(1)).tolist()
    labels = [0, 3, -100, -100, 1, -100, 4, -100]  # a transfer set: unlabelled rows are distilled too
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 10] * 8, "labels": labels})
    meta = build_teacher_cache(teacher, ds, str(tmp_path / "cache"), k=5, temperature=1.0, storage_dtype="float32")
    assert meta["task"] == "classification" and meta["vocab_size"] == 5 and meta["positions"] == 8
    cached, _ = load_teacher_cache(str(tmp_path / "cache"))
    assert cached[0]["teacher_topk_ids"].shape == (5,) and cached[0]["teacher_tail_logmass"].shape == ()
    assert teacher.training  # its mode given back (the cache ran it in eval mode: no dropout)
    with torch.no_grad():
        want = torch.log_softmax(teacher.eval()(input_ids=torch.tensor(ids[:1])).logits[0], -1)
    got = torch.full((5,), float("nan")).scatter(0, cached[0]["teacher_topk_ids"].long(),
                                                 cached[0]["teacher_topk_logprobs"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # k = labels: the whole distribution

    base = dict(output_dir=str(tmp_path / "o"), max_steps=3, per_device_train_batch_size=4, report_to=[],
                save_strategy="no", disable_tqdm=True, logging_steps=1, temperature=1.0, seed=0,
                kd_positions="all", hidden_weight=0.0, kd_impl="full", teacher_dtype="model")
    runs = {}
    for name, kwargs in {"cache": dict(args=DistillationConfig(teacher_cache=str(tmp_path / "cache"), **base)),
                         "online": dict(teacher_model=teacher, train_dataset=ds, args=DistillationConfig(**base))}.items():
        trainer = DistillationTrainer(model=make_student(teacher, num_layers=1), **kwargs)
        trainer.train()
        runs[name] = [(h["kd_loss"], h["task_loss"]) for h in trainer.state.log_history if "kd_loss" in h]
    assert len(runs["cache"]) == 3 and runs["cache"] == pytest.approx(runs["online"], rel=1e-4)
    with pytest.raises(ValueError, match="vocabulary 5 != student vocabulary 3"):
        DistillationTrainer(model=tiny_classifier(num_labels=3), args=DistillationConfig(
            teacher_cache=str(tmp_path / "cache"), **base))
    with pytest.raises(ValueError, match="made by a classification teacher"):
        DistillationTrainer(model=LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=1, num_attention_heads=4,
                                                               num_key_value_heads=2, vocab_size=5)),
                            args=DistillationConfig(teacher_cache=str(tmp_path / "cache"), **base))


def test_masked_views_mask_each_row_views_times_with_equal_lengths(tiny_tokenizer):
    from hf_kd.data import masked_views
    from tests.conftest import sentences
    rows = Dataset.from_dict({"input_ids": [tiny_tokenizer(s)["input_ids"] for s in sentences(40)]})
    views = masked_views(rows, tiny_tokenizer, views=3, mlm_probability=0.3, seed=5)
    assert len(views) == 120 and len({len(r) for r in views["input_ids"]}) == 1
    longest = max(len(r) for r in rows["input_ids"])
    mask_id, pad_id = tiny_tokenizer.mask_token_id, tiny_tokenizer.pad_token_id
    for v in range(3):
        for i in (0, 17, 39):
            r, original = views[v * 40 + i], rows[i]["input_ids"]
            n = len(original)
            assert len(r["input_ids"]) == longest and r["attention_mask"] == [1] * n + [0] * (longest - n)
            assert r["input_ids"][n:] == [pad_id] * (longest - n) and set(r["labels"][n:]) <= {-100}
            for tok, label, orig in zip(r["input_ids"], r["labels"], original):  # labels: the original at masks
                assert label == orig if label != -100 else tok == orig
    assert views["labels"][:40] != views["labels"][40:80]  # each view its own masks
    assert 0.15 < sum(x != -100 for r in views["labels"] for x in r) / (3 * sum(map(len, rows["input_ids"]))) < 0.45
    at_masks = [t for r in views for t, label in zip(r["input_ids"], r["labels"]) if label != -100]
    assert 0.6 < sum(t == mask_id for t in at_masks) / len(at_masks) < 0.95  # 80% [MASK], the rest random or kept
    assert masked_views(rows, tiny_tokenizer, 3, 0.3, seed=5)["input_ids"] == views["input_ids"]  # seeded
    with pytest.raises(ValueError, match="views"):
        masked_views(rows, tiny_tokenizer, views=0)


def test_trainer_trains_a_masked_lm_from_its_cache_as_from_the_teacher(tmp_path, tiny_tokenizer):
    """k = V in float32: the cached objective equals online KD on the same static masks (KD at every position)."""
    from transformers import BertConfig, BertForMaskedLM, default_data_collator

    from hf_kd import DistillationConfig, DistillationTrainer, make_student
    from hf_kd.data import masked_views
    from hf_kd.teachers.cache import reusable_cache
    from tests.conftest import sentences
    torch.manual_seed(0)
    V = len(tiny_tokenizer)
    teacher = BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=V))
    rows = Dataset.from_dict({"input_ids": [tiny_tokenizer(s)["input_ids"] for s in sentences(16)]})
    views = masked_views(rows, tiny_tokenizer, views=2, mlm_probability=0.3)
    folder, meta = reusable_cache(teacher, views, teacher_name="tiny-bert", k=V, temperature=1.0,
                                  storage_dtype="float32", root=str(tmp_path / "caches"))
    assert meta["task"] == "masked_lm" and not meta["reused"]
    relabelled = Dataset.from_dict({**views.to_dict(), "labels": views["labels"][::-1]})  # other masks' labels
    assert reusable_cache(teacher, relabelled, teacher_name="tiny-bert", k=V, temperature=1.0,
                          storage_dtype="float32", root=str(tmp_path / "caches"))[0] != folder
    base = dict(output_dir=str(tmp_path / "o"), max_steps=3, per_device_train_batch_size=8, report_to=[],
                save_strategy="no", disable_tqdm=True, logging_steps=1, temperature=1.0, seed=0, kd_impl="full",
                hidden_weight=0.0, kd_positions="all")
    student = make_student(teacher, num_layers=1)
    cached = DistillationTrainer(model=student, args=DistillationConfig(teacher_cache=folder, **base),
                                 data_collator=default_data_collator)
    assert cached.teacher is None
    cached.train()
    online = DistillationTrainer(model=make_student(teacher, num_layers=1), teacher_model=teacher,
                                 args=DistillationConfig(teacher_dtype="model", **base), train_dataset=views,
                                 data_collator=default_data_collator)
    online.train()
    logs = [[h["kd_loss"] for h in t.state.log_history if "kd_loss" in h] for t in (cached, online)]
    assert len(logs[0]) == 3 and logs[0] == pytest.approx(logs[1], rel=1e-3)
