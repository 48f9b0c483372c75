"""Be-your-own-teacher self-distillation: exits on intermediate layers learn from the labels and the model's own
detached final output; the value is the formula written out here; ViT and ResNet; exits never saved."""

import pytest
import torch
import torch.nn.functional as F

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.signals import SelfDistillation

from .test_signals_features import images, resnet, vit


def args(tmp_path, **kw):
    return DistillationConfig(**{**dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                                        kd_weight=0.0, disable_tqdm=True), **kw})


def test_exit_value_is_the_formula(tmp_path):
    model = vit(layers=2)
    model.eval()  # no dropout, for the reference
    sig = SelfDistillation("byot", 1.0, exits=[1], temperature=3.0)
    trainer = DistillationTrainer(model=model, args=args(tmp_path), train_dataset=images(), signals=[sig])
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    loss = trainer.compute_loss(model, {"pixel_values": x, "labels": y})
    out = model(pixel_values=x, output_hidden_states=True)
    exit_logits = sig.heads[0](out.hidden_states[1].mean(1))
    p, log_q = F.softmax(out.logits.detach() / 3.0, -1), F.log_softmax(exit_logits / 3.0, -1)  # a detached target
    expected = (9.0 * (p * (p.log() - log_q)).sum() + F.cross_entropy(exit_logits, y, reduction="sum")
                + F.cross_entropy(out.logits, y, reduction="sum")) / 4  # the exit's terms + the model's own task loss
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # the gradients too: the final head learns from its labels only, never toward its own exits
    params = [model.classifier.weight, sig.heads[0][1].weight]
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make,exits", [(vit, [1]), (resnet, [1])])
def test_exits_train_and_are_not_saved(tmp_path, make, exits):
    model = make()
    sig = SelfDistillation("byot", 1.0, exits=exits, feature_weight=0.1)
    trainer = DistillationTrainer(model=model, args=args(tmp_path), train_dataset=images(), signals=[sig])
    before = [p.detach().clone() for p in sig.heads.parameters()]
    trainer.train()
    assert any(not torch.equal(b, p) for b, p in zip(before, sig.heads.parameters()))
    assert all(h["byot_loss"] > 0 for h in trainer.state.log_history if "loss" in h)
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert not any("hf_kd_signals" in k for k in f.keys())
    with pytest.raises(ValueError, match="out of range"):
        DistillationTrainer(model=make(), args=args(tmp_path / "x"), train_dataset=images(),
                            signals=[SelfDistillation("byot", 1.0, exits=[9])])
