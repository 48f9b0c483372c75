"""Prompt-completion data (hf_kd.data.prompts): prompt/completion strings, chat-template conversations, padding for
training (right) and generation (left), and the guarantee that prompt tokens are never distilled."""

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.data.prompts import IGNORE, PromptCollator, prompt_only, split_batch, tokenize_prompts
from .scripts.tiny import args, llama, one_thread  # noqa: F401  (one_thread: autouse fixture)

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[USER]", "[ASSISTANT]", "[END]"]
WORDS = "the a king queen said went to forest castle and old young wolf girl boy house gold ran saw was".split()
TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }} [END] {% endfor %}"
            "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")


def chat_tokenizer(template: bool = True):
    """A word-level PreTrainedTokenizerFast (27 tokens, fits the tiny Llama's 40) with a chat template whose role
    markers are single special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                  eos_token="[EOS]")
    if template:
        out.chat_template = TEMPLATE
    return out


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def pairs(n=8, seed=0):
    """Prompt/completion strings of different lengths."""
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
    return Dataset.from_dict({"prompt": [words(2 + i % 4) for i in range(n)],
                              "completion": [words(1 + (3 * i) % 5) for i in range(n)]})


def test_prompt_completion_strings_label_only_the_completion():
    tok = chat_tokenizer()
    rows = tokenize_prompts(Dataset.from_dict({"prompt": ["the old king"], "completion": ["went to the forest"]}), tok)
    row = rows[0]
    prompt, completion = ids(tok, "the old king"), ids(tok, "went to the forest") + [tok.eos_token_id]
    assert row["input_ids"] == prompt + completion
    assert row["labels"] == [IGNORE] * len(prompt) + completion
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert prompt_only(row) == prompt


def test_messages_go_through_the_chat_template():
    tok = chat_tokenizer()
    chat = [{"role": "user", "content": "the king said"}, {"role": "assistant", "content": "went to the castle"}]
    rows = tokenize_prompts(Dataset.from_list([{"messages": chat}, {"messages": chat[:1]}]), tok)
    prompt = ids(tok, "[USER] the king said [END] [ASSISTANT]")
    completion = ids(tok, "went to the castle [END]")
    assert rows[0]["input_ids"] == prompt + completion
    assert rows[0]["labels"] == [IGNORE] * len(prompt) + completion
    assert rows[1]["input_ids"] == prompt and set(rows[1]["labels"]) == {IGNORE}  # no reply: a prompt only
    # conversational prompt/completion columns give the same rows
    conv = tokenize_prompts(Dataset.from_list([{"prompt": chat[:1], "completion": chat[1:]}]), tok)
    assert conv[0] == rows[0]


def test_conversations_need_a_chat_template():
    chat = [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "ran"}]
    with pytest.raises(ValueError, match="chat template"):
        tokenize_prompts(Dataset.from_list([{"messages": chat}]), chat_tokenizer(template=False))
    with pytest.raises(ValueError, match="'prompt'"):
        tokenize_prompts(Dataset.from_dict({"text": ["the king"]}), chat_tokenizer())


def test_truncation_keeps_the_prompt_end_and_cuts_the_completion():
    tok = chat_tokenizer()
    data = Dataset.from_dict({"prompt": ["the old king said"], "completion": ["went to the forest"]})
    row = tokenize_prompts(data, tok, max_length=5, max_prompt_length=2)[0]
    assert row["input_ids"] == ids(tok, "king said went to the")
    assert row["labels"][:2] == [IGNORE, IGNORE] and row["labels"][2:] == ids(tok, "went to the")
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_prompts(data, tok, max_length=3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_either_side_and_the_split_reads_it_back(side):
    tok = chat_tokenizer()
    rows = tokenize_prompts(pairs(), tok)
    batch = PromptCollator(tok, padding_side=side)(list(rows))
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (len(rows), width)
    first_real = batch["attention_mask"][:, 0 if side == "right" else -1]
    assert bool(first_real.all())  # real tokens start (right) or end (left) every row
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE).all())
    for (prompt, completion), row in zip(split_batch(batch), rows):
        assert prompt == prompt_only(row)
        assert prompt + completion == row["input_ids"]
    prompts = PromptCollator(tok, padding_side="left", prompts_only=True)(list(rows))
    assert [p for p, _ in split_batch(prompts)] == [prompt_only(r) for r in rows]
    assert bool((prompts["labels"] == IGNORE).all())


def _kl_reference(teacher, student, batch, temperature, positions):
    """T^2 * mean over the chosen positions of KL(p_teacher || p_student), position i predicting token i+1."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t = F.log_softmax(teacher(**inputs).logits[:, :-1].double() / temperature, -1)
        s = F.log_softmax(student(**inputs).logits[:, :-1].double() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    return temperature ** 2 * kl[positions].sum() / positions.sum()


def test_prompt_tokens_are_never_distilled(tmp_path):
    """The trainer's KD loss on prompt-completion rows equals KL over completion tokens only; over every token it
    would differ (the pair disagrees on prompt positions too), so distilling a prompt token fails this test."""
    tok = chat_tokenizer()
    teacher, student = llama(), llama(hidden=16, layers=2, seed=1)
    rows = tokenize_prompts(pairs(), tok)
    batch = PromptCollator(tok)(list(rows))
    for mode in ("supervised", "on_policy"):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=rows,
                                      data_collator=PromptCollator(tok),
                                      args=args(tmp_path / mode, alpha_task=0.0, hidden_weight=0.0, kd_impl="full",
                                                data_mode=mode))
        loss = float(trainer.compute_loss(student, dict(batch)).detach())
        completion = batch["labels"][:, 1:] != IGNORE
        every_token = batch["attention_mask"][:, 1:].bool()
        reference = float(_kl_reference(teacher, student, batch, 2.0, completion))
        # float32 loss vs float64 reference: each position's KL sums V terms p * (log p - log q), each log off by
        # about eps * |log p| <= eps * log(V) in float32, times T^2; 16x headroom for the kernels' own rounding of
        # the logits (CPUs differ). A distilled prompt token moves the loss by > 1e-2 * reference (below): far out.
        tolerance = 16 * torch.finfo(torch.float32).eps * 2.0 ** 2 * math.log(teacher.config.vocab_size)
        assert abs(loss - reference) < tolerance < 1e-2 * reference
        assert abs(float(_kl_reference(teacher, student, batch, 2.0, every_token)) - reference) > 1e-2 * reference
    with pytest.raises(ValueError, match="prompt tokens"):
        DistillationConfig(output_dir=str(tmp_path), data_mode="on_policy", kd_positions="all", report_to=[])
