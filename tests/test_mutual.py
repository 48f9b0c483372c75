"""Deep mutual learning: no teacher, the student and a peer each learn their task loss plus T^2 KL to the other's
detached prediction; both train, the value is the formula written out here, the peer is saved on its own."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.signals import MutualLearning

from .test_signals_features import bert, texts


def args(tmp_path, **kw):
    return DistillationConfig(**{**dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                                        kd_weight=0.0, disable_tqdm=True), **kw})


def test_mutual_learning_value_and_training(tmp_path):
    student, peer = bert(1, 1), bert(1, 2)
    for m in (student, peer):
        m.eval()  # no dropout: the reference below sees the same networks
    signal = MutualLearning("mutual", 1.0, peers=[peer], temperature=2.0)
    trainer = DistillationTrainer(model=student, args=args(tmp_path), train_dataset=texts(), signals=[signal])
    batch = trainer.data_collator([texts()[i] for i in range(8)])
    inputs, y = {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    loss = trainer.compute_loss(student, dict(batch))
    zs, zp = student(**inputs).logits, peer(**inputs).logits

    def kl(learner, target):  # T^2 KL(softmax(target / T) || softmax(learner / T)), summed over examples
        p, log_q = F.softmax(target / 2.0, -1), F.log_softmax(learner / 2.0, -1)
        return 4.0 * (p * (p.log() - log_q)).sum()
    expected = (F.cross_entropy(zs, y, reduction="sum") + kl(zs, zp) + kl(zp, zs)
                + F.cross_entropy(zp, y, reduction="sum")) / 8
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert peer.classifier.weight.grad.abs().sum() > 0 and student.classifier.weight.grad.abs().sum() > 0

    before = {k: v.clone() for k, v in peer.state_dict().items()}
    trainer = DistillationTrainer(model=bert(1, 3), args=args(tmp_path / "t"), train_dataset=texts(),
                                  signals=[MutualLearning("mutual", 1.0, peers=[peer])])
    trainer.train()
    assert any(not torch.equal(v, peer.state_dict()[k]) for k, v in before.items())  # the peer trained too
    assert all(h["mutual_loss"] > 0 for h in trainer.state.log_history if "loss" in h)
    (folder,) = trainer.signals[-1].save_peers(str(tmp_path / "peers"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    torch.testing.assert_close(reloaded.eval()(**inputs).logits, peer.eval()(**inputs).logits)


def test_no_teacher_needs_teacher_free_signals(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTrainer(model=bert(1, 1), args=args(tmp_path, kd_weight=1.0), train_dataset=texts(),
                            signals=[MutualLearning("mutual", 1.0, peers=[bert(1, 2)])])
    with pytest.raises(ValueError, match="either teacher_model"):
        DistillationTrainer(model=bert(1, 1), args=args(tmp_path), train_dataset=texts())
