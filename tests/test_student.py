"""Tests for hf_kd.tools.student: layer discovery, layer selection, weight copying and provenance."""

import pytest
import torch
import transformers as T
from torch import nn

from hf_kd.flow.layers import find_layers
from hf_kd.tools.student import layer_importance, make_student, select_layers

LAYERS = 4
DECODER = dict(
    hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=LAYERS,
    intermediate_size=64, vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
ENCODER = dict(
    hidden_size=32, num_attention_heads=4, num_hidden_layers=LAYERS, intermediate_size=64, vocab_size=100,
    max_position_embeddings=64,
)
CONFIGS = {
    "gpt2": (T.GPT2Config, dict(n_embd=32, n_head=4, n_layer=LAYERS, vocab_size=100, n_positions=64,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "llama": (T.LlamaConfig, DECODER),
    "qwen2": (T.Qwen2Config, DECODER),
    "mistral": (T.MistralConfig, DECODER),
    "bert": (T.BertConfig, ENCODER),
    "distilbert": (T.DistilBertConfig, dict(dim=32, n_heads=4, n_layers=LAYERS, hidden_dim=64, vocab_size=100,
                                            max_position_embeddings=64)),
    "roberta": (T.RobertaConfig, dict(ENCODER, max_position_embeddings=70)),
    "vit": (T.ViTConfig, dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=LAYERS, intermediate_size=64,
                              image_size=16, patch_size=4, num_labels=3)),
}
MODELS = {
    "GPT2LMHeadModel": ("gpt2", "transformer.h"),
    "GPT2ForSequenceClassification": ("gpt2", "transformer.h"),
    "LlamaForCausalLM": ("llama", "model.layers"),
    "LlamaForSequenceClassification": ("llama", "model.layers"),
    "Qwen2ForCausalLM": ("qwen2", "model.layers"),
    "Qwen2ForSequenceClassification": ("qwen2", "model.layers"),
    "MistralForCausalLM": ("mistral", "model.layers"),
    "MistralForSequenceClassification": ("mistral", "model.layers"),
    "BertForMaskedLM": ("bert", "bert.encoder.layer"),
    "BertForSequenceClassification": ("bert", "bert.encoder.layer"),
    "DistilBertForMaskedLM": ("distilbert", "distilbert.transformer.layer"),
    "DistilBertForSequenceClassification": ("distilbert", "distilbert.transformer.layer"),
    "RobertaForMaskedLM": ("roberta", "roberta.encoder.layer"),
    "RobertaForSequenceClassification": ("roberta", "roberta.encoder.layer"),
    "ViTForImageClassification": ("vit", "vit.layers"),
}
MAIN = ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "BertForMaskedLM",
        "DistilBertForMaskedLM", "RobertaForMaskedLM", "ViTForImageClassification"]
ENCODERS = ("bert", "distilbert", "roberta", "vit")


def build(name, **overrides):
    family = MODELS[name][0]
    config_class, kwargs = CONFIGS[family]
    torch.manual_seed(0)
    return getattr(T, name)(config_class(**{**kwargs, **overrides})).eval()


def inputs(name, batch=2, length=7):
    generator = torch.Generator().manual_seed(1)
    if MODELS[name][0] == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
    ids = torch.randint(3, 100, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True)


@pytest.mark.parametrize("name", MODELS)
def test_find_layers(name):
    model = build(name)
    path, blocks = find_layers(model)
    assert path == MODELS[name][1]
    assert blocks is model.get_submodule(path) and len(blocks) == LAYERS


@pytest.mark.parametrize("name", MODELS)
def test_student_with_all_layers_reproduces_teacher(name):
    teacher = build(name)
    student = make_student(teacher, layers=range(LAYERS))
    assert type(student) is type(teacher) and student is not teacher
    batch = inputs(name)
    assert torch.equal(run(student, batch).logits, run(teacher, batch).logits)


@pytest.mark.parametrize("name", MAIN)
def test_subset_student_layers_and_prefix_hidden_states(name):
    teacher = build(name)
    student = make_student(teacher, layers=[0, 1])
    _, blocks = find_layers(student)
    assert len(blocks) == 2 and student.config.num_hidden_layers == 2
    assert student.config.hf_kd_teacher_layers == [0, 1]
    batch = inputs(name)
    ours, theirs = run(student, batch).hidden_states, run(teacher, batch).hidden_states
    assert len(ours) == 3
    # Decoders apply the final norm to the last reported hidden state, encoders do not.
    compared = 3 if MODELS[name][0] in ENCODERS else 2
    for index in range(compared):
        torch.testing.assert_close(ours[index], theirs[index], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", MAIN)
def test_subset_weights_are_mapped(name):
    teacher = build(name)
    student = make_student(teacher, layers=[3, 0, 2])  # sorted silently
    assert student.config.hf_kd_teacher_layers == [0, 2, 3]
    path, teacher_blocks = find_layers(teacher)
    _, student_blocks = find_layers(student)
    for new, old in enumerate([0, 2, 3]):
        for (key, ours), (_, theirs) in zip(student_blocks[new].state_dict().items(), teacher_blocks[old].state_dict().items()):
            assert torch.equal(ours, theirs), key
    outside = lambda model: {k: v for k, v in model.state_dict().items() if not k.startswith(path + ".")}
    ours, theirs = outside(student), outside(teacher)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name", MAIN)
def test_save_load_roundtrip_keeps_provenance_and_outputs(name, tmp_path):
    student = make_student(build(name), layers=[1, 3])
    student.save_pretrained(tmp_path)
    loaded = type(student).from_pretrained(tmp_path).eval()
    assert loaded.config.hf_kd_teacher_layers == [1, 3]
    assert len(find_layers(loaded)[1]) == 2
    batch = inputs(name)
    assert torch.equal(run(loaded, batch).logits, run(student, batch).logits)


def test_config_layer_count_attribute_per_architecture():
    assert make_student(build("GPT2LMHeadModel"), layers=[0, 1]).config.n_layer == 2
    assert make_student(build("DistilBertForMaskedLM"), layers=[0, 1]).config.n_layers == 2
    assert make_student(build("BertForMaskedLM"), layers=[0, 1]).config.num_hidden_layers == 2


def test_teacher_untouched():
    teacher = build("LlamaForCausalLM")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_student(teacher, num_layers=2)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert teacher.config.num_hidden_layers == LAYERS and not hasattr(teacher.config, "hf_kd_teacher_layers")
    assert len(teacher.model.layers) == LAYERS


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "BertForMaskedLM", "LlamaForCausalLM"])
def test_tied_embeddings_stay_tied(name):
    teacher = build(name, tie_word_embeddings=True)
    student = make_student(teacher, layers=[0, 2])
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


def test_dtype_follows_teacher():
    teacher = build("LlamaForCausalLM").to(torch.bfloat16)
    student = make_student(teacher, layers=range(LAYERS))
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    batch = inputs("LlamaForCausalLM")
    assert torch.equal(run(student, batch).logits, run(teacher, batch).logits)


def test_selection_strategies():
    assert select_layers(12, 6, "distilbert") == [0, 2, 4, 7, 9, 11]
    assert select_layers(12, 6, "uniform") == [1, 3, 5, 7, 9, 11]
    assert select_layers(12, 4, "uniform") == [2, 5, 8, 11]
    assert select_layers(12, 3, "first") == [0, 1, 2]
    assert select_layers(12, 3, "last") == [9, 10, 11]
    assert select_layers(24, 12, "distilbert") == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
    for total in range(1, 25):
        for n in range(1, total + 1):
            for strategy in ("distilbert", "uniform", "first", "last"):
                kept = select_layers(total, n, strategy)
                assert len(kept) == n and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < total
            spread = select_layers(total, n, "distilbert")
            assert spread[0] == 0 and (n == 1 or spread[-1] == total - 1)
            assert spread == [total - 1 - i for i in reversed(spread)] or n % 2 == 1
            assert select_layers(total, n, "uniform")[-1] == total - 1
    with pytest.raises(ValueError, match="unknown strategy"):
        select_layers(12, 6, "random")
    with pytest.raises(ValueError, match="between 1 and"):
        select_layers(12, 13, "first")


@pytest.mark.parametrize("strategy", ["distilbert", "uniform", "first", "last"])
def test_make_student_with_strategy(strategy):
    student = make_student(build("BertForMaskedLM"), num_layers=2, strategy=strategy)
    assert student.config.hf_kd_teacher_layers == select_layers(LAYERS, 2, strategy)
    assert student.config.num_hidden_layers == 2 and not hasattr(student.config, "hf_kd_layer_scores")


def test_invalid_layer_arguments():
    teacher = build("BertForMaskedLM")
    for layers, message in [([0, 0], "duplicates"), ([0, 4], "out of range"), ([-1], "out of range"), ([], "empty")]:
        with pytest.raises(ValueError, match=message):
            make_student(teacher, layers=layers)
    with pytest.raises(ValueError, match="not both"):
        make_student(teacher, layers=[0], num_layers=1)
    with pytest.raises(ValueError, match="num_layers"):
        make_student(teacher)
    with pytest.raises(ValueError, match="calibration_batches"):
        make_student(teacher, num_layers=2, strategy="importance")


def _silence_layer(model, index):
    """Zero the output projections of a Llama block: the block becomes the identity."""
    block = model.model.layers[index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_importance_drops_identity_layer():
    teacher = build("LlamaForCausalLM").train()
    _silence_layer(teacher, 1)
    batches = [inputs("LlamaForCausalLM"), inputs("LlamaForCausalLM", batch=1, length=5)]
    scores = layer_importance(teacher, batches)
    assert len(scores) == LAYERS and scores[1] < 1e-6 and min(scores[0], scores[2], scores[3]) > 1e-3
    assert teacher.training  # mode restored
    student = make_student(teacher, num_layers=3, strategy="importance", calibration_batches=batches)
    assert student.config.hf_kd_teacher_layers == [0, 2, 3]
    assert student.config.hf_kd_layer_scores == pytest.approx(scores)


def test_importance_ignores_padding():
    teacher = build("BertForMaskedLM")
    full = inputs("BertForMaskedLM", batch=1, length=5)
    padded = {"input_ids": torch.cat([full["input_ids"], torch.zeros(1, 3, dtype=torch.long)], dim=1),
              "attention_mask": torch.cat([full["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], dim=1)}
    assert layer_importance(teacher, [padded]) == pytest.approx(layer_importance(teacher, [full]), abs=1e-6)


def test_importance_roundtrip(tmp_path):
    teacher = build("GPT2LMHeadModel")
    student = make_student(teacher, num_layers=2, strategy="importance", calibration_batches=[inputs("GPT2LMHeadModel")])
    student.save_pretrained(tmp_path)
    loaded = T.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.hf_kd_layer_scores == pytest.approx(student.config.hf_kd_layer_scores)
    assert loaded.config.hf_kd_teacher_layers == student.config.hf_kd_teacher_layers


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel"])
def test_decoder_student_generates_with_cache(name):
    student = make_student(build(name), layers=[0, 2, 3])
    indices = sorted({m.layer_idx for block in find_layers(student)[1] for m in block.modules() if hasattr(m, "layer_idx")})
    assert indices == [0, 1, 2]
    prompt = inputs(name, batch=1, length=4)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    cached = student.generate(**prompt, use_cache=True, **kwargs)
    uncached = student.generate(**prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 9) and torch.equal(cached, uncached)


def test_per_layer_config_lists_are_cut():
    teacher = build("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=3, max_window_layers=2)
    assert teacher.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    student = make_student(teacher, layers=[0, 2, 3])
    assert student.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    prompt = inputs("Qwen2ForCausalLM", batch=1, length=4)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(student.generate(**prompt, use_cache=True, **kwargs),
                       student.generate(**prompt, use_cache=False, **kwargs))


def test_student_of_student_replaces_provenance():
    first = make_student(build("LlamaForCausalLM"), num_layers=3, strategy="importance",
                         calibration_batches=[inputs("LlamaForCausalLM")])
    second = make_student(first, layers=[0, 2])
    assert second.config.hf_kd_teacher_layers == [0, 2] and not hasattr(second.config, "hf_kd_layer_scores")


class _NoLayersModel(T.PreTrainedModel):
    config_class = T.PretrainedConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(4, 4)
        self.post_init()


def test_unsupported_models_raise():
    with pytest.raises(ValueError, match="Linear.*layers_path"):
        find_layers(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="_NoLayersModel"):
        make_student(_NoLayersModel(T.PretrainedConfig()), num_layers=1)


def test_explicit_layers_path():
    teacher = build("BertForMaskedLM")
    assert find_layers(teacher, "bert.encoder.layer")[1] is teacher.bert.encoder.layer
    with pytest.raises(ValueError, match="not an nn.ModuleList"):
        find_layers(teacher, "bert.embeddings")
    student = make_student(teacher, layers=[1], layers_path="bert.encoder.layer")
    assert len(student.bert.encoder.layer) == 1
