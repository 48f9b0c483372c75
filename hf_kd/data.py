"""Dataset helpers: tokenise-and-pack text for causal LMs, tokenise for masked LMs, image transforms."""

from __future__ import annotations

import torch
from datasets import Dataset


def _text_column(dataset: Dataset, text_column: str) -> str:
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to distil on")
    if text_column not in dataset.column_names:
        raise ValueError(f"the dataset has no {text_column!r} column (columns: {dataset.column_names}); "
                         "pass text_column=<the column with the text>")
    return text_column


def pack_for_causal_lm(dataset: Dataset, tokenizer, block_size: int, text_column: str = "text",
                       max_blocks: int | None = None) -> Dataset:
    """Tokenise every row, join them with EOS and cut the stream into blocks of ``block_size`` tokens.

    Returns columns input_ids, attention_mask, labels (labels = input_ids; the model's shift aligns them).
    Packing wastes no compute on padding, which matters on a CPU.
    """
    col = _text_column(dataset, text_column)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in dataset[col]:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the dataset has {len(stream)} tokens, fewer than one block of {block_size}: "
                         "lower block_size or add text")
    blocks = [stream[i * block_size:(i + 1) * block_size] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                              "labels": blocks})


def tokenize_for_masked_lm(dataset: Dataset, tokenizer, max_length: int, text_column: str = "text") -> Dataset:
    """Tokenise (truncating to ``max_length``) for DataCollatorForLanguageModeling(mlm=True)."""
    col = _text_column(dataset, text_column)
    return dataset.map(lambda b: tokenizer(b[col], truncation=True, max_length=max_length), batched=True,
                       remove_columns=dataset.column_names)


def image_transform(processor, image_column: str = "image", label_column: str = "label"):
    """A ``set_transform`` function: PIL images -> pixel_values with the model's processor, labels kept."""
    def apply(batch):
        images = [im.convert("RGB") if processor_wants_rgb(processor) else im for im in batch[image_column]]
        out = processor(images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "labels": torch.as_tensor(batch[label_column])}
    return apply


def processor_wants_rgb(processor) -> bool:
    mean = getattr(processor, "image_mean", None)
    return mean is None or len(mean) == 3


def with_transfer_set(labelled: Dataset, unlabelled: Dataset, label_column: str = "labels") -> Dataset:
    """A labelled dataset plus an unlabelled one (a transfer set, Hinton et al. 2015) as one dataset whose
    unlabelled rows carry label -100: the task loss skips them, distillation (``kd_positions='all'``, the default
    for classifiers) counts every row. Columns must otherwise match; the unlabelled set may lack the label column
    (a scalar label per row: classifiers; token-level labels need the caller's own -100 rows)."""
    from datasets import concatenate_datasets
    if label_column not in labelled.column_names:
        raise ValueError(f"the labelled dataset has no {label_column!r} column (columns: {labelled.column_names})")
    if label_column in unlabelled.column_names:
        unlabelled = unlabelled.remove_columns(label_column)
    missing = set(labelled.column_names) - {label_column} - set(unlabelled.column_names)
    if missing:
        raise ValueError(f"the unlabelled dataset lacks columns {sorted(missing)} of the labelled one")
    unlabelled = unlabelled.select_columns([c for c in labelled.column_names if c != label_column])
    unlabelled = unlabelled.add_column(label_column, [-100] * len(unlabelled))
    return concatenate_datasets([labelled, unlabelled.cast(labelled.features)])
