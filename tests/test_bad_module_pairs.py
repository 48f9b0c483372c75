"""Every module-name field (hint_layers, at_layers, feature_grad_layers) is probed when the trainer is built: a
missing module, an output that is not token states / feature maps, or tokens off an image model's patch grid are
refused naming the field, the side and the module (not at the first training step)."""

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from .scripts.tiny import one_thread, pair  # noqa: F401  (one_thread: autouse fixture)
from .test_bad_inputs import images, trainer, vit


MODULE_FIELDS = [("hint_weight", "hint_layers"), ("at_weight", "at_layers"), ("feature_grad_weight", "feature_grad_layers")]


def small_resnet():
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                     depths=[1, 1], num_labels=3))


@pytest.mark.parametrize("weight,field", MODULE_FIELDS)
@pytest.mark.parametrize("pairs,message", [
    ("vit.layers.1:classifier.1", r"student module 'classifier.1' outputs shape \(1, 3\), not token states"),
    ("classifier:resnet.encoder.stages.1", r"teacher module 'classifier' outputs shape \(1, 3\), not token states"),
    ("vit.layers.9:resnet.encoder.stages.1", r"teacher module 'vit.layers.9' not found"),
    ("vit.layers.1:resnet.encoder.stage.1", r"student module 'resnet.encoder.stage.1' not found"),
])
def test_module_pairs_are_probed_at_construction(tmp_path, weight, field, pairs, message):
    """Every module-name field: a missing module, or an output that is not a token state / feature map (a classifier's
    Linear), is refused when the trainer is built, naming the field and the module (not at the first step)."""
    with pytest.raises(ValueError, match=f"{field}: " + message):
        trainer(vit(), small_resnet(), tmp_path, train_dataset=images(), hidden_weight=0.0,
                **{weight: 1.0, field: pairs})


def test_attention_transfer_on_tokens_off_a_patch_grid_is_refused(tmp_path):
    teacher, student = pair()
    with pytest.raises(ValueError, match="at_layers: teacher module 'model.layers.1' outputs 4 tokens, not patch tokens"):
        trainer(teacher, student, tmp_path, hidden_weight=0.0, at_weight=1.0, at_layers="model.layers.1:model.layers.0")
