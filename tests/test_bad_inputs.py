"""What hf_kd refuses, and how it says so: the readable list of handled bad inputs.

Every case must fail with an error that says what is wrong and how to fix it, and where it can, before any
training step (at DistillationTrainer construction or in DistillationConfig). docs/troubleshooting.md lists the
same errors for users.
"""

import math
import random
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, DataCollatorForLanguageModeling,
                          GPT2Config, GPT2LMHeadModel, ResNetConfig, ResNetForImageClassification, ViTConfig,
                          ViTForImageClassification)

from hf_kd import DistillationConfig, DistillationTrainer, make_student, reliability
from hf_kd.teachers.pairs import load_teacher

from .conftest import WORDS
from .scripts.tiny import V, args, llama, one_thread, pair, rows  # noqa: F401  (one_thread: autouse fixture)


def trainer(teacher=None, student=None, tmp_path=None, **kw):
    if teacher is None:
        teacher, student = pair()
    data = {k: kw.pop(k) for k in ("train_dataset", "eval_dataset", "processing_class", "teacher_processing_class",
                                   "data_collator") if k in kw}
    data.setdefault("train_dataset", rows())
    return DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path / "out", **kw), **data)


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[SEP]")


# ---- tokenizers and vocabularies ---------------------------------------------------------------------------
def test_teacher_tokenizer_with_other_ids_is_refused(tmp_path):
    student_tok, teacher_tok = word_tokenizer(WORDS), word_tokenizer(reversed(WORDS))
    with pytest.raises(ValueError, match=r"(?s)different ids.*same family"):
        trainer(tmp_path=tmp_path, processing_class=student_tok, teacher_processing_class=teacher_tok)


def test_teacher_tokenizer_with_extra_tokens_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"1 only in the teacher \(e.g. \['dragon'\]\)"):
        trainer(tmp_path=tmp_path, processing_class=word_tokenizer(WORDS),
                teacher_processing_class=word_tokenizer(WORDS + ["dragon"]))


def test_identical_teacher_tokenizer_is_accepted(tmp_path):
    trainer(tmp_path=tmp_path, processing_class=word_tokenizer(WORDS), teacher_processing_class=word_tokenizer(WORDS))


def test_teacher_tokenizer_without_student_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pass both"):
        trainer(tmp_path=tmp_path, teacher_processing_class=word_tokenizer(WORDS))


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_vocabulary_size_mismatch_is_refused(tmp_path, tiny_tokenizer, with_tokenizer):
    extra = {"processing_class": tiny_tokenizer} if with_tokenizer else {}  # 37 tokens > the student's 30
    with pytest.raises(ValueError, match=r"teacher vocabulary \(40\) and student vocabulary \(30\) differ"):
        trainer(llama(), llama(hidden=16, layers=2, vocab=30), tmp_path, **extra)


def test_a_head_far_larger_than_the_tokenizer_is_another_tokenizer(tmp_path, tiny_tokenizer):
    """The student's own 37-token tokenizer fits in both heads, but the teacher's head has 600 more rows than it has
    tokens: that is another tokenizer's vocabulary, not padding, and its ids mean other tokens."""
    with pytest.raises(ValueError, match=r"teacher vocabulary \(640\) and student vocabulary \(40\) differ"):
        trainer(llama(vocab=640), llama(hidden=16, layers=2, vocab=40), tmp_path, processing_class=tiny_tokenizer)


def test_vocabulary_padding_rows_warn_and_truncate(tmp_path, tiny_tokenizer):
    with pytest.warns(UserWarning, match="differ only by padding rows"):
        t = trainer(llama(), llama(hidden=16, layers=2, vocab=48), tmp_path, processing_class=tiny_tokenizer,
                    max_steps=1)
    assert t.kd_vocab == V
    t.train()
    assert math.isfinite(t.state.log_history[0]["kd_loss"])


# ---- teacher and student that do not match ------------------------------------------------------------------
def bert_classifier(num_labels=3, id2label=None, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                     num_labels=num_labels, **({"id2label": id2label} if id2label else {}))
    return BertForSequenceClassification(cfg)


def test_different_tasks_are_refused(tmp_path):
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=V))
    with pytest.raises(ValueError, match="teacher is a causal_lm model .* but the student is a masked_lm model"):
        trainer(llama(), bert, tmp_path)


def test_different_number_of_labels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher has 3 labels, student 2"):
        trainer(bert_classifier(3), bert_classifier(2), tmp_path)


def test_different_label_names_are_refused(tmp_path):
    names = {0: "neg", 1: "neu", 2: "pos"}
    with pytest.raises(ValueError, match="id2label"):
        trainer(bert_classifier(3, names), bert_classifier(3, {0: "pos", 1: "neu", 2: "neg"}), tmp_path)


def test_regression_head_needs_mse(tmp_path):
    with pytest.raises(ValueError, match="kd_loss='mse'"):
        trainer(bert_classifier(1), bert_classifier(1), tmp_path)


def test_hidden_loss_on_a_cnn_is_refused(tmp_path):
    torch.manual_seed(0)
    resnet = ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                       depths=[1, 1], num_labels=3))
    with pytest.raises(ValueError, match="set hidden_weight=0"):
        trainer(vit(), resnet, tmp_path, train_dataset=images())


def test_no_signal_with_a_weight_is_refused(tmp_path):
    """By the config when it is built, and by the trainer for a config changed after (attributes are mutable)."""
    with pytest.raises(ValueError, match="all 0: nothing to train"):
        args(tmp_path, alpha_task=0.0, kd_weight=0.0, hidden_weight=0.0)
    changed = args(tmp_path)
    changed.alpha_task = changed.kd_weight = changed.hidden_weight = 0.0
    teacher, student = pair()
    with pytest.raises(ValueError, match="no signal has a weight > 0"):
        DistillationTrainer(model=student, teacher_model=teacher, args=changed, train_dataset=rows())


def test_width_mismatch_without_projection_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use_projection=True or hidden_weight=0"):
        trainer(tmp_path=tmp_path, use_projection=False)


def test_layer_map_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"pair 9:1 is out of range: the teacher has hidden states 0..4"):
        trainer(tmp_path=tmp_path, layer_map="0:0,9:1")


def test_wrong_trainer_arguments_are_refused(tmp_path):
    teacher, student = pair()
    from transformers import TrainingArguments
    with pytest.raises(TypeError, match="DistillationConfig"):
        DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(str(tmp_path)))
    with pytest.raises(ValueError, match="teacher_model="):
        DistillationTrainer(model=student, args=args(tmp_path))


# ---- data ---------------------------------------------------------------------------------------------------
def test_empty_dataset_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\): check the split"):
        trainer(tmp_path=tmp_path, train_dataset=rows().select([]))


def test_empty_eval_dataset_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="eval_dataset is empty"):
        trainer(tmp_path=tmp_path, eval_dataset=rows().select([]))


def test_untokenized_text_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no input_ids or pixel_values .* tokenize first"):
        trainer(tmp_path=tmp_path, train_dataset=Dataset.from_dict({"text": ["the king"] * 8}))


def test_missing_labels_with_task_loss_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"alpha_task > 0 but the first batch of train_dataset has no 'labels'"):
        trainer(tmp_path=tmp_path, train_dataset=rows(labels=False))
    trainer(tmp_path=tmp_path, train_dataset=rows(labels=False), alpha_task=0.0)  # pure distillation: fine


def long_rows(tok, long_row=11, length=80):
    ids = [[5 + (i + j) % 30 for j in range(6)] for i in range(16)]
    ids[long_row] = [5 + j % 30 for j in range(length)]
    return Dataset.from_dict({"input_ids": ids})


def gpt2(layers=4):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=V, n_positions=64))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sequences_longer_than_the_positions_are_refused(tmp_path, tiny_tokenizer, arch):
    """Row 11 (not in the first batch) has 80 tokens; the models embed 64 positions: found by the column scan."""
    teacher = gpt2() if arch == "gpt2" else llama()
    with pytest.raises(ValueError, match=r"row 11 of train_dataset has sequences of 80 tokens .* at most 64 positions"
                                         r".*truncation=True, max_length=64"):
        trainer(teacher, make_student(teacher, num_layers=2), tmp_path, train_dataset=long_rows(tiny_tokenizer),
                data_collator=DataCollatorForLanguageModeling(tiny_tokenizer, mlm=False))


def test_long_rows_a_collator_truncates_are_accepted(tmp_path, tiny_tokenizer):
    collate = DataCollatorForLanguageModeling(tiny_tokenizer, mlm=False)
    teacher = gpt2()
    t = trainer(teacher, make_student(teacher, num_layers=2), tmp_path, train_dataset=long_rows(tiny_tokenizer),
                data_collator=lambda rows: collate([{"input_ids": r["input_ids"][:64]} for r in rows]), max_steps=4)
    t.train()


def test_long_sequences_in_a_torch_dataset_are_refused_by_the_first_batch(tmp_path, tiny_tokenizer):
    data = [{"input_ids": list(range(5, 35)) * 3, "labels": list(range(5, 35)) * 3}] * 4  # 90 tokens
    with pytest.raises(ValueError, match="first batch of train_dataset has sequences of 90 tokens"):
        trainer(tmp_path=tmp_path, train_dataset=data)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    data = rows().to_list()
    data[2]["input_ids"][0] = 45
    with pytest.raises(ValueError, match=r"token id 45 .* 40 entries .* re-tokenize"):
        trainer(tmp_path=tmp_path, train_dataset=Dataset.from_list(data))


def vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                               num_labels=3))


def images(n=8, size=16, channels=3, first_label=0):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[0] = first_label
    return Dataset.from_dict({"pixel_values": torch.randn(n, channels, size, size, generator=g).tolist(),
                              "labels": labels.tolist()}).with_format("torch")


def test_images_of_the_wrong_size_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"images of \(20, 20\) pixels but the student was built for \(16, 16\)"):
        trainer(vit(), vit(), tmp_path, train_dataset=images(size=20), hidden_weight=0.0)


def test_images_of_another_size_are_accepted_by_a_model_that_interpolates(tmp_path):
    from transformers import Dinov2Config, Dinov2ForImageClassification

    def dino():  # built for 32x32 images, interpolates its position embeddings for others
        torch.manual_seed(0)
        return Dinov2ForImageClassification(Dinov2Config(image_size=32, patch_size=4, hidden_size=32, num_labels=3,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64))
    trainer(dino(), dino(), tmp_path, train_dataset=images(size=16), hidden_weight=0.0, max_steps=1).train()


def test_images_with_the_wrong_channels_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"images with 1 channels but the student expects 3 .*convert\('RGB'\)"):
        trainer(vit(), vit(), tmp_path, train_dataset=images(channels=1), hidden_weight=0.0)


def test_class_labels_out_of_range_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"class label 7 but the models have 3 labels"):
        trainer(vit(), vit(), tmp_path, train_dataset=images(first_label=7), hidden_weight=0.0)


# ---- configuration ------------------------------------------------------------------------------------------
BAD_CONFIGS = [
    ({"temperature": 0}, "temperature must be a finite number > 0"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
    ({"alpha_task": -1.0}, "alpha_task must be a finite number >= 0"),
    ({"kd_weight": float("nan")}, "kd_weight must be a finite number >= 0"),
    ({"hidden_weight": -0.5}, "hidden_weight must be a finite number >= 0"),
    ({"alpha_task": 0, "kd_weight": 0, "hidden_weight": 0}, "all 0: nothing to train"),
    ({"kd_loss": "kl"}, "kd_loss 'kl' unknown; choose one of"),
    ({"hidden_loss": "l1"}, "hidden_loss 'l1' unknown"),
    ({"jsd_beta": 1.5}, r"jsd_beta must be in \[0, 1\]"),
    ({"kd_positions": "masked"}, "kd_positions 'masked' unknown"),
    ({"kd_impl": "fast"}, "kd_impl 'fast' unknown"),
    ({"teacher_dtype": "int8"}, "teacher_dtype 'int8' unknown"),
    ({"nan_policy": "ignore"}, "nan_policy 'ignore' unknown"),
    ({"kd_chunk_size": -8}, "kd_chunk_size must be >= 0"),
    ({"layer_map": "0:0,4:1,8:1"}, "a student hidden state appears twice"),
    ({"layer_map": "0:0,4:-1"}, "indices must be >= 0"),
    ({"layer_map": "0-0,4-1"}, "expected 'teacher:student' pairs"),
    ({"layer_map": "0:0:0"}, "every item must be a teacher:student pair"),
]


@pytest.mark.parametrize("kw,message", BAD_CONFIGS, ids=[str(k) for k, _ in BAD_CONFIGS])
def test_invalid_config_values_are_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)


# ---- paths, architectures, dependencies, output folder -------------------------------------------------------
def test_teacher_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: check the path"):
        load_teacher(str(tmp_path / "no" / "such" / "teacher"), "causal_lm")
    teacher, student = pair()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DistillationTrainer(model=student, teacher_model=str(tmp_path / "missing"), args=args(tmp_path),
                            train_dataset=rows())


def test_teacher_path_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without config.json: not a saved model"):
        load_teacher(str(tmp_path / "empty"), "causal_lm")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="is a file: pass the folder that holds config.json"):
        load_teacher(str(tmp_path / "weights.bin"), "causal_lm")
    llama().config.save_pretrained(str(tmp_path / "config_only"))
    with pytest.raises(OSError):  # transformers names the missing weight files
        load_teacher(str(tmp_path / "config_only"), "causal_lm")


def test_make_student_rejects_unsupported_architectures():
    with pytest.raises(ValueError, match="found no transformer layer list .* layers_path="):
        make_student(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), num_layers=1)
    torch.manual_seed(0)
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    with pytest.raises(ValueError):
        make_student(resnet, num_layers=1)
    with pytest.raises(ValueError, match="between 1 and the teacher's 4 layers"):
        make_student(llama(), num_layers=9)
    with pytest.raises(ValueError, match="duplicates"):
        make_student(llama(), layers=[1, 1])


@pytest.mark.parametrize("package,pip_name", [("gguf", "gguf"), ("matplotlib", "matplotlib")])
def test_missing_optional_dependency_names_the_pip_command(monkeypatch, package, pip_name):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail as if not installed
    with pytest.raises(ImportError, match=rf"reading GGUF files needs the optional package '{package}'.*"
                                          rf"pip install {pip_name}"):
        reliability.require(package, pip_name, "reading GGUF files")


def test_missing_dependency_error_names_the_pip_name_purpose_and_cause(monkeypatch):
    """The import name and the pip name differ (yaml / pyyaml): the message gives both, the original ImportError is
    chained; without pip_name and purpose, the package itself and "this feature" are named."""
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ImportError) as caught:
        reliability.require("yaml", "pyyaml", "writing YAML configs")
    message = str(caught.value)
    assert message.startswith("writing YAML configs needs the optional package 'yaml', which is not installed")
    assert message.endswith("Install it with: pip install pyyaml")
    assert isinstance(caught.value.__cause__, ImportError) and "yaml" in str(caught.value.__cause__)
    monkeypatch.setitem(sys.modules, "hf_kd_no_such_package", None)
    with pytest.raises(ImportError, match=r"^this feature needs the optional package 'hf_kd_no_such_package'.*"
                                          r"pip install hf_kd_no_such_package$"):
        reliability.require("hf_kd_no_such_package")


def test_require_imports_a_module_not_yet_loaded(monkeypatch):
    """An installed module that nobody imported yet is imported (and registered), submodules by dotted name."""
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    module = reliability.require("colorsys", "colorsys", "colour conversions")
    assert sys.modules["colorsys"] is module and module.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    minidom = reliability.require("xml.dom.minidom")
    assert minidom.__name__ == "xml.dom.minidom" and minidom.parseString("<a><b/></a>").documentElement.tagName == "a"


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(OSError, match="is not a writable folder"):
        trainer(tmp_path=tmp_path)
    (tmp_path / "blocker").write_text("")
    teacher, student = pair()
    with pytest.raises(OSError, match="is not a writable folder"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path / "blocker" / "out"),
                            train_dataset=rows())


def test_unwritable_output_dir_is_refused(tmp_path, monkeypatch):
    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(reliability.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match="not a writable folder .*Permission denied.*Pass an output_dir"):
        trainer(tmp_path=tmp_path)


def test_the_construction_checks_leave_the_random_state_alone(tmp_path, tiny_tokenizer):
    """Peeking at the first batch runs the (random) MLM collator, but training must start from set_seed's state."""
    from transformers import set_seed
    torch.manual_seed(0)
    bert = [BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n, vocab_size=V,
                                       num_attention_heads=4)) for n in (2, 1)]
    data = Dataset.from_dict({"input_ids": [[2] + [5 + (i * j) % 30 for j in range(8)] + [3] for i in range(8)]})
    trainer(bert[0], bert[1], tmp_path, train_dataset=data, hidden_weight=0.0,
            data_collator=DataCollatorForLanguageModeling(tiny_tokenizer, mlm=True, mlm_probability=0.5))
    after = torch.random.get_rng_state(), np.random.get_state()[1], random.getstate()
    set_seed(0)
    assert torch.equal(after[0], torch.random.get_rng_state())
    assert (after[1] == np.random.get_state()[1]).all() and after[2] == random.getstate()
