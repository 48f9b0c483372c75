"""hf_kd.data transfer sets with a labelled share: the share holds in the batches the Trainer draws, every row is
kept, bad shares are refused."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.data import share_rows, with_transfer_set

BATCH = 16


def rows(n, start, labelled=True):
    """``n`` rows whose first token is the row's id (``start + i``), so drawn rows can be traced back."""
    data = {"input_ids": [[start + i, 5, 6, 7] for i in range(n)]}
    if labelled:
        data["labels"] = [i % 3 for i in range(n)]
    return Dataset.from_dict(data)


def classifier(seed):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, vocab_size=4000, num_labels=3))


def drawn_batches(dataset, tmp_path, seed):
    """The batches of one epoch as DistillationTrainer's own dataloader draws them (its sampler shuffles)."""
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, use_cpu=True,
                              report_to=[], save_strategy="no", seed=seed, teacher_dtype="model")
    trainer = DistillationTrainer(model=classifier(0), teacher_model=classifier(1), args=args,
                                  train_dataset=dataset)
    return list(trainer.get_train_dataloader())


def test_labelled_share_holds_in_trainer_batches(tmp_path):
    """20 labelled rows + 980 unlabelled, share 0.25: without it a batch of 16 holds 0.32 labelled rows on average.

    Bound: the rows are a uniform random permutation, so the labelled count of n drawn rows is hypergeometric with
    mean n*p and variance at most the binomial n*p*(1-p). Over the first 50 batches (800 rows) of each of 3 seeds'
    epochs the share's standard deviation is at most sqrt(p(1-p)/800) = 0.0153; the test allows 4 of them (0.061).
    The variance of a batch's count (binomial: 16*0.25*0.75 = 3) is checked within a factor 2 (the sample variance
    of 50 batches has a relative spread of sqrt(2/49) = 0.2): a clustered order (labelled rows together) would
    give a far larger one."""
    p = 0.25
    dataset = with_transfer_set(rows(20, 1000), rows(980, 2000, labelled=False), labelled_share=p)
    labels = torch.tensor(dataset["labels"])
    assert abs((labels != -100).float().mean().item() - p) < 1 / len(dataset)  # the dataset's share, to one row
    assert set(torch.tensor(dataset["input_ids"])[:, 0].tolist()) == set(range(1000, 1020)) | set(range(2000, 2980))
    bound = 4 * math.sqrt(p * (1 - p) / (50 * BATCH))
    for seed in range(3):
        batches = drawn_batches(dataset, tmp_path, seed)
        counts = torch.tensor([float((b["labels"] != -100).sum()) for b in batches])
        assert counts.sum() == (labels != -100).sum()  # one epoch: every row once, the share exact
        first = counts[:50]
        assert abs(first.sum().item() / (50 * BATCH) - p) < bound, (seed, first.mean())
        assert first.var().item() < 2 * BATCH * p * (1 - p), (seed, first.var())
        drawn_ids = torch.cat([b["input_ids"][:, 0] for b in batches])
        assert torch.equal(drawn_ids.sort().values, torch.tensor(dataset["input_ids"])[:, 0].sort().values)


def test_share_rows_repeats_the_rarer_kind_evenly():
    labelled_first = share_rows(20, 980, 0.25)  # labelled repeated: 327 labelled rows, 980 unlabelled
    assert len(labelled_first) == 1307 and (labelled_first < 20).sum() == 327
    assert sorted(labelled_first[:327].bincount().tolist()) == [16] * 13 + [17] * 7  # 327 = 16*20 + 7
    unlabelled_more = share_rows(500, 500, 0.2)  # unlabelled repeated 4 times each
    assert (unlabelled_more < 500).sum() == 500 and (unlabelled_more >= 500).sum() == 2000
    assert unlabelled_more.bincount().tolist() == [1] * 500 + [4] * 500
    assert share_rows(10, 10, 0.5).tolist() == list(range(20))  # already the share: every row once


def test_without_share_every_row_once():
    both = with_transfer_set(rows(2, 0), rows(3, 10, labelled=False))
    assert both["labels"] == [0, 1, -100, -100, -100]


@pytest.mark.parametrize("share", [0, 1, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_shares_are_refused(share):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        with_transfer_set(rows(2, 0), rows(3, 10, labelled=False), labelled_share=share)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        share_rows(2, 3, share)


def test_share_needs_both_kinds_of_rows():
    with pytest.raises(ValueError, match="needs labelled and unlabelled rows"):
        share_rows(5, 0, 0.5)
    with pytest.raises(ValueError, match="needs labelled and unlabelled rows"):
        with_transfer_set(rows(2, 0), rows(0, 10, labelled=False).cast(rows(1, 0, False).features),
                          labelled_share=0.5)
