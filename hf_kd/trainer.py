"""DistillationTrainer: a transformers.Trainer whose loss is

    L = alpha_task * L_task + kd_weight * L_kd(student, teacher) + hidden_weight * L_hidden(student, teacher)

Token losses are sums over the batch divided by the global count of counted positions in the whole
optimizer step (all gradient-accumulation micro-batches, all processes), so the loss and its gradients do
not depend on how a global batch is split.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer

from . import reliability
from .checkpoints import AtomicSaveMixin
from .config import DistillationConfig
from .losses import HIDDEN_LOSSES, LOGIT_LOSSES
from .losses.fused import resolve_kd_impl
from .pairs import check_pair, load_teacher, shared_vocab, task_loss_sum, teacher_dtype
from .schedules import LossSchedule, peak_value
from .signals import (CAUSAL_LM, CLASSIFICATION, MASKED_LM, base_model_of, build_projections, check_layer_map,
                      default_layer_map, hidden_width, position_masks, task_of)

PROJECTIONS_NAME = "hf_kd_projections.pt"
_COUNT_KEYS = ("task", "kd", "hidden", "batches")  # batches: micro-batches (the relational loss is per batch)


class DistillationTrainer(AtomicSaveMixin, Trainer):
    """A Trainer that distils ``teacher_model`` into ``model``; every other argument is the Trainer's."""

    loss_is_scaled_for_ga = True  # compute_loss normalises by the global count itself

    def __init__(self, model=None, teacher_model=None, args: DistillationConfig | None = None,
                 teacher_processing_class=None, **kwargs):
        if not isinstance(args, DistillationConfig):
            raise TypeError("args must be a hf_kd.DistillationConfig (TrainingArguments plus distillation fields)")
        if model is None or (teacher_model is None) == (args.teacher_cache is None):
            raise ValueError("DistillationTrainer needs model= (the student) and either teacher_model= or "
                             "args.teacher_cache (a folder made by `hf-kd cache-teacher`), not both")
        self.task = task_of(model)
        self.kd_impl = resolve_kd_impl(args.kd_impl, self.task)  # 'full', 'chunked' or 'fused'
        if args.teacher_cache is not None:
            return self._init_from_cache(model, args, **kwargs)
        reliability.check_tokenizers(kwargs.get("processing_class"), teacher_processing_class)
        if args.should_save:
            reliability.check_output_dir(args.output_dir)
        if isinstance(teacher_model, (str, os.PathLike)):
            teacher_model = load_teacher(str(teacher_model), self.task)
        student = base_model_of(model)
        check_pair(student, teacher_model, self.task, args)
        self.kd_vocab = shared_vocab(student, teacher_model, kwargs.get("processing_class")) \
            if self.task != CLASSIFICATION else None
        self.layer_pairs = None
        self.use_hidden = peak_value(args, "hidden_weight") > 0  # a scheduled weight that starts at 0 still counts
        if self.use_hidden or args.relation_weight > 0:
            hidden_width(teacher_model.config), hidden_width(student.config)  # clear error for CNNs etc.
            self.layer_pairs = args.layer_pairs or default_layer_map(teacher_model.config, student.config)
            check_layer_map(self.layer_pairs, teacher_model.config, student.config)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = self._prepare_teacher(teacher_model)
        self.projections = build_projections(self.layer_pairs if self.use_hidden else [], teacher_model.config,
                                             student.config, args.use_projection).to(self.accelerator.device)
        self._finish_init()

    def _init_from_cache(self, model, args, **kwargs):
        """Train from an offline teacher cache: no teacher in memory, the KD term is the top-k KL."""
        from .teacher_cache import check_cache, load_teacher_cache
        cache, meta = load_teacher_cache(args.teacher_cache)
        check_cache(meta, base_model_of(model), args, self.task)
        kwargs.setdefault("train_dataset", cache)
        self.kd_vocab, self.layer_pairs, self.teacher, self.use_hidden = None, None, None, False
        super().__init__(model=model, args=args, **kwargs)
        self.projections = nn.ModuleList()
        self._finish_init()

    def _finish_init(self) -> None:
        """What both constructors (teacher / cache) end with: logging state, the loss schedule, input checks."""
        self._stats = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._batches = {"train": 0, "eval": 0}
        self.schedule = LossSchedule(self.args) if self.args.weight_schedule != "constant" else None
        if self.schedule is not None:
            self.add_callback(self.schedule)
        self._reliability_init()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        from .teacher_cache import CACHE_COLUMNS
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, "labels", *CACHE_COLUMNS]))

    # ---- teacher -------------------------------------------------------------------------------
    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.eval().requires_grad_(False)
        dtype = teacher_dtype(self.args.teacher_dtype, teacher, self.args.device)
        if dtype is not None:
            teacher = teacher.to(dtype)
        if self.is_deepspeed_enabled:  # GPU only: ZeRO-3 shards the teacher too; other stages run it plain
            import deepspeed
            ds = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            for key in ("optimizer", "scheduler"):
                ds.pop(key, None)
            if ds.get("zero_optimization", {}).get("stage") != 3:
                ds["zero_optimization"] = {"stage": 0}
            teacher, *_ = deepspeed.initialize(model=teacher, config=ds)
            return teacher.eval()
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _teacher_outputs(self, inputs: dict, need_hidden: bool):
        from .losses.fused import forward_hidden
        kwargs = {"output_hidden_states": True} if need_hidden else {}
        if getattr(base_model_of(self.teacher).config, "use_cache", None) is not None:
            kwargs["use_cache"] = False
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        fused = self.kd_impl == "fused"
        # inference_mode: no autograd bookkeeping at all. Its tensors may not be saved for backward, so what a
        # backward keeps (the hidden states the layer map pairs, the fused path's last hidden state) is copied
        # out; the others are dropped, and the logits are read only by gradient-free code.
        with torch.inference_mode():
            if self.task == CAUSAL_LM and (fused or self.args.kd_weight == 0):  # no teacher logits needed
                outputs, last_hidden = forward_hidden(self.teacher, model_inputs, check=fused, **kwargs)
            else:
                outputs, last_hidden = self.teacher(**model_inputs, **kwargs), None
        if last_hidden is not None:
            outputs["last_hidden_state"] = last_hidden.clone()
        if need_hidden:
            used = {t for t, _ in self.layer_pairs}
            outputs.hidden_states = tuple(h.clone() if i in used else None for i, h in enumerate(outputs.hidden_states))
        return outputs

    # ---- normalisation ---------------------------------------------------------------------------
    def _counts(self, batches: list, device) -> dict:
        """Counted positions of each loss over ``batches`` and all processes."""
        totals = torch.zeros(len(_COUNT_KEYS), dtype=torch.float64)
        for batch in batches:
            masks = position_masks(batch, self.task, self.args.kd_positions)
            totals += torch.tensor([float(masks[k].sum()) if k in masks else 1.0 if k == "batches" else 0.0
                                    for k in _COUNT_KEYS], dtype=torch.float64)
        totals = totals.to(device)
        scale = 1
        if self.accelerator.num_processes > 1 and self.args.average_tokens_across_devices:
            totals = self.accelerator.reduce(totals, reduction="sum")
            scale = self.accelerator.num_processes  # DDP averages gradients over processes
        return {**{k: totals[i].clamp(min=1).float() for i, k in enumerate(_COUNT_KEYS)}, "scale": scale}

    def _get_num_items_in_batch(self, batch_samples: list, device) -> dict:
        return self._counts(batch_samples, device)

    # ---- the loss --------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        counts = num_items_in_batch if isinstance(num_items_in_batch, dict) else self._counts([inputs], self.accelerator.device)
        labels = inputs.get("labels")
        if args.alpha_task > 0 and labels is None:
            raise ValueError("alpha_task > 0 but the batch has no 'labels': use a collator that makes labels "
                             "(e.g. DataCollatorForLanguageModeling) or set alpha_task=0")
        masks = position_masks(inputs, self.task, args.kd_positions)
        need_hidden = self.layer_pairs is not None
        from .teacher_cache import CACHE_COLUMNS
        cached = {k: inputs.pop(k) for k in CACHE_COLUMNS if k in inputs}
        if self.teacher is None and args.kd_weight > 0 and not cached:
            raise ValueError("training from a teacher cache, but the batch has no teacher_topk_* columns: use the "
                             "cache as train_dataset (or keep its columns)")
        need_teacher = self.teacher is not None and (args.kd_weight > 0 or need_hidden)
        teacher_out = self._teacher_outputs(inputs, need_hidden) if need_teacher else None
        kwargs = {"output_hidden_states": True} if need_hidden else {}
        if getattr(base_model_of(model).config, "use_cache", None) is not None:
            kwargs["use_cache"] = False
        from .losses.fused import fused_student_pass
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        fused = self.kd_impl == "fused"
        sums = None
        if fused:  # no [tokens, vocab] logits: task and kd sums from the last hidden states, chunk by chunk
            outputs, sums = fused_student_pass(model, model_inputs, self.teacher, teacher_out, labels, masks["kd"],
                                               args, counts, self.kd_vocab, **kwargs)
        else:
            outputs = model(**model_inputs, **kwargs)
            if self.kd_impl == "chunked" and self.task in (CAUSAL_LM, MASKED_LM):
                sums = self._chunked_sums(outputs.logits, teacher_out, cached, labels, masks["kd"], counts)

        parts = {}
        if args.alpha_task > 0:
            task_sum = sums["task"] if sums else task_loss_sum(outputs.logits, labels, self.task,
                                                               base_model_of(model).config)
            parts["task"] = task_sum / counts["task"]
        if args.kd_weight > 0:
            if sums:
                kd_sum = sums["kd"]
            elif cached:
                from .teacher_cache import cached_kl_sum
                kd_sum = cached_kl_sum(outputs.logits, cached, masks["kd"], self.task, args.temperature)
            else:
                kd_sum = self._logit_loss_sum(outputs.logits, teacher_out.logits, masks["kd"])
            parts["kd"] = kd_sum / counts["kd"]
        if need_hidden and args.relation_weight > 0:
            parts["relation"] = self._relation_loss(outputs.hidden_states, teacher_out.hidden_states,
                                                    masks["hidden"]) / counts["batches"]
        if self.use_hidden:
            parts["hidden"] = self._hidden_loss_sum(outputs.hidden_states, teacher_out.hidden_states,
                                                    masks["hidden"]) / counts["hidden"]
        weights = {"task": args.alpha_task, "kd": args.kd_weight, "hidden": args.hidden_weight,
                   "relation": args.relation_weight}
        loss = sum(weights[k] * v for k, v in parts.items()) * counts["scale"]
        if not torch.isfinite(loss):  # cheap check on the total; the culprit is looked for only now
            loss, parts = reliability.handle_nonfinite(self, model, loss, parts, outputs, teacher_out)
        self._record(parts, counts["scale"], model.training)
        if return_outputs and getattr(outputs, "hidden_states", None) is not None:
            outputs.hidden_states = None  # keep evaluation from gathering them
        return (loss, outputs) if return_outputs else loss

    def _chunked_sums(self, logits, teacher_out, cached, labels, kd_mask, counts) -> dict:
        """Task CE and KD sums of a language model in one chunked pass over its logits (hf_kd.losses.kd_ce)."""
        from .losses.kd_ce import chunked_kd_ce_sums
        from .teacher_cache import CACHE_COLUMNS
        args = self.args
        use_kd, use_ce = args.kd_weight > 0, args.alpha_task > 0
        if self.task == CAUSAL_LM:  # position i predicts token i+1: drop the last position, shift the labels
            kd_mask = torch.cat([kd_mask, torch.zeros_like(kd_mask[:, :1])], dim=1)
            labels = None if labels is None else torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
        n = kd_mask.numel()
        teacher = teacher_out.logits.reshape(n, -1) if use_kd and teacher_out is not None else None
        topk = tuple(cached[c].reshape(n, -1).squeeze(-1) if c == CACHE_COLUMNS[2] else cached[c].reshape(n, -1)
                     for c in CACHE_COLUMNS) if use_kd and cached else None
        kd, ce = chunked_kd_ce_sums(
            logits.reshape(n, -1), teacher, teacher_topk=topk, labels=labels.reshape(-1) if use_ce else None,
            mask=kd_mask.reshape(-1), kind=args.kd_loss, beta=args.jsd_beta, temperature=args.temperature,
            chunk_size=args.kd_chunk_size, vocab_limit=self.kd_vocab,
            kd_coef=args.kd_weight / float(counts["kd"]), ce_coef=args.alpha_task / float(counts["task"]))
        return {"kd": kd, "task": ce}

    def _logit_loss_sum(self, student_logits, teacher_logits, mask):
        from .losses.chunked import CHUNKED_LOGIT_LOSSES
        extra = {"beta": self.args.jsd_beta} if self.args.kd_loss == "jsd" else {}
        if self.kd_impl == "chunked":  # classifiers asked for it explicitly (LMs take _chunked_sums)
            return CHUNKED_LOGIT_LOSSES[self.args.kd_loss](
                student_logits, teacher_logits, temperature=self.args.temperature, mask=mask, reduction="sum",
                chunk_size=self.args.kd_chunk_size, vocab_limit=self.kd_vocab, **extra)
        if self.task == CAUSAL_LM:  # logits at i predict token i+1, for both models
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        if self.kd_vocab is not None:
            student_logits, teacher_logits = student_logits[..., :self.kd_vocab], teacher_logits[..., :self.kd_vocab]
        fn = LOGIT_LOSSES[self.args.kd_loss]
        return fn(student_logits, teacher_logits, temperature=self.args.temperature, mask=mask,
                  reduction="sum", **extra)

    def _relation_loss(self, student_states, teacher_states, mask):
        """Similarity-preserving KD of this micro-batch, averaged over the layer-map pairs."""
        from .losses.relational import pooled, similarity_preserving
        mask = mask if mask.dim() == 2 else None  # images: every patch counts
        return sum(similarity_preserving(pooled(student_states[s], mask), pooled(teacher_states[t], mask))
                   for t, s in self.layer_pairs) / len(self.layer_pairs)

    def _hidden_loss_sum(self, student_states, teacher_states, mask):
        fn = HIDDEN_LOSSES[self.args.hidden_loss]
        total = 0.0
        for proj, (t, s) in zip(self.projections, self.layer_pairs):
            h_s, h_t = proj(student_states[s]), teacher_states[t]
            if h_s.dim() != 3 or h_s.shape != h_t.shape:
                raise ValueError(f"hidden states {t}:{s} have shapes {tuple(h_t.shape)} (teacher) and "
                                 f"{tuple(h_s.shape)} (student): hidden losses need [batch, tokens, width] "
                                 "states with the same number of tokens")
            if mask.dim() == 1:  # images: one count per example, mean over patches
                total = total + (fn(h_s, h_t, reduction="none").mean(-1) * mask).sum()
            else:
                total = total + fn(h_s, h_t, mask=mask, reduction="sum")
        return total / len(self.layer_pairs)

    # ---- logging -----------------------------------------------------------------------------------
    def _record(self, parts: dict, scale: int, training: bool) -> None:
        mode = "train" if training else "eval"
        for name, value in parts.items():
            self._stats[mode][name] += float(value.detach()) * scale / max(self.accelerator.num_processes, 1)
        self._batches[mode] += 1

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stats, n = self._stats[mode], self._batches[mode]
        if stats and n:
            steps = n / self.args.gradient_accumulation_steps if mode == "train" else n
            names = sorted(stats)
            values = torch.tensor([stats[k] for k in names], device=self.accelerator.device)
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="sum")
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}_loss": round(float(v) / steps, 6) for k, v in zip(names, values)})
        self._stats[mode].clear()
        self._batches[mode] = 0
        self._log_skipped(logs, mode)
        if mode == "train" and self.schedule is not None:
            last = max(self.state.global_step - 1, 0)  # the values the last step trained with
            logs.update({k: round(v, 6) for k, v in self.schedule.values(self.args, last, self.state.max_steps).items()})
        super().log(logs, start_time)

    # ---- projections: trained with the student, saved with checkpoints, never in the student --------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        params = [p for p in self.projections.parameters() if p.requires_grad]
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._begin_micro_batch(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:  # DDP does not see the projections: average their grads
            for p in self.projections.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.accelerator.num_processes
        return loss

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and len(list(self.projections.parameters())):
            torch.save(self.projections.state_dict(), os.path.join(output_dir, PROJECTIONS_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, PROJECTIONS_NAME)):
            state = torch.load(os.path.join(checkpoint, PROJECTIONS_NAME), map_location=self.accelerator.device)
            self.projections.load_state_dict(state)
        super()._load_optimizer_and_scheduler(checkpoint)

    # ---- reliability: bad input, non-finite losses, interrupts, atomic saves (hf_kd/reliability.py) ---------
    def _reliability_init(self) -> None:
        self._skipped = 0  # micro-batches dropped by nan_policy='skip' (this process)
        self._micro = (-1, -1)  # (global step, micro-batch index within it) of the running training_step
        self._max_len = reliability.position_limit(self)
        self.interrupt = reliability.GracefulInterrupt()  # SIGINT/SIGTERM: save a checkpoint, stop cleanly
        self.add_callback(self.interrupt)
        reliability.check_training_data(self, self.train_dataset, "train_dataset")
        reliability.check_training_data(self, self.eval_dataset, "eval_dataset")

    def _begin_micro_batch(self, inputs) -> None:
        step, index = self._micro
        self._micro = (self.state.global_step, index + 1 if step == self.state.global_step else 0)
        if self._micro[1] == 0:  # a new optimizer step: Trainer zeroes only the model's gradients, not the
            self.projections.zero_grad(set_to_none=True)  # projections' (they would add up across steps)
        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if self._max_len is not None and torch.is_tensor(ids) and ids.shape[-1] > self._max_len:  # streamed data
            reliability.check_batch(self, inputs, f"micro-batch {self._micro[1]} of global step {step + 1}", False)

    def _log_skipped(self, logs: dict, mode: str) -> None:
        if mode != "train" or self.args.nan_policy != "skip":
            return
        total = torch.tensor(float(self._skipped), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        logs["skipped_batches"] = int(total)

    def train(self, *train_args, **train_kwargs):
        try:
            return super().train(*train_args, **train_kwargs)
        finally:  # also when training raises: never leave our signal handlers installed
            self.interrupt.restore()
