"""Data modes of causal-LM distillation (``DistillationConfig.data_mode``), the batches the trainer's one-way flow
starts from:

- ``supervised``: the dataset's tokens (nothing here runs);
- ``sequence_level`` (Kim & Rush 2016): the teacher's completions of the dataset's prompts, generated once before
  training and cached (:func:`hf_kd.data.generation.teacher_generations`); training is then supervised on them;
- ``on_policy`` (GKD, Agarwal et al. 2024): before an optimizer step's micro-batches are counted, each is replaced,
  with probability ``lmbda``, by the current student's completions of its prompts; the teacher then scores every
  token in its normal pass. lmbda = 1 is fully on-policy, 0 is supervised, in between mixed.

Every row is prompt + completion with labels -100 on the prompt (hf_kd.data.prompts), so with ``kd_positions='auto'``
only completion tokens are distilled, generated or not.
"""

from __future__ import annotations

import time

import numpy as np
from datasets import Dataset

from .cache import cache_dir
from .generation import (GenerationSettings, VLLMGenerator, check_vllm, derive_seed, eos_ids_of,
                         generate_completions, teacher_generations)
from .prompts import IGNORE, PromptCollator, make_row, pad_id_of, pad_rows, split_batch, tokenize_prompts
from ..flow.tasks import CAUSAL_LM


class OnPolicy:
    """Replaces a step's micro-batches by the student's generations with probability ``lmbda``.

    The choice for micro-batch ``index`` of optimizer step ``step`` is a Bernoulli(lmbda) draw from an RNG seeded
    by (seed, step // reuse, index), and the sampling seed of its generation derives from the same numbers: a run
    repeats exactly, and a resumed run makes the same choices from the step it resumes at (no RNG state to save).
    With ``reuse`` > 1 the batches generated at the first step of a group of ``reuse`` optimizer steps are trained
    on again at the group's later steps (the dataset's batches of those steps are skipped); a run resumed inside a
    group generates them afresh from the resumed student.
    """

    def __init__(self, lmbda: float, settings: GenerationSettings, seed: int, pad_id: int, eos_ids: set[int],
                 reuse: int = 1):
        if not 0 <= lmbda <= 1:
            raise ValueError(f"lmbda is a probability in [0, 1], got {lmbda}")
        if reuse < 1:
            raise ValueError(f"generations_reuse must be >= 1, got {reuse}")
        if settings.use_vllm:
            check_vllm()
        self.lmbda, self.settings, self.seed, self.reuse = lmbda, settings, seed, reuse
        self.pad_id, self.eos_ids = pad_id, set(eos_ids)
        self.vllm: VLLMGenerator | None = None  # made at the first generation (it copies the student)
        self._group, self._kept = None, {}  # reuse: the current group and its generated batches by index
        self.batches = self.generated = 0  # since the last log
        self.seconds = 0.0

    @classmethod
    def from_args(cls, args, model, tokenizer) -> "OnPolicy":
        if tokenizer is None:
            raise ValueError("data_mode='on_policy' needs processing_class= (the tokenizer): its pad and EOS tokens "
                             "frame the generated completions")
        return cls(args.lmbda, GenerationSettings.from_config(args), args.seed, pad_id_of(tokenizer),
                   eos_ids_of(model, tokenizer), args.generations_reuse)

    def generates(self, step: int, index: int) -> bool:
        """Whether micro-batch ``index`` of optimizer step ``step`` trains on the student's generations."""
        if self.lmbda >= 1 or self.lmbda <= 0:
            return self.lmbda >= 1
        return bool(np.random.default_rng([self.seed, step // self.reuse, index]).random() < self.lmbda)

    def __call__(self, model, batches: list[dict], step: int) -> list[dict]:
        """The micro-batches of optimizer step ``step``, each kept or replaced by the student's generations."""
        group = step // self.reuse
        if group != self._group:
            self._group, self._kept = group, {}
        out = []
        for index, batch in enumerate(batches):
            self.batches += 1
            if not self.generates(step, index):
                if batch.get("labels") is None or not bool((batch["labels"] != IGNORE).any()):
                    raise ValueError("data_mode='on_policy' with lmbda < 1 trains the batches it does not generate on "
                                     "the dataset's completions, but this batch has none (every label -100, or no "
                                     "labels): set lmbda=1, or give the dataset completions")
                out.append(batch)
                continue
            self.generated += 1
            if index not in self._kept:
                self._kept[index] = self.generate(model, batch, derive_seed(self.seed, group, index, 1))
            out.append(self._kept[index])
        return out

    def generate(self, model, batch: dict, seed: int) -> dict:
        """The batch's prompts completed by ``model`` (the student): right-padded rows, labels -100 on the prompt and
        on the padding after each completion's EOS, the completion's tokens (EOS included) labelled."""
        start = time.perf_counter()
        prompts = [prompt for prompt, _ in split_batch(batch)]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("on-policy generation needs a prompt in every row, but a row is labelled from its first "
                             "token (e.g. packed text): mark prompt tokens with label -100 (hf_kd.data.prompts."
                             "tokenize_prompts)")
        if self.settings.use_vllm:
            if self.vllm is None:
                self.vllm = VLLMGenerator(model)
            self.vllm.sync(model)
            completions = self.vllm(prompts, self.settings, self.eos_ids, seed)
        else:
            completions = generate_completions(model, prompts, self.settings, self.pad_id, self.eos_ids, seed)
        rows = [make_row(p, c) for p, c in zip(prompts, completions)]
        out = pad_rows(rows, self.pad_id, "right", batch["input_ids"].device)
        self.seconds += time.perf_counter() - start
        return out

    def log_values(self) -> dict:
        """Since the last log: the share of micro-batches trained on generations and the seconds spent generating
        (nothing when no batch ran, e.g. the end-of-training summary)."""
        if self.batches == 0:
            return {}
        values = {"on_policy_fraction": round(self.generated / max(self.batches, 1), 4),
                  "generation_seconds": round(self.seconds, 3)}
        self.batches = self.generated = 0
        self.seconds = 0.0
        return values


def setup_data_mode(trainer, args, data_collator=None) -> OnPolicy | None:
    """At the trainer's construction: checks the mode against the task and the teacher, gives prompt-completion rows
    a :class:`PromptCollator` unless ``data_collator`` was passed, swaps the train dataset for the teacher's cached
    generations (sequence_level) and returns the :class:`OnPolicy` batch source (on_policy) or None."""
    mode = args.data_mode
    if mode == "supervised":
        return None
    if trainer.task != CAUSAL_LM:
        raise ValueError(f"data_mode={mode!r} generates text: it needs a causal LM student, not a {trainer.task} model")
    if trainer.processing_class is None:
        raise ValueError(f"data_mode={mode!r} needs processing_class= (the tokenizer): its pad and EOS tokens frame "
                         "prompts and completions")
    if data_collator is None:
        trainer.data_collator = PromptCollator(trainer.processing_class)
    trainer.train_dataset = _tokenized(trainer.train_dataset, trainer.processing_class)
    trainer.eval_dataset = _tokenized(trainer.eval_dataset, trainer.processing_class)
    if mode == "on_policy":
        return OnPolicy.from_args(args, trainer.model, trainer.processing_class)
    if trainer.teacher is None:
        raise ValueError("data_mode='sequence_level' needs teacher_model= in memory: the teacher writes the "
                         "completions")
    if trainer.train_dataset is None:
        raise ValueError("data_mode='sequence_level' needs train_dataset= (the prompts the teacher completes)")
    cache = args.generation_cache_dir or str(cache_dir() / "teacher_generations")  # keyed by content: shared by runs
    with args.main_process_first(desc="teacher generations"):  # one process generates, the others read the cache
        trainer.train_dataset = teacher_generations(
            trainer.teacher, trainer.processing_class, trainer.train_dataset, GenerationSettings.from_config(args),
            cache, batch_size=args.per_device_train_batch_size, seed=args.seed,
            progress=trainer.is_world_process_zero() and not args.disable_tqdm)
    return None


def _tokenized(data, tokenizer):
    """Raw prompt-completion or conversational rows -> tokenised rows (hf_kd.data.prompts); anything else unchanged."""
    if isinstance(data, Dataset) and "input_ids" not in data.column_names and {"prompt", "messages"} & set(
            data.column_names):
        return tokenize_prompts(data, tokenizer)
    return data
