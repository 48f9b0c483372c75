"""Run a causal-LM teacher once over packed text and store its top-k distribution (``hf-kd cache-teacher``); then
train with ``--teacher_cache FOLDER`` and no teacher in memory.

    python recipes/cache_teacher.py --output_dir outputs/teacher_cache [--k 32] [--temperature 1.0] [--max_blocks N]

The cache format (columns, metadata, the top-k KL) is :mod:`hf_kd.teachers.cache`. The default cache is made at
T = 1 and serves any constant training temperature: the top-k is re-tempered at load (exact inside the top-k, the
tail's share estimated: :func:`hf_kd.teachers.cache.retemper`); a cache made at T is used as is when training at T.
"""

from __future__ import annotations

import dataclasses
import json

from transformers import HfArgumentParser

from hf_kd.data import pack_for_causal_lm
from hf_kd.teachers.cache import build_teacher_cache
from hf_kd_recipes.distill_clm import load_teacher, load_text


@dataclasses.dataclass
class CacheArguments:
    """`hf-kd cache-teacher`: run a causal-LM teacher over packed text once and store its top-k."""

    output_dir: str = dataclasses.field(default="outputs/teacher_cache", metadata={"help": "Where to save."})
    teacher: str = dataclasses.field(default="smollm2", metadata={"help": "'smollm2' (packaged) or folder/Hub id."})
    dataset: str = dataclasses.field(default="tales", metadata={"help": "'tales' or a datasets name."})
    text_column: str = dataclasses.field(default="text", metadata={"help": "Text column."})
    block_size: int = dataclasses.field(default=128, metadata={"help": "Tokens per packed sequence."})
    max_blocks: int = dataclasses.field(default=0, metadata={"help": "Blocks to cache (0 = all)."})
    k: int = dataclasses.field(default=32, metadata={"help": "Teacher log-probabilities kept per token."})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "Temperature the cache is made at. "
                                           "1 (default) serves every training temperature by re-tempering at "
                                           "load; any other value must equal the training temperature."})
    storage_dtype: str = dataclasses.field(default="float16", metadata={"help": "float16 or float32."})
    batch_size: int = dataclasses.field(default=8, metadata={"help": "Teacher batch size."})


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(CacheArguments).parse_args_into_dataclasses(args=argv)
    teacher, tok = load_teacher(args.teacher)
    train_text, _, _ = load_text(args.dataset)
    blocks = pack_for_causal_lm(train_text, tok, args.block_size, args.text_column, max_blocks=args.max_blocks or None)
    meta = build_teacher_cache(teacher, blocks, args.output_dir, k=args.k, temperature=args.temperature,
                               storage_dtype=args.storage_dtype, batch_size=args.batch_size, teacher_name=args.teacher)
    print(json.dumps(meta, indent=2))
    return meta


if __name__ == "__main__":
    main()
