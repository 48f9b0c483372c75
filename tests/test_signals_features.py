"""The seeds' feature-level methods as signals: each trains a tiny student through DistillationTrainer (student
changes, teacher bit-identical, its component finite and logged under its own name), with its math checked
against references written here."""

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (BertConfig, BertForSequenceClassification, ResNetConfig, ResNetForImageClassification,
                          ViTConfig, ViTForImageClassification)

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.signals.hints import adapter_for, as_map

from .scripts.tiny import one_thread  # noqa: F401  (autouse fixture)


def vit(seed=0, layers=2):
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16,
                                               num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                                               num_labels=3))


def resnet(seed=1):
    torch.manual_seed(seed)
    return ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 12],
                                                     depths=[1, 1], num_labels=3))


def bert(layers, seed, attn="eager"):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                                    num_attention_heads=4, vocab_size=40, num_labels=3,
                                                    attn_implementation=attn))


def images(n=16):
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"pixel_values": torch.rand(n, 1, 8, 8, generator=g).tolist(),
                              "labels": torch.randint(0, 3, (n,), generator=g).tolist()}).with_format("torch")


def texts(n=16, length=9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        mask[i, 3 + i % (length - 3):] = 0
    ids[mask == 0] = 0
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                              "labels": torch.randint(0, 3, (n,), generator=g).tolist()})


def train(tmp_path, teacher, student, data, **kw):
    """Train 3 steps; check the teacher is untouched, the student moved, and each named component was logged."""
    names = kw.pop("expect")
    callbacks = kw.pop("callbacks", None)
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                save_strategy="no", logging_steps=1, learning_rate=1e-2, seed=0, teacher_dtype="model",
                disable_tqdm=True)
    args = DistillationConfig(**{**base, **kw})
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  callbacks=callbacks)
    trainer.train()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items()), "teacher changed"
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in student_before.items() if k in
               student.state_dict()), "student did not change"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for name in names:
        assert all(math.isfinite(h[f"{name}_loss"]) and h[f"{name}_loss"] > 0 for h in logs), name
    return trainer


# ---- hints -------------------------------------------------------------------------------------------------

def test_as_map_lays_tokens_on_the_patch_grid():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float).reshape(2, 17, 3)  # class token + 4 x 4 patches
    grid = as_map(tokens)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[1, 2, 1, 3], tokens[1, 1 + 1 * 4 + 3, 2])  # patch (row 1, col 3), feature 2
    assert as_map(tokens[:, 1:]).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="square"):
        as_map(tokens[:, :7])


def test_adapters_follow_the_shapes():
    assert isinstance(adapter_for((1, 5, 8), (1, 5, 8)), torch.nn.Identity)
    assert isinstance(adapter_for((1, 5, 8), (1, 5, 16)), torch.nn.Linear)
    conv = adapter_for((1, 12, 4, 4), (1, 17, 16))  # CNN student -> ViT teacher tokens (width 16)
    assert isinstance(conv[0], torch.nn.Conv2d) and conv[0].out_channels == 16 and conv[0].kernel_size == (1, 1)


@pytest.mark.parametrize("normalize", [False, True])
def test_hint_vit_teacher_to_cnn_student(tmp_path, normalize):
    trainer = train(tmp_path, vit(), resnet(), images(), hint_weight=1.0, hint_normalize=normalize,
                    hint_layers="vit.layers.1:resnet.encoder.stages.1", expect=["hint", "task", "kd"])
    hint = next(s for s in trainer.signals if s.name == "hint")
    assert isinstance(hint.adapters[0][0], torch.nn.Conv2d)  # trained with the student, in its optimizer
    ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in hint.adapters.parameters()} <= ids


def test_hint_value_is_the_reference(tmp_path):
    """One batch: the hint component equals the MSE written out here (identity adapter, same widths)."""
    teacher, student = vit(0), vit(1)
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, teacher_dtype="model",
                              alpha_task=0.0, kd_weight=0.0, hint_weight=1.0, hint_layers="vit.layers.0:vit.layers.1")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=images())
    batch = {"pixel_values": torch.rand(4, 1, 8, 8), "labels": torch.tensor([0, 1, 2, 0])}
    loss = trainer.compute_loss(student, batch)
    feats = {}
    teacher.vit.layers[0].register_forward_hook(lambda m, a, o: feats.__setitem__("t", o[0] if isinstance(o, tuple) else o))
    student.vit.layers[1].register_forward_hook(lambda m, a, o: feats.__setitem__("s", o[0] if isinstance(o, tuple) else o))
    teacher(pixel_values=batch["pixel_values"]), student(pixel_values=batch["pixel_values"])
    expected = ((feats["s"] - feats["t"]) ** 2).mean(-1).mean(-1).sum() / 4  # per example: mean over tokens, dims
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_fitnets_first_stage_trains_only_up_to_the_hint(tmp_path):
    """Stage 1 (first half): only the hint trains, so the student's head and later stage do not move."""
    from transformers import TrainerCallback
    student = resnet()
    heads = [student.classifier[1].weight.detach().clone()]

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            heads.append(student.classifier[1].weight.detach().clone())
    trainer = train(tmp_path, vit(), student, images(), hint_weight=1.0, hint_first_stage=0.7, max_steps=2,
                    hint_layers="vit.layers.0:resnet.encoder.stages.0", expect=["hint"], callbacks=[Watch()])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["kd_weight"] == 0 and logs[0]["alpha_task"] == 0 and logs[1]["kd_weight"] == 1.0
    assert "kd_loss" not in logs[0] and "kd_loss" in logs[1]
    assert torch.equal(heads[0], heads[1])  # step 1 trained the hint alone: the head got no gradient
    assert not torch.equal(heads[1], heads[2])  # step 2 (after the stage) moved it


# ---- attention -------------------------------------------------------------------------------------------------

def test_spatial_attention_transfer_cnn_and_vit_maps(tmp_path):
    train(tmp_path, vit(), resnet(), images(), at_weight=10.0, kd_weight=0.0,
          at_layers="vit.layers.1:resnet.encoder.stages.1,vit.layers.0:resnet.encoder.stages.0",
          expect=["attention_transfer", "task"])


def test_attention_probabilities_transfer(tmp_path):
    """BERT teacher (4 layers) -> 2-layer student with fewer heads: the loss is the KL written out here."""
    teacher, student = bert(4, 0), bert(2, 1)
    trainer = train(tmp_path, teacher, student, texts(), attention_weight=1.0, attention_layers="1:0,3:1",
                    expect=["attention", "kd", "task"])
    batch = trainer.data_collator([texts()[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    student.eval()  # no attention dropout: probabilities that sum to 1
    with torch.no_grad():
        a_t = teacher(**inputs, output_attentions=True).attentions
        a_s = student(**inputs, output_attentions=True).attentions
    mask = batch["attention_mask"].bool()
    expected = 0.0
    for t, s in ((1, 0), (3, 1)):
        p, q = a_t[t], a_s[s]  # same head count here: head by head, mean over heads
        kl = (torch.xlogy(p, p) - p * torch.log(q.clamp(min=1e-12))).sum(-1).mean(1)  # [B, T]
        expected += kl[mask].sum() / 2
    sig = next(s for s in trainer.signals if s.name == "attention")
    from hf_kd.flow.align import position_masks
    from hf_kd.flow.capture import Captured
    from hf_kd.signals import Context
    ctx = Context("classification", inputs, batch["labels"], position_masks(batch, "classification"),
                  Captured(attentions={0: a_s[0], 1: a_s[1]}), Captured(attentions={1: a_t[1], 3: a_t[3]}))
    assert float(sig.loss_sum(ctx)) == pytest.approx(float(expected), rel=1e-4)


def test_attention_signal_switches_to_eager_attention(tmp_path):
    teacher, student = bert(2, 0, attn="sdpa"), bert(1, 1, attn="sdpa")
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, attention_weight=1.0,
                              attention_layers="1:0")
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=texts())
    assert teacher.config._attn_implementation == "eager" and student.config._attn_implementation == "eager"


# ---- gradients -----------------------------------------------------------------------------------------------------

def test_input_gradient_matching_images(tmp_path):
    trainer = train(tmp_path, vit(), resnet(), images(), input_grad_weight=100.0, expect=["input_gradient", "kd"])
    metrics = trainer.evaluate(images(8))  # evaluation runs under no_grad: the gradients still get their graph
    assert metrics["eval_input_gradient_loss"] > 0 and math.isfinite(metrics["eval_loss"])


def test_input_gradient_value_is_the_reference(tmp_path):
    teacher, student = vit(0), vit(1)
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, teacher_dtype="model",
                              alpha_task=0.0, kd_weight=0.0, input_grad_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=images())
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    loss = trainer.compute_loss(student, {"pixel_values": x, "labels": y})
    grads = []
    for m in (teacher, student):
        leaf = x.clone().requires_grad_(True)
        F.cross_entropy(m(pixel_values=leaf).logits, y, reduction="sum").backward()
        grads.append(leaf.grad)
    expected = ((grads[0] - grads[1]) ** 2).sum() / 4
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    loss.backward()  # the double backward reaches the student's weights
    assert student.classifier.weight.grad is not None and student.classifier.weight.grad.abs().sum() > 0


def test_input_gradient_text_needs_the_same_embedding_width(tmp_path):
    trainer = train(tmp_path, bert(2, 0), bert(1, 1), texts(), input_grad_weight=10.0, expect=["input_gradient"])
    assert trainer.evaluate(texts(8))["eval_input_gradient_loss"] > 0  # under no_grad too
    torch.manual_seed(2)
    narrow = BertForSequenceClassification(BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, vocab_size=40, num_labels=3))
    args = DistillationConfig(output_dir=str(tmp_path / "x"), report_to=[], use_cpu=True, input_grad_weight=1.0)
    with pytest.raises(ValueError, match="widths must match"):
        DistillationTrainer(model=narrow, teacher_model=bert(2, 0), args=args, train_dataset=texts())


def test_great_trains_its_discriminator(tmp_path):
    trainer = train(tmp_path, vit(), resnet(), images(), great_weight=1.0, expect=["great", "kd"])
    sig = next(s for s in trainer.signals if s.name == "great")
    assert isinstance(sig.discriminator[0], torch.nn.Linear) and sig.discriminator[0].in_features == 64
    ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in sig.discriminator.parameters()} <= ids


def test_great_gradients_go_the_right_way():
    """The student's term pushes D's output on student gradients up (fool), D's own term pushes it down."""
    from hf_kd.flow.capture import Captured
    from hf_kd.signals import AdversarialGradient, Context
    torch.manual_seed(0)  # unseeded it failed about 1 run in 4 (the discriminator step's first-order margin)
    sig = AdversarialGradient("great", hidden=8)
    sig.discriminator.extend([torch.nn.Linear(4, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1)])
    g_s = torch.randn(3, 2, 4, requires_grad=True)  # text-shaped [B, T, D] input gradients
    g_t = torch.randn(3, 2, 4)
    ctx = Context("classification", {}, None, {"hidden": torch.ones(3, 2, dtype=torch.bool)},
                  Captured(input_grad=g_s), Captured(input_grad=g_t))
    loss = sig.loss_sum(ctx)
    loss.backward()
    step = 1e-3
    with torch.no_grad():
        before = sig.discriminator(g_s.mean(1)).sum()
        after_student = sig.discriminator((g_s - step * g_s.grad).mean(1)).sum()
        for p in sig.discriminator.parameters():
            p -= step * p.grad
        after_disc = sig.discriminator(g_s.mean(1)).sum()
    assert after_student > before  # a student step makes its gradients look more like the teacher's to D
    assert after_disc < before  # a discriminator step tells them apart better


# ---- augmentation consistency ------------------------------------------------------------------------------------

def test_multi_view_collator_and_training(tmp_path):
    from hf_kd.data.views import MultiViewCollator, random_shift, token_dropout
    feats = [images()[i] for i in range(4)]
    coll = MultiViewCollator(random_shift(1), views=3)
    batch = coll(feats)
    assert batch["pixel_values"].shape == (12, 1, 8, 8) and batch["labels"].tolist() == [*batch["labels"][:4]] * 3
    assert torch.equal(batch["pixel_values"][:4], torch.stack([f["pixel_values"] for f in feats]))
    assert not torch.equal(batch["pixel_values"][4:8], batch["pixel_values"][:4])
    background = {"pixel_values": torch.full((2, 3, 6, 6), -0.42)}  # a normalised image's background is not 0
    assert torch.all(random_shift(2)(background, torch.Generator().manual_seed(1))["pixel_values"] == -0.42)
    text = MultiViewCollator(token_dropout(mask_token_id=39, p=0.5), views=2)([texts()[i] for i in range(4)])
    dropped = text["input_ids"][4:] == 39
    assert dropped.any() and not (dropped & (text["attention_mask"][4:] == 0)).any()  # padding never dropped
    args = DistillationConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                              use_cpu=True, save_strategy="no", logging_steps=1, teacher_dtype="model")
    trainer = DistillationTrainer(model=resnet(), teacher_model=vit(), args=args, train_dataset=images(),
                                  data_collator=coll)
    trainer.train()
    assert all(math.isfinite(h["kd_loss"]) for h in trainer.state.log_history if "loss" in h)


def test_feature_gradient_matching(tmp_path):
    """Gradients of the task loss w.r.t. mapped module outputs (ViT tokens on the grid vs ResNet maps, 1x1 conv
    adapter), and the value against a reference written here (same architecture, identity adapter)."""
    train(tmp_path / "a", vit(), resnet(), images(), feature_grad_weight=100.0, expect=["feature_gradient", "kd"],
          feature_grad_layers="vit.layers.1:resnet.encoder.stages.1")
    teacher, student = vit(0), vit(1)
    args = DistillationConfig(output_dir=str(tmp_path / "b"), report_to=[], use_cpu=True, teacher_dtype="model",
                              alpha_task=0.0, kd_weight=0.0, feature_grad_weight=1.0,
                              feature_grad_layers="vit.layers.0:vit.layers.1")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=images())
    student.eval()  # no dropout in either pass: the reference below sees the same network
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    loss = trainer.compute_loss(student, {"pixel_values": x, "labels": y})
    grads = []
    for model, layer in ((teacher, teacher.vit.layers[0]), (student, student.vit.layers[1])):
        feats = {}

        def keep(m, a, out):
            feats["f"] = out[0] if isinstance(out, tuple) else out
            feats["f"].retain_grad()
        handle = layer.register_forward_hook(keep)
        leaf = x.clone().requires_grad_(True)  # so the frozen teacher's features require grad too
        F.cross_entropy(model(pixel_values=leaf).logits, y, reduction="sum").backward()
        handle.remove()
        grads.append(feats["f"].grad)
    expected = ((grads[0] - grads[1]) ** 2).sum() / 4  # per example: summed over tokens and features
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_input_and_feature_gradients_together_are_the_sum_of_each(tmp_path):
    """Both gradient signals in one pass (the teacher's input leaf and its module outputs in one graph): the loss is
    the sum of each signal's loss alone (it used to fail: detached module outputs cut the input's graph)."""
    teacher, student = vit(0), vit(1)
    student.eval()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    losses = {}
    for name, kw in (("input", {"input_grad_weight": 1.0}), ("feature", {"feature_grad_weight": 1.0}),
                     ("both", {"input_grad_weight": 1.0, "feature_grad_weight": 1.0})):
        args = DistillationConfig(output_dir=str(tmp_path / name), report_to=[], use_cpu=True, alpha_task=0.0,
                                  kd_weight=0.0, feature_grad_layers="vit.layers.0:vit.layers.1", **kw)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=images())
        losses[name] = float(trainer.compute_loss(student, {"pixel_values": x, "labels": y}))
    assert losses["both"] == pytest.approx(losses["input"] + losses["feature"], rel=1e-5)
