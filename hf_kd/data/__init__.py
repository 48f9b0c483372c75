"""What the student and teacher are fed: dataset helpers and transfer sets (datasets, re-exported here so
``from hf_kd.data import pack_for_causal_lm`` works), prompts, generation, on-policy data, cross-tokenizer alignment,
multi-view augmentation (views) and hf_kd's cache folder (cache)."""

from .datasets import (check_share, image_transform, masked_views, pack_for_causal_lm, processor_wants_rgb,
                       share_rows, tokenize_for_masked_lm, with_transfer_set)

__all__ = ["pack_for_causal_lm", "tokenize_for_masked_lm", "masked_views", "image_transform", "processor_wants_rgb",
           "share_rows", "check_share", "with_transfer_set"]
