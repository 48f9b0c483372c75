"""Cross-tokenizer distillation: a teacher and a student whose tokenizers differ (``cross_tokenizer='exact'|'uld'``).

One model's ids are never fed to the other: the same raw text is tokenised by both tokenizers
(:class:`CrossTokenizerCollator`), the teacher runs on its own ids, and the two tokenisations are aligned by character
offsets (``offset_mapping`` of fast tokenizers). Position i of a causal LM predicts the token that starts where token
i ends, so the two models' predictions are comparable where both tokenisations end a token at the same character
(:func:`align_positions`): there each model predicts "the text that follows character c". The losses
(:mod:`hf_kd.losses.cross_tokenizer`) compare the two distributions at those positions only.

'exact' also needs the tokens the vocabularies share (:func:`shared_vocab_map`): tokens are compared as the bytes
they stand for, so GPT-2 style byte-level tokens ('Ġthe') and sentencepiece-style ones ('▁the') match when they
spell the same text (' the').
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

# batch columns the collator adds beside the student's input_ids / attention_mask / labels; the trainer pops them
# before the student's forward (hf_kd.signals.cross_tokenizer reads them)
CROSS_COLUMNS = ("teacher_input_ids", "teacher_attention_mask", "align_student", "align_teacher")


# ---- token strings --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character that stands for each byte -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def token_convention(tokenizer) -> str:
    """'byte_level' (GPT-2, Llama 3, Qwen, SmolLM: 'Ġ' = space), 'metaspace' (sentencepiece style: '▁' = space,
    '<0x0A>' byte-fallback tokens) or 'plain', read from the fast tokenizer's pre-tokenizer and decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = json.dumps({k: json.loads(backend.to_str()).get(k) for k in ("pre_tokenizer", "decoder")}) if backend else ""
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"Metaspace"' in text or "▁" in text:
        return "metaspace"
    return "plain"


def token_bytes(token: str, convention: str) -> bytes | None:
    """The bytes a vocabulary entry stands for (None if it is not a byte-level string)."""
    if convention == "byte_level":
        table = byte_decoder()
        return bytes(table[c] for c in token) if all(c in table for c in token) else None
    if convention == "metaspace" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("▁", " ").encode("utf-8") if convention == "metaspace" else token.encode("utf-8")


def _by_bytes(tokenizer) -> dict[bytes, int]:
    """{bytes: lowest id} over the tokenizer's vocabulary, special tokens left out (they are not text)."""
    convention, special = token_convention(tokenizer), set(tokenizer.all_special_ids or ())
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    out = {}
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        key = token_bytes(token, convention)
        if i not in special and key and key not in out:
            out[key] = i
    return out


@dataclass
class VocabMap:
    """The tokens two vocabularies share: ``student_ids[k]`` and ``teacher_ids[k]`` spell the same bytes."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_size: int  # tokens (non-special) in each vocabulary
    teacher_size: int

    @property
    def coverage(self) -> dict:
        """Shared tokens, and their share of each vocabulary (the share of probability *mass* is measured in
        training: hf_kd.signals.cross_tokenizer logs it)."""
        k = len(self.student_ids)
        return {"shared_tokens": k, "of_teacher_vocab": k / max(self.teacher_size, 1),
                "of_student_vocab": k / max(self.student_size, 1)}


def shared_vocab_map(student_tokenizer, teacher_tokenizer) -> VocabMap:
    """Map the tokens whose strings are equal once byte-level / '▁' markers are normalised (ordered by teacher id)."""
    s, t = _by_bytes(student_tokenizer), _by_bytes(teacher_tokenizer)
    pairs = sorted((t[key], s[key]) for key in s.keys() & t.keys())
    teacher_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    student_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return VocabMap(student_ids, teacher_ids, len(s), len(t))


# ---- positions -----------------------------------------------------------------------------------------------

def _ends(offsets) -> tuple[dict[int, int], list[bool]]:
    """{character where a token ends: index of the last token ending there} over tokens of non-zero width (the last
    one: bytes of one character split into several tokens share its span), and which tokens have text."""
    ends, text = {}, []
    for i, (start, end) in enumerate(offsets):
        text.append(end > start)
        if end > start:
            ends[int(end)] = i
    return ends, text


def align_positions(student_offsets, teacher_offsets) -> list[tuple[int, int]]:
    """(student position, teacher position) pairs whose next-token predictions start at the same character: token i
    of the student and token j of the teacher end at the same character and both are followed by a text token."""
    s_ends, s_text = _ends(student_offsets)
    t_ends, t_text = _ends(teacher_offsets)
    pairs = []
    for end, i in s_ends.items():
        j = t_ends.get(end)
        if j is not None and i + 1 < len(s_text) and s_text[i + 1] and j + 1 < len(t_text) and t_text[j + 1]:
            pairs.append((i, j))
    return sorted(pairs)


# ---- batches -------------------------------------------------------------------------------------------------

def _require_fast(tokenizer, who: str) -> None:
    if tokenizer is None:
        raise ValueError(f"cross_tokenizer needs the {who}'s tokenizer: pass processing_class (the student's) and "
                         "teacher_processing_class (the teacher's), or a CrossTokenizerCollator as data_collator")
    if not getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"cross_tokenizer aligns the two tokenisations by character offsets, which needs a fast "
                         f"tokenizer; the {who}'s is {type(tokenizer).__name__}: load it with use_fast=True")


class CrossTokenizerCollator:
    """Raw text rows (``text_column``) -> the student's ``input_ids``, ``attention_mask`` and ``labels`` (-100 on
    padding), the teacher's ``teacher_input_ids`` / ``teacher_attention_mask`` of the same text, and the aligned
    position pairs ``align_student`` / ``align_teacher`` [B, P] (-1 = padding) of :func:`align_positions`.

    The student's tokenisation is cut at ``max_length`` tokens; the teacher reads the same characters (its text is
    cut where the student's last token ends), so neither model sees text the other does not."""

    def __init__(self, student_tokenizer, teacher_tokenizer, max_length: int = 512, text_column: str = "text"):
        _require_fast(student_tokenizer, "student")
        _require_fast(teacher_tokenizer, "teacher")
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.max_length, self.text_column = max_length, text_column

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if any(self.text_column not in f for f in features):
            raise ValueError(f"CrossTokenizerCollator reads raw text from the {self.text_column!r} column, which this "
                             f"batch lacks (keys {sorted(features[0])}): keep the text untokenised (each model "
                             "tokenises it with its own tokenizer)")
        texts = [f[self.text_column] for f in features]
        s = self.student_tokenizer(texts, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        cut = [text[:max((e for _, e in offs), default=0)] for text, offs in zip(texts, s["offset_mapping"])]
        t = self.teacher_tokenizer(cut, return_offsets_mapping=True)
        pairs = [align_positions(so, to) for so, to in zip(s["offset_mapping"], t["offset_mapping"])]
        ids, mask = _pad(s["input_ids"], self.student_tokenizer.pad_token_id)
        t_ids, t_mask = _pad(t["input_ids"], self.teacher_tokenizer.pad_token_id)
        width = max([len(p) for p in pairs] + [1])
        align = torch.full((2, len(pairs), width), -1, dtype=torch.long)
        for b, p in enumerate(pairs):
            if p:
                align[:, b, :len(p)] = torch.tensor(p, dtype=torch.long).T
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
                "teacher_input_ids": t_ids, "teacher_attention_mask": t_mask,
                "align_student": align[0], "align_teacher": align[1]}


def _pad(rows: list[list[int]], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids (pad id, or 0: masked anyway) and attention mask."""
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def prepare(trainer_kwargs: dict, teacher_processing_class) -> tuple:
    """For DistillationTrainer with cross_tokenizer set: (student tokenizer, teacher tokenizer), taken from
    processing_class / teacher_processing_class or from a CrossTokenizerCollator given as data_collator; without a
    collator, a CrossTokenizerCollator of the two (max_length 512) becomes the data_collator."""
    collator = trainer_kwargs.get("data_collator")
    student = trainer_kwargs.get("processing_class") or getattr(collator, "student_tokenizer", None)
    teacher = teacher_processing_class or getattr(collator, "teacher_tokenizer", None)
    _require_fast(student, "student")
    _require_fast(teacher, "teacher")
    if collator is None:
        trainer_kwargs["data_collator"] = CrossTokenizerCollator(student, teacher)
    return student, teacher


# ---- a student's embeddings from the teacher's -------------------------------------------------------------------

@torch.no_grad()
def embeddings_from_teacher(student_tokenizer, teacher_tokenizer, teacher_embeddings: torch.Tensor,
                            rows: int | None = None) -> torch.Tensor:
    """[rows, D] input embeddings for a student vocabulary: each token's row is the mean of the teacher's embeddings
    of the teacher tokens that spell the same text; special tokens take the teacher's token of the same role (eos,
    pad, bos, unk) when it has one, and everything else (and rows past the tokenizer) the teacher's mean row."""
    teacher_embeddings = teacher_embeddings.detach().float()
    rows = rows or len(student_tokenizer)
    out = teacher_embeddings.mean(0).repeat(rows, 1)
    convention = token_convention(student_tokenizer)
    special = set(student_tokenizer.all_special_ids or ())
    for token, i in student_tokenizer.get_vocab().items():
        if i >= rows or i in special:
            continue
        text = (token_bytes(token, convention) or b"").decode("utf-8", errors="ignore")
        ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids = [j for j in ids if j < teacher_embeddings.shape[0]]
        if ids:
            out[i] = teacher_embeddings[ids].mean(0)
    for role in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"):
        i, j = getattr(student_tokenizer, role, None), getattr(teacher_tokenizer, role, None)
        if i is not None and j is not None and i < rows and j < teacher_embeddings.shape[0]:
            out[i] = teacher_embeddings[j]
    return out


def adopt_tokenizer(student, student_tokenizer, teacher_tokenizer, teacher_embeddings: torch.Tensor) -> None:
    """Give ``student`` (a causal LM built from the teacher, e.g. by make_student) the vocabulary of
    ``student_tokenizer``: resize its embeddings (and a tied / untied LM head) to that vocabulary, fill them from
    the teacher's pieces (:func:`embeddings_from_teacher`) and set the config's vocab size and special token ids."""
    n = len(student_tokenizer)
    weight = embeddings_from_teacher(student_tokenizer, teacher_tokenizer, teacher_embeddings, n)
    student.resize_token_embeddings(n)
    emb = student.get_input_embeddings()
    emb.weight.data.copy_(weight.to(emb.weight.dtype))
    head = student.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
        head.weight.data.copy_(weight.to(head.weight.dtype))
    student.config.vocab_size = n
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(student.config, role, getattr(student_tokenizer, role, None))
        if getattr(student, "generation_config", None) is not None:
            setattr(student.generation_config, role, getattr(student_tokenizer, role, None))
