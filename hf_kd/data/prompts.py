"""Prompt-completion data for causal LMs: rows whose labels are -100 on the prompt, so only completion tokens are
trained on and distilled (``kd_positions='auto'`` counts labelled positions only for causal LMs, hf_kd.flow.align).

Three dataset layouts are read:

- ``prompt`` + ``completion`` strings (the prompt is tokenised with the tokenizer's special tokens, the completion
  without them and ends with EOS);
- ``messages``: a conversation through the tokenizer's chat template; the last assistant turn is the completion,
  everything before it (with the generation prompt) the prompt. A conversation that does not end with an
  assistant turn is a prompt only;
- ``prompt`` (+ ``completion``) as lists of messages (conversational prompt-completion).

A row without a completion (no ``completion`` column) is a prompt only: every label is -100; on-policy and
sequence-level distillation generate its completion.

Prompt and completion are tokenised separately and concatenated, so the prompt ids are exactly the ids a model is
given when it generates the completion (tokenising the joined text can merge tokens across the boundary).

Padding: training rows are right-padded (position ids then count from the first token, as in generation);
batched generation wants prompts left-padded. :class:`PromptCollator` does either, and :func:`split_batch` reads
prompt and completion back out of a padded batch of either side.
"""

from __future__ import annotations

import torch
from datasets import Dataset

IGNORE = -100


# ---- tokenising -----------------------------------------------------------------------------------------------
def _chat(tokenizer, messages: list, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational data (lists of messages) needs a tokenizer with a chat template "
                         "(tokenizer.chat_template is None): set one, or pass prompt/completion strings")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def split_example(example: dict, tokenizer) -> tuple[list[int], list[int] | None]:
    """One example -> (prompt ids, completion ids or None for a prompt only)."""
    if "messages" in example and example["messages"] is not None:
        messages = list(example["messages"])
        if not messages:
            raise ValueError("an example has an empty 'messages' list")
        if messages[-1]["role"] != "assistant":
            return _ids(tokenizer, _chat(tokenizer, messages, True), False), None
        return _conversation(tokenizer, messages[:-1], messages[-1:])
    if "prompt" not in example:
        raise ValueError(f"prompt-completion data needs a 'prompt' (+ 'completion') or a 'messages' column; the "
                         f"example has {sorted(example)}")
    prompt, completion = example["prompt"], example.get("completion")
    if isinstance(prompt, list):  # conversational prompt (and completion)
        if completion is None:
            return _ids(tokenizer, _chat(tokenizer, prompt, True), False), None
        return _conversation(tokenizer, prompt, completion if isinstance(completion, list) else
                             [{"role": "assistant", "content": completion}])
    ids = _ids(tokenizer, prompt, True)
    if completion is None:
        return ids, None
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids, _ids(tokenizer, completion, False) + eos


def _conversation(tokenizer, prompt: list, completion: list) -> tuple[list[int], list[int]]:
    head = _chat(tokenizer, prompt, True)
    full = _chat(tokenizer, prompt + completion, False)
    if not full.startswith(head):
        raise ValueError("the chat template does not render the conversation as its prompt (with the generation "
                         "prompt) followed by the reply, so the completion cannot be cut out; prompt rendered as "
                         f"{head!r}, the whole as {full!r}")
    return _ids(tokenizer, head, False), _ids(tokenizer, full[len(head):], False)


def make_row(prompt: list[int], completion: list[int] | None) -> dict:
    """input_ids = prompt + completion, labels -100 on the prompt (a prompt only: every label -100)."""
    completion = list(completion or [])
    return {"input_ids": list(prompt) + completion, "attention_mask": [1] * (len(prompt) + len(completion)),
            "labels": [IGNORE] * len(prompt) + completion}


def tokenize_prompts(dataset: Dataset, tokenizer, max_length: int | None = None,
                     max_prompt_length: int | None = None) -> Dataset:
    """Tokenise a prompt-completion or conversational dataset into input_ids / attention_mask / labels rows (labels
    -100 on prompt tokens). ``max_prompt_length`` keeps the last tokens of a long prompt; ``max_length`` then cuts
    the completion (a cut completion loses its EOS)."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to distil on")
    if not {"prompt", "messages"} & set(dataset.column_names):
        raise ValueError(f"prompt-completion data needs a 'prompt' (+ 'completion') or a 'messages' column; columns: "
                         f"{dataset.column_names}")

    def one(example):
        prompt, completion = split_example(example, tokenizer)
        if max_prompt_length is not None:
            prompt = prompt[-max_prompt_length:]
        if max_length is not None:
            if len(prompt) >= max_length:
                raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in max_length={max_length}: set "
                                 "max_prompt_length below max_length")
            completion = None if completion is None else completion[:max_length - len(prompt)]
        return make_row(prompt, completion)
    return dataset.map(one, remove_columns=dataset.column_names)


def prompt_only(example: dict) -> list[int]:
    """The prompt of a tokenised row: its tokens before the first labelled one (every token if none is labelled
    or the row has no labels)."""
    ids, labels = list(example["input_ids"]), example.get("labels")
    mask = example.get("attention_mask") or [1] * len(ids)
    kept = [(i, lab) for i, lab, m in zip(ids, labels or [IGNORE] * len(ids), mask) if m]
    out = []
    for token, label in kept:
        if label != IGNORE:
            break
        out.append(token)
    return out


# ---- padded batches -------------------------------------------------------------------------------------------
def pad_rows(rows: list[dict], pad_id: int, side: str = "right", device=None) -> dict[str, torch.Tensor]:
    """Rows of lists (input_ids, attention_mask[, labels]) -> padded tensors; ``side`` 'right' for training,
    'left' for batched generation."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(r["input_ids"]) for r in rows)
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    out = {}
    for key, fill in fills.items():
        if key not in rows[0]:
            continue
        padded = []
        for r in rows:
            values = list(r[key])
            pad = [fill] * (width - len(values))
            padded.append(values + pad if side == "right" else pad + values)
        out[key] = torch.tensor(padded, dtype=torch.long, device=device)
    return out


class PromptCollator:
    """Pads prompt-completion rows: ``padding_side='right'`` (default) for training, 'left' for generation;
    ``prompts_only=True`` drops the completions (prompts to generate from). Extra columns are dropped."""

    def __init__(self, tokenizer=None, pad_token_id: int | None = None, padding_side: str = "right",
                 prompts_only: bool = False):
        if pad_token_id is None:
            pad_token_id = pad_id_of(tokenizer)
        self.pad_token_id, self.padding_side, self.prompts_only = pad_token_id, padding_side, prompts_only

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.prompts_only:
            features = [make_row(prompt_only(f), None) for f in features]
        rows = [{k: f[k] for k in ("input_ids", "attention_mask", "labels") if k in f} for f in features]
        if "labels" not in rows[0]:
            rows = [{**r, "labels": list(r["input_ids"])} for r in rows]
        return pad_rows(rows, self.pad_token_id, self.padding_side)


def pad_id_of(tokenizer) -> int:
    if tokenizer is None:
        raise ValueError("pass a tokenizer or pad_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")
    return pad


def split_batch(batch: dict) -> list[tuple[list[int], list[int]]]:
    """A padded batch (either side) -> per row (prompt ids, completion ids): attended tokens, split at the first
    labelled one."""
    ids = batch["input_ids"].tolist()
    attn = batch["attention_mask"].tolist() if batch.get("attention_mask") is not None else [[1] * len(r) for r in ids]
    labels = batch["labels"].tolist() if batch.get("labels") is not None else [[IGNORE] * len(r) for r in ids]
    out = []
    for row_ids, row_attn, row_labels in zip(ids, attn, labels):
        kept = [(t, lab) for t, lab, m in zip(row_ids, row_labels, row_attn) if m]
        cut = next((i for i, (_, lab) in enumerate(kept) if lab != IGNORE), len(kept))
        out.append(([t for t, _ in kept[:cut]], [t for t, _ in kept[cut:]]))
    return out


def cut_after_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """A generated completion up to and including its first EOS (what comes after is padding)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1]
    return tokens
