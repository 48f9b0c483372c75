"""Cross-tokenizer distillation: character-offset alignment on hand-checked examples, the shared-vocabulary map
('Ġ' / '▁' normalised) and its coverage, the exact and ULD losses against plain references, the trainer with two
tiny Llamas whose tokenizers differ (teacher untouched), and the refusal when no cross-tokenizer mode is on."""

import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.flow.align import position_masks
from hf_kd.flow.capture import Captured
from hf_kd.data.cross_tokenizer import (CROSS_COLUMNS, CrossTokenizerCollator, align_positions, embeddings_from_teacher,
                                   shared_vocab_map, token_bytes)
from hf_kd.losses.cross_tokenizer import shared_mass, shared_support_kl, uld_loss
from hf_kd.signals.base import Context

from .conftest import sentences

SPECIAL = {"<unk>": 0, "<pad>": 1}


def fixed_bpe(tokens: list[str], merges: list[tuple[str, str]], byte_level: bool) -> PreTrainedTokenizerFast:
    """A BPE tokenizer with a vocabulary and merges written by hand (so its tokenisations can be checked by hand)."""
    vocab = {**SPECIAL, **{t: len(SPECIAL) + i for i, t in enumerate(tokens)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if byte_level else pre_tokenizers.Metaspace()
    tok.decoder = decoders.ByteLevel() if byte_level else decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


# teacher: GPT-2 style ('Ġ' = space); student: sentencepiece style ('▁' = space)
TEACHER_TOKENS = ["t", "h", "e", "Ġ", "c", "a", "s", "th", "the", "at", "Ġc", "Ġcat", "Ġs"]
STUDENT_TOKENS = ["▁", "t", "h", "e", "c", "a", "s", "▁t", "▁th", "▁the", "at", "▁c", "▁s", "▁sat"]


def hand_pair():
    teacher = fixed_bpe(TEACHER_TOKENS, [("t", "h"), ("th", "e"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("Ġ", "s")],
                        byte_level=True)
    student = fixed_bpe(STUDENT_TOKENS, [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("a", "t"), ("▁", "c"), ("▁", "s"),
                                         ("▁s", "at")], byte_level=False)
    return student, teacher


def test_alignment_by_character_offsets_hand_checked():
    student, teacher = hand_pair()
    s, t = (tok("the cat sat", return_offsets_mapping=True) for tok in (student, teacher))
    # "the cat sat": t0 h1 e2 _3 c4 a5 t6 _7 s8 a9 t10
    assert s.tokens() == ["▁the", "▁c", "at", "▁sat"] and s["offset_mapping"] == [(0, 3), (3, 5), (5, 7), (7, 11)]
    assert t.tokens() == ["the", "Ġcat", "Ġs", "at"]
    assert t["offset_mapping"] == [(0, 3), (3, 7), (7, 9), (9, 11)]
    # both end a token at characters 3 and 7 (and 11, the end: nothing follows); 5 and 9 only one side
    assert align_positions(s["offset_mapping"], t["offset_mapping"]) == [(0, 0), (2, 1)]


def test_alignment_skips_zero_width_tokens_and_takes_the_last_piece_of_a_split_character():
    # "naïve": the teacher splits 'ï' (2 bytes) into two byte tokens with the same span (2, 3); the student has a
    # zero-width BOS at 0 and a zero-width EOS at the end
    teacher = [(0, 2), (2, 3), (2, 3), (3, 5)]
    student = [(0, 0), (0, 2), (2, 3), (3, 5), (5, 5)]
    # end 2: student 1 / teacher 0; end 3: student 2 / teacher 2 (the last piece predicts 've'); end 5: nothing
    # follows with text (the student's EOS is zero-width, the teacher ends)
    assert align_positions(student, teacher) == [(1, 0), (2, 2)]
    assert align_positions(teacher, teacher) == [(0, 0), (2, 2)]  # one tokenisation against itself: every boundary


def test_token_bytes_normalises_byte_level_and_metaspace_markers():
    assert token_bytes("Ġthe", "byte_level") == b" the" == token_bytes("▁the", "metaspace")
    assert token_bytes("Ċ", "byte_level") == b"\n" == token_bytes("<0x0A>", "metaspace")
    assert token_bytes("Ã¯", "byte_level") == "ï".encode()  # two byte-level characters, one UTF-8 character
    assert token_bytes("the", "plain") == b"the"


def test_shared_vocabulary_map_and_coverage():
    student, teacher = hand_pair()
    vocab = shared_vocab_map(student, teacher)
    s_names = {i: t for t, i in student.get_vocab().items()}
    t_names = {i: t for t, i in teacher.get_vocab().items()}
    pairs = {(t_names[int(j)], s_names[int(i)]) for i, j in zip(vocab.student_ids, vocab.teacher_ids)}
    assert pairs == {("Ġ", "▁"), ("t", "t"), ("h", "h"), ("e", "e"), ("c", "c"), ("a", "a"), ("s", "s"),
                     ("at", "at"), ("Ġc", "▁c"), ("Ġs", "▁s")}  # not 'the' / '▁the' (' the'), nor the specials
    assert vocab.teacher_ids.tolist() == sorted(vocab.teacher_ids.tolist())
    assert vocab.coverage == {"shared_tokens": 10, "of_teacher_vocab": 10 / 13, "of_student_vocab": 10 / 14}


def reference_exact(s_logits, t_logits, s_ids, t_ids, temperature):
    """KL(p~ || q~) over the shared tokens and one 'other' bucket, written out in float64, times T^2."""
    out = []
    for zs, zt in zip(s_logits.double(), t_logits.double()):
        p, q = torch.softmax(zt / temperature, -1), torch.softmax(zs / temperature, -1)
        p_b = [float(p[j]) for j in t_ids] + [1 - float(p[t_ids].sum())]
        q_b = [float(q[i]) for i in s_ids] + [1 - float(q[s_ids].sum())]
        out.append(temperature ** 2 * sum(a * math.log(a / b) for a, b in zip(p_b, q_b) if a > 0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_exact_loss_equals_the_reference(temperature):
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(5, 6, generator=g) * 2, torch.randn(5, 9, generator=g) * 2
    s_ids, t_ids = torch.tensor([5, 0, 2]), torch.tensor([1, 3, 4])
    got = shared_support_kl(s_logits, t_logits, s_ids, t_ids, temperature)
    torch.testing.assert_close(got.double(), reference_exact(s_logits, t_logits, s_ids, t_ids, temperature),
                               rtol=1e-5, atol=1e-6)
    p = torch.softmax(t_logits.double(), -1)
    torch.testing.assert_close(shared_mass(t_logits, t_ids).double(), p[:, t_ids].sum(-1), rtol=1e-5, atol=1e-6)
    # identical bucket distributions -> 0
    same = torch.zeros(5, 6)
    same[:, [5, 0, 2]] = t_logits[:, [1, 3, 4]]
    rest = t_logits[:, [0, 2, 5, 6, 7, 8]].logsumexp(-1) - math.log(3)  # three other student entries, equal share
    same[:, [1, 3, 4]] = rest[:, None]
    assert float(shared_support_kl(same, t_logits, s_ids, t_ids).abs().max()) < 1e-5


def test_exact_loss_with_an_empty_teacher_bucket_has_finite_gradients():
    t_logits = torch.randn(4, 3)
    s_logits = torch.randn(4, 5, requires_grad=True)
    loss = shared_support_kl(s_logits, t_logits, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_logits.grad).all()


def reference_uld(s_logits, t_logits, temperature):
    """Sort each row's probabilities in decreasing order, pad the shorter with zeros, L1 distance, times T^2."""
    out = []
    for zs, zt in zip(s_logits.double(), t_logits.double()):
        p = sorted(torch.softmax(zt / temperature, -1).tolist(), reverse=True)
        q = sorted(torch.softmax(zs / temperature, -1).tolist(), reverse=True)
        n = max(len(p), len(q))
        p, q = p + [0.0] * (n - len(p)), q + [0.0] * (n - len(q))
        out.append(temperature ** 2 * sum(abs(a - b) for a, b in zip(p, q)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_equals_the_reference(temperature):
    g = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 11, generator=g) * 3
    got = uld_loss(s_logits, t_logits, temperature)
    torch.testing.assert_close(got.double(), reference_uld(s_logits, t_logits, temperature), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uld_loss(t_logits, s_logits, temperature), got)  # symmetric
    perm = torch.randperm(7, generator=g)
    torch.testing.assert_close(uld_loss(s_logits[:, perm], t_logits, temperature), got)  # token identities ignored
    padded = torch.cat([s_logits, torch.full((6, 4), float("-inf"))], -1)  # zero-probability entries change nothing
    assert float(uld_loss(padded, s_logits).abs().max()) < 1e-6


# ---- the trainer on two tiny Llamas whose tokenizers differ ---------------------------------------------------

def trained_bpe(byte_level: bool, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if byte_level else pre_tokenizers.Metaspace()
    tok.decoder = decoders.ByteLevel() if byte_level else decoders.Metaspace()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    tok.train_from_iterator(sentences(64), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                               special_tokens=["<unk>", "<pad>", "</s>"],
                                                               initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def llama(vocab: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=256, pad_token_id=1))


@pytest.fixture(scope="module")
def tokenizer_pair():
    return trained_bpe(byte_level=False, vocab_size=90), trained_bpe(byte_level=True, vocab_size=300)


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                teacher_dtype="model")
    return DistillationConfig(**{**base, **kw})


def test_collator_aligns_the_same_characters(tokenizer_pair):
    student_tok, teacher_tok = tokenizer_pair
    texts = sentences(6)
    batch = CrossTokenizerCollator(student_tok, teacher_tok, max_length=12)([{"text": t} for t in texts])
    assert batch["input_ids"].shape[1] <= 12 and (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert int((batch["align_student"] >= 0).sum()) > 0
    for b, text in enumerate(texts):
        s = student_tok(text, truncation=True, max_length=12, return_offsets_mapping=True)["offset_mapping"]
        t = teacher_tok(text, return_offsets_mapping=True)["offset_mapping"]
        n_t = int(batch["teacher_attention_mask"][b].sum())
        assert batch["teacher_input_ids"][b, :n_t].tolist() == teacher_tok(text[:s[-1][1]])["input_ids"]
        for i, j in zip(batch["align_student"][b].tolist(), batch["align_teacher"][b].tolist()):
            if i >= 0:  # the two tokens end at the same character, each followed by a token of its own
                assert s[i][1] == t[j][1] and i + 1 < len(s) and j + 1 < n_t


@pytest.mark.parametrize("mode", ["uld", "exact"])
def test_trainer_distils_across_tokenizers_and_leaves_the_teacher_untouched(tmp_path, tokenizer_pair, mode):
    student_tok, teacher_tok = tokenizer_pair
    teacher, student = llama(len(teacher_tok), 2, seed=0), llama(len(student_tok) + 6, 1, seed=1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    data = Dataset.from_dict({"text": sentences(16)})
    kwargs = (dict(processing_class=student_tok, teacher_processing_class=teacher_tok) if mode == "uld" else
              dict(data_collator=CrossTokenizerCollator(student_tok, teacher_tok, max_length=16)))  # both ways in
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg(tmp_path, cross_tokenizer=mode),
                                  train_dataset=data, **kwargs)
    assert [s.name for s in trainer.signals] == ["task", "cross_tokenizer"]
    # the signal's sum on one batch equals the loss written out here: each model on its own ids, aligned rows only
    batch = trainer.data_collator([data[i] for i in range(4)])
    rows, s_pos, t_pos = [], [], []
    for b in range(4):
        for i, j in zip(batch["align_student"][b].tolist(), batch["align_teacher"][b].tolist()):
            if i >= 0:
                rows, s_pos, t_pos = rows + [b], s_pos + [i], t_pos + [j]
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[rows, s_pos]
        t_logits = teacher(input_ids=batch["teacher_input_ids"],
                           attention_mask=batch["teacher_attention_mask"]).logits[rows, t_pos]
        signal = trainer.signals[1]
        expected = (uld_loss(s_logits, t_logits, 2.0) if mode == "uld" else
                    shared_support_kl(s_logits, t_logits, signal.student_ids, signal.teacher_ids, 2.0)).sum()
    inputs = dict(batch)
    cross = {k: inputs.pop(k) for k in CROSS_COLUMNS}
    with torch.no_grad():
        out = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    ctx = Context("causal_lm", inputs, inputs["labels"], position_masks(inputs, "causal_lm"),
                  Captured(logits=out.logits), None, extra={"cross": cross, "teacher_models": trainer.teachers})
    torch.testing.assert_close(signal.loss_sum(ctx), expected, rtol=1e-4, atol=1e-5)

    trainer.train()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items()), "teacher changed"
    assert all(p.requires_grad for p in teacher.parameters())  # frozen while used, given back as passed
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    logged = [h for h in trainer.state.log_history if "cross_tokenizer_loss" in h]
    assert len(logged) == 3 and all(h["cross_tokenizer_loss"] > 0 and math.isfinite(h["loss"]) for h in logged)
    metrics = trainer.evaluate(data.select(range(8)))  # evaluation goes through the same columns
    assert metrics["eval_cross_tokenizer_loss"] > 0 and math.isfinite(metrics["eval_loss"])
    if mode == "exact":
        assert all(0 < h["cross_tokenizer_teacher_shared_mass"] <= 1 for h in logged)
        assert signal.coverage["shared_tokens"] > 10


def test_different_tokenizers_are_refused_without_a_cross_tokenizer_mode(tmp_path, tokenizer_pair):
    student_tok, teacher_tok = tokenizer_pair
    teacher, student = llama(len(teacher_tok), 1, 0), llama(len(student_tok), 1, 1)
    data = Dataset.from_dict({"text": sentences(8)})
    with pytest.raises(ValueError, match=r"(?s)tokenizer .*differ.*cross_tokenizer='uld'"):
        DistillationTrainer(model=student, teacher_model=teacher, args=cfg(tmp_path, kd_weight=1.0),
                            train_dataset=data, processing_class=student_tok, teacher_processing_class=teacher_tok)
    with pytest.raises(ValueError, match="teacher's tokenizer"):  # a mode, but only one tokenizer
        DistillationTrainer(model=student, teacher_model=teacher, args=cfg(tmp_path, cross_tokenizer="uld"),
                            train_dataset=data, processing_class=student_tok)
    with pytest.raises(ValueError, match="hidden_weight .*set them to 0"):  # per-token signals of one tokenisation
        DistillationTrainer(model=student, teacher_model=teacher,
                            args=cfg(tmp_path, cross_tokenizer="uld", hidden_weight=1.0),
                            train_dataset=data, processing_class=student_tok, teacher_processing_class=teacher_tok)
    with pytest.raises(ValueError, match="data_mode='on_policy'.*cannot read"):  # generations are student ids
        DistillationTrainer(model=student, teacher_model=teacher,
                            args=cfg(tmp_path, cross_tokenizer="uld", data_mode="on_policy"),
                            train_dataset=data, processing_class=student_tok, teacher_processing_class=teacher_tok)


def test_student_embeddings_from_the_teachers_pieces():
    student, teacher = hand_pair()
    table = torch.randn(len(teacher), 4)
    rows = embeddings_from_teacher(student, teacher, table)
    ids = teacher.get_vocab()
    # '▁the' spells " the": the teacher writes it 'Ġ' + 'the'; '▁sat' = 'Ġs' + 'at'; 'at' = 'at'
    torch.testing.assert_close(rows[student.convert_tokens_to_ids("▁the")], table[[ids["Ġ"], ids["the"]]].mean(0))
    torch.testing.assert_close(rows[student.convert_tokens_to_ids("▁sat")], table[[ids["Ġs"], ids["at"]]].mean(0))
    torch.testing.assert_close(rows[student.convert_tokens_to_ids("at")], table[ids["at"]])
    torch.testing.assert_close(rows[student.pad_token_id], table[teacher.pad_token_id])  # same role
