"""Dataset helpers: tokenise-and-pack text for causal LMs, tokenise for masked LMs, image transforms, transfer sets
with a fixed labelled share."""

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


def masked_views(dataset: Dataset, tokenizer, views: int = 1, mlm_probability: float = 0.15,
                 seed: int = 0) -> Dataset:
    """Static masking for a masked LM, as BERT's pre-training data was made: each row of ``dataset`` (``input_ids``)
    masked ``views`` times with different seeds (DataCollatorForLanguageModeling's 80/10/10 rule), padded to the
    longest row. Returns input_ids, attention_mask and labels (-100 except at the masked positions), all rows of
    one length, view after view: what a teacher cache needs (:func:`hf_kd.teachers.cache.reusable_cache`), since a
    masked LM's targets depend on which tokens are masked."""
    from transformers import DataCollatorForLanguageModeling
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if "input_ids" not in dataset.column_names or len(dataset) == 0:
        raise ValueError("masked_views needs a non-empty dataset with an input_ids column (tokenize_for_masked_lm)")
    rows = [{"input_ids": ids} for ids in dataset["input_ids"]]
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for view in range(views):
        batch = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed + view)(rows)
        for column in out:  # one padded batch of every row: equal lengths by construction
            out[column] += batch[column].tolist()
    return Dataset.from_dict(out)


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


def share_rows(n_labelled: int, n_unlabelled: int, labelled_share: float) -> torch.Tensor:
    """Row indices into ``[labelled rows 0..n_labelled-1, unlabelled rows n_labelled..]`` in which the labelled
    rows are ``labelled_share`` of all rows (to the nearest row), each row appearing at least once.

    When the labelled rows are rarer than the share asks, they are repeated (each ``floor`` or ``ceil`` of the same
    factor, spread evenly) and every unlabelled row appears once; when they are more common, the unlabelled rows
    are repeated instead. Under the Trainer's shuffling (a uniform random permutation of the rows, drawn without
    replacement) every batch then holds on average ``labelled_share * batch_size`` labelled rows (exact in
    expectation, and exact over each epoch); a batch's count varies around it with at most the binomial spread
    ``sqrt(batch_size * share * (1 - share))``. (A fixed count in every batch would need a sampler inside the
    Trainer; this order needs nothing but the dataset.)
    """
    check_share(labelled_share)
    if n_labelled < 1 or n_unlabelled < 1:
        raise ValueError(f"labelled_share needs labelled and unlabelled rows (got {n_labelled} labelled, "
                         f"{n_unlabelled} unlabelled)")
    if labelled_share * (n_labelled + n_unlabelled) >= n_labelled:  # repeat the labelled rows
        n_l, n_u = max(n_labelled, round(labelled_share * n_unlabelled / (1 - labelled_share))), n_unlabelled
    else:  # repeat the unlabelled rows
        n_l, n_u = n_labelled, max(n_unlabelled, round(n_labelled * (1 - labelled_share) / labelled_share))
    return torch.cat([_spread(n_l, n_labelled), n_labelled + _spread(n_u, n_unlabelled)])


def _spread(n: int, k: int) -> torch.Tensor:
    """``n >= k`` indices covering 0..k-1, each ``n // k`` or ``n // k + 1`` times, in order."""
    return torch.arange(n) * k // n


def check_share(labelled_share) -> None:
    """Refuse a labelled share that is not a number strictly between 0 and 1."""
    ok = isinstance(labelled_share, (int, float)) and not isinstance(labelled_share, bool)
    if not ok or not 0 < labelled_share < 1:
        raise ValueError(f"labelled_share must be a number strictly between 0 and 1 (the share of labelled rows in "
                         f"a batch, e.g. 0.5), not {labelled_share!r}; pass None to keep every row once")


def with_transfer_set(labelled: Dataset, unlabelled: Dataset, label_column: str = "labels",
                      labelled_share: float | None = None) -> Dataset:
    """A labelled dataset plus an unlabelled one (a transfer set, Hinton et al. 2015) as one dataset whose
    unlabelled rows carry label -100: the task loss skips them, distillation (``kd_positions='all'``, the default
    for classifiers) counts every row. Columns must otherwise match; the unlabelled set may lack the label column
    (a scalar label per row: classifiers; token-level labels need the caller's own -100 rows).

    ``labelled_share`` (e.g. 0.5) repeats rows (:func:`share_rows`) so that labelled rows are that share of the
    dataset, hence on average of every shuffled batch: a few labelled examples in a large transfer set otherwise
    land one or two per batch, and the task loss, averaged over them, is very noisy. ``None``: every row once.
    """
    from datasets import concatenate_datasets
    if labelled_share is not None:
        check_share(labelled_share)
    if label_column not in labelled.column_names:
        raise ValueError(f"the labelled dataset has no {label_column!r} column (columns: {labelled.column_names})")
    if label_column in unlabelled.column_names:
        unlabelled = unlabelled.remove_columns(label_column)
    missing = set(labelled.column_names) - {label_column} - set(unlabelled.column_names)
    if missing:
        raise ValueError(f"the unlabelled dataset lacks columns {sorted(missing)} of the labelled one")
    unlabelled = unlabelled.select_columns([c for c in labelled.column_names if c != label_column])
    unlabelled = unlabelled.add_column(label_column, [-100] * len(unlabelled))
    both = concatenate_datasets([labelled, unlabelled.cast(labelled.features)])
    if labelled_share is None:
        return both
    return both.select(share_rows(len(labelled), len(unlabelled), labelled_share).tolist())
