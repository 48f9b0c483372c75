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
        p, log_q = F.softmax(target.detach() / 2.0, -1), F.log_softmax(learner / 2.0, -1)  # the target: a constant
        return 4.0 * (p * (p.log() - log_q)).sum()
    expected = (F.cross_entropy(zs, y, reduction="sum") + kl(zs, zp) + kl(zp, zs)
                + F.cross_entropy(zp, y, reduction="sum")) / 8
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # the gradients too: each model learns toward the other's detached prediction (a target that took gradients
    # would also pull each prediction toward the other's and change both)
    heads = [student.classifier.weight, peer.classifier.weight]
    for got, want in zip(torch.autograd.grad(loss, heads), torch.autograd.grad(expected, heads)):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

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
    with pytest.raises(ValueError, match="at most one teacher source"):
        DistillationTrainer(model=bert(1, 1), args=args(tmp_path, teacher_cache=str(tmp_path)), train_dataset=texts(),
                            teacher_model=bert(1, 2))


def test_each_peer_trains_with_its_own_learning_rate_and_schedule(tmp_path):
    student, peer = bert(1, 1), bert(1, 2)
    signal = MutualLearning("mutual", 1.0, peers=[peer],
                            peer_optim=[dict(learning_rate=0.01, lr_scheduler_type="constant", weight_decay=0.0)])
    trainer = DistillationTrainer(model=student, train_dataset=texts(), signals=[signal],
                                  args=args(tmp_path, max_steps=4, learning_rate=1e-3, lr_scheduler_type="linear",
                                            weight_decay=0.1))
    trainer.train()
    peer_ids = {id(p) for p in peer.parameters()}
    groups = trainer.optimizer.param_groups
    for g in groups:  # a group holds the peer's parameters or none of them
        assert {id(p) in peer_ids for p in g["params"]} == {g.get("hf_kd_group") == "peer_0"}
    own = [g for g in groups if g.get("hf_kd_group") == "peer_0"]
    assert sum(len(g["params"]) for g in own) == len(peer_ids) and all(g["weight_decay"] == 0.0 for g in own)
    assert {g["weight_decay"] for g in groups if "hf_kd_group" not in g} == {0.0, 0.1}  # the trainer's split kept
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["learning_rate_peer_0"] for h in logs] == [0.01] * 4  # constant
    assert [h["learning_rate"] for h in logs] == pytest.approx([1e-3 * (4 - s) / 4 for s in range(4)])  # linear


def test_config_built_peers_and_the_best_one_ranked(tmp_path):
    student = bert(1, 1)
    trainer = DistillationTrainer(model=student, train_dataset=texts(), args=args(
        tmp_path, mutual_weight=1.0, mutual_peers=2, peer_learning_rate="0.01,0.02", temperature=2.0))
    (signal,) = [s for s in trainer.signals if isinstance(s, MutualLearning)]
    assert len(signal.peers) == 2 and signal.temperature == 2.0
    first = [p.detach().clone() for p in signal.peers[0].parameters()]
    assert not torch.equal(first[0], student.bert.embeddings.word_embeddings.weight)  # fresh, not the student
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(first, signal.peers[0].parameters()))
    rates = [(h["learning_rate_peer_0"], h["learning_rate_peer_1"]) for h in trainer.state.log_history if "loss" in h]
    assert rates[0] == (0.01, 0.02)
    scores = {"student": 0.5, "peer_0": 0.9, "peer_1": 0.1}
    names = {id(student): "student", **{id(p): f"peer_{i}" for i, p in enumerate(signal.peers)}}
    assert signal.ranked(student, lambda m: scores[names[id(m)]]) == [("peer_0", 0.9), ("student", 0.5),
                                                                       ("peer_1", 0.1)]
    with pytest.raises(ValueError, match="one per peer"):
        DistillationTrainer(model=bert(1, 1), train_dataset=texts(), args=args(
            tmp_path / "x", mutual_weight=1.0, mutual_peers=2, peer_learning_rate="0.1,0.2,0.3"))
