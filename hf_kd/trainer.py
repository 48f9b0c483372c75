"""DistillationTrainer: a transformers.Trainer whose loss is a weighted sum of signals,

    L = sum_k w_k(step) * L_k(student, teacher)        (hf_kd.signals: task loss, logit KD, hidden states, ...)

One batch flows one way: align (hf_kd.flow.align: masks and counts) -> one teacher pass and one student pass that keep
what the signals need (hf_kd.flow.capture) -> the logit signals through the logit engine (hf_kd.engine), the others
through their own loss_sum -> each divided by its global count -> weighted sum -> backward.

Counts are summed over every micro-batch of the optimizer step and every process, so the loss and its gradients
do not depend on how a global batch is split. The signals' trainable parts (projections, adapters) live in one
module attached to the student: the Trainer's optimizer, gradient clipping, grad_norm and checkpoints see them;
they are never saved into the student folder.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer

from .flow import capture
from .signals import groups as param_groups
from .teachers import placement
from .tools import reliability
from .flow.align import COUNT_KEYS, batch_counts, position_masks
from .tools.checkpoints import AtomicSaveMixin
from .config import DistillationConfig
from .teachers.curriculum import TeacherCurriculum
from .engine import LogitEngine, logit_needs
from .data.on_policy import setup_data_mode
from .teachers.pairs import load_teachers
from .flow.schedules import Schedule
from .teachers.served import TopkCollator, connect
from .signals import WEIGHT_FIELDS, Context, Signal, from_config
from .signals.base import EXTRAS, leaves_parameters_unused
from .flow.tasks import base_model_of, task_of
from .teachers.cache import CACHE_COLUMNS, check_cache, load_teacher_cache
from .data.cross_tokenizer import CROSS_COLUMNS, CrossTokenizerCollator, prepare as prepare_cross_tokenizer

EXTRAS_FILE = "hf_kd_extras.pt"  # their state in a checkpoint


class DistillationTrainer(AtomicSaveMixin, Trainer):
    """A Trainer that distils ``teacher_model`` into ``model``; ``signals``: extra terms (hf_kd.signals.Signal)
    beside those the config's fields ask for; every other argument is the Trainer's."""

    loss_is_scaled_for_ga = True  # compute_loss normalises by the global count itself

    def __init__(self, model=None, teacher_model=None, args: DistillationConfig | None = None,
                 teacher_processing_class=None, signals: list[Signal] | None = None, **kwargs):
        if not isinstance(args, DistillationConfig):
            raise TypeError("args must be a hf_kd.DistillationConfig (TrainingArguments plus distillation fields)")
        sources = sum(x is not None for x in (teacher_model, args.teacher_cache, args.teacher_url))
        if model is None or sources > 1:  # no teacher at all: only signals that need none (checked per signal)
            raise ValueError("DistillationTrainer needs model= (the student) and at most one teacher source: "
                             "teacher_model=, args.teacher_cache (a folder made by `hf-kd cache-teacher`) or "
                             "args.teacher_url (a server started by `hf-kd serve-teacher`)")
        self.task = task_of(model)
        self.kd_impl = capture.resolve_kd_impl(args.kd_impl, self.task)  # 'full', 'chunked' or 'fused'
        student = base_model_of(model)
        self.kd_vocab, cache_meta, teachers, client = None, None, {}, None
        tokenizers = None  # (student's, teacher's) with cross_tokenizer
        if args.teacher_cache is not None:
            dataset, cache_meta = load_teacher_cache(args.teacher_cache)
            kwargs["train_dataset"] = kwargs.get("train_dataset") or dataset
        elif args.teacher_url is not None:  # the cache's columns per batch, from the server (hf_kd.teachers.served)
            client, cache_meta = connect(args.teacher_url, student, kwargs.get("processing_class"))
        else:
            if args.cross_tokenizer:  # two tokenizers on purpose: each model reads its own tokenisation of the text
                tokenizers = prepare_cross_tokenizer(kwargs, teacher_processing_class)
            else:
                reliability.check_tokenizers(kwargs.get("processing_class"), teacher_processing_class)
            if args.should_save:
                reliability.check_output_dir(args.output_dir)
            if teacher_model is not None:
                teachers, self.kd_vocab = load_teachers(teacher_model, student, self.task, args,
                                                        kwargs.get("processing_class"))
        self.default_teacher = next(iter(teachers), "teacher")
        self.signals = self._build_signals(args, teachers, student, signals or [], cache_meta, tokenizers)
        self._attach_signals(model, student)
        super().__init__(model=model, args=args, **kwargs)
        if client is not None or (cache_meta is not None and cache_meta["temperature"] != args.temperature):
            self.data_collator = TopkCollator(self.data_collator, client, cache_meta["vocab_size"], args.temperature,
                                              cache_meta["temperature"])  # fetch and/or re-temper the top-k
        self._teacher_use = placement.TeacherUse(list(teachers.values()))  # the user's objects given back as passed
        with self._teacher_use:
            self.teachers = {name: self._prepare_teacher(t) for name, t in teachers.items()}
        self.teacher = self.teachers.get(self.default_teacher)  # the default (first) teacher
        self.curriculum = self._curriculum(args)
        self.on_policy = setup_data_mode(self, args, kwargs.get("data_collator"))  # None unless data_mode=on_policy
        self.engine = LogitEngine(self.kd_impl, self.task, model, self.teachers, chunk_size=args.kd_chunk_size,
                                  vocab_limit=self.kd_vocab)
        self._stats = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._batches = {"train": 0, "eval": 0}
        self._reliability_init()

    def _curriculum(self, args) -> TeacherCurriculum | None:
        """teacher_checkpoints: successive teacher weights (route-constrained optimisation), a callback."""
        if not args.teacher_checkpoints:
            return None
        if len(self.teachers) != 1:
            raise ValueError("teacher_checkpoints is a curriculum of one teacher's checkpoints: pass one teacher_model")
        switch = [float(x) for x in args.teacher_switch_at.split(",")] if args.teacher_switch_at else None
        curriculum = TeacherCurriculum(self.teacher, args.teacher_checkpoints.split(","), switch)
        self.add_callback(curriculum)
        return curriculum

    # ---- the signals ----------------------------------------------------------------------------------------
    def _build_signals(self, args, teachers: dict, student, extra: list, cache_meta, tokenizers=None) -> nn.ModuleList:
        built = from_config(args, self.task, teachers, student, tokenizers) + list(extra)
        names = [s.name for s in built]
        if len(set(names)) != len(names):
            raise ValueError(f"signal names must be unique, got {names}")
        if not built:
            raise ValueError("no signal has a weight > 0: set alpha_task, kd_weight, hidden_weight (or pass signals=)")
        for s in built:
            self._check_signal(s, teachers, student, cache_meta is not None)
        if cache_meta is not None:
            check_cache(cache_meta, student, built, self.task)
        return nn.ModuleList(built)

    def _check_signal(self, s: Signal, teachers: dict, student, cached: bool) -> None:
        """One signal against the teachers and the engine (clear errors at construction), then its own check (which
        builds its trainable parts), and the attention implementation it needs."""
        names = s.teacher_names(self.default_teacher)
        if cached and not (s.teacher_free or s.logit):
            raise ValueError(f"teacher_cache: signal {s.name!r} needs the teacher in memory (a cache holds only its "
                             "top-k output distribution): drop it or train online")
        if teachers and any(n not in teachers for n in names):
            raise ValueError(f"signal {s.name!r} reads teacher(s) {names}; the teachers are {list(teachers)}")
        if getattr(s, "mixing", None) == "learned" and self.kd_impl != "full":
            raise ValueError("learned teacher weights are trained through the KD loss's target, which the "
                             f"{self.kd_impl} path treats as a constant: set kd_impl='full'")
        if s.logit and len(names) > 1 and self.kd_impl == "fused":
            raise ValueError("kd_impl='fused' makes one teacher's logits from its hidden states; a mixture of teachers "
                             "needs their logits: use kd_impl='chunked'")
        teacher = teachers.get(s.teacher or self.default_teacher)
        if teacher is None and not s.teacher_free and (not s.logit or not cached):
            raise ValueError(f"signal {s.name!r} needs a teacher (set its weight to 0, e.g. kd_weight=0, or pass "
                             "teacher_model=)")
        s.check(teacher, student)
        if (s.needs("teacher") | s.needs("student")).attentions:
            for m in (*[teachers[n] for n in names if n in teachers], student):
                capture.use_eager_attention(m)
        if s.needs("student").grads:  # a double backward: SDPA / flash kernels have no second derivative
            capture.use_eager_attention(student)

    def _attach_signals(self, model: nn.Module, student: nn.Module) -> None:
        """The signals become a submodule of the student, so optimizer, clipping, grad_norm and device placement
        include their parameters; save_pretrained skips them (_keys_to_ignore_on_save) and DDP ignores them (their
        gradients are averaged by hand in training_step: they are used outside the student's forward)."""
        student.add_module(EXTRAS, self.signals)
        keys = {k for k in student.state_dict() if k.startswith(EXTRAS + ".")}
        student._keys_to_ignore_on_save = set(student._keys_to_ignore_on_save or ()) | keys
        model._ddp_params_and_buffers_to_ignore = [
            n for n, _ in [*model.named_parameters(), *model.named_buffers()] if f"{EXTRAS}." in n]

    def _build_accelerator_args(self, **kwargs) -> dict:  # DDP's find_unused_parameters: the user's, else True
        out = super()._build_accelerator_args(**kwargs)  # only if a step leaves student parameters unused
        if self.args.ddp_find_unused_parameters is None:
            out["kwargs_handlers"][0].find_unused_parameters = leaves_parameters_unused(self.signals)
        return out

    @property
    def projections(self) -> nn.ModuleList:
        """The hidden-state signal's projections (empty without one)."""
        return next((s.projections for s in self.signals if hasattr(s, "projections")), nn.ModuleList())

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        text = [self.data_collator.text_column] if isinstance(self.data_collator, CrossTokenizerCollator) else []
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, "labels", *CACHE_COLUMNS, *text]))

    # ---- teacher -------------------------------------------------------------------------------------------
    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        return placement.prepare_teacher(teacher, self.args, self.accelerator, deepspeed=self.is_deepspeed_enabled,
                                         fsdp=self.is_fsdp_enabled)

    # ---- normalisation ---------------------------------------------------------------------------------------
    def _counts(self, batches: list, device) -> dict:
        """COUNT_KEYS counts over ``batches`` and all processes, plus 'scale' (DDP averages over processes)."""
        totals = sum(batch_counts(b, self.task, self.args.kd_positions) for b in batches).to(device)
        scale = 1
        if self.accelerator.num_processes > 1 and self.args.average_tokens_across_devices:
            totals = self.accelerator.reduce(totals, reduction="sum")
            scale = self.accelerator.num_processes
        return {**{k: totals[i].clamp(min=1).float() for i, k in enumerate(COUNT_KEYS)}, "scale": scale}

    def _get_num_items_in_batch(self, batch_samples: list, device) -> dict:
        return self._counts(batch_samples, device)

    # ---- the loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = num_items_in_batch if isinstance(num_items_in_batch, dict) else \
            self._counts([inputs], self.accelerator.device)
        step, total = self.state.global_step, max(self.state.max_steps, 1)
        weights = {s.name: w for s in self.signals if (w := s.weight.value(step, total)) > 0}
        active = [s for s in self.signals if s.name in weights]
        labels, cache = inputs.get("labels"), {k: inputs.pop(k) for k in CACHE_COLUMNS if k in inputs}
        cross = {k: inputs.pop(k) for k in CROSS_COLUMNS if k in inputs}  # the teacher's own ids (cross_tokenizer)
        self._check_batch(active, labels, cache)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        teachers, student = self._passes(model, model_inputs, labels, active, bool(cache))
        ctx = Context(self.task, model_inputs, labels, position_masks(inputs, self.task, self.args.kd_positions),
                      student, teachers.get(self.default_teacher), step, total,
                      {"cache": cache, "cross": cross, "teacher_models": self.teachers}, teachers,
                      self.default_teacher)
        ctx.extra["counts"] = counts
        loss, sums = self._logit_terms(ctx, active, weights, counts)
        parts = {name: total / counts[self._signal(name).normalizer] for name, total in sums.items()}
        for s in active:
            if not s.logit:
                parts[s.name] = s.loss_sum(ctx) / counts[s.normalizer]
                loss = loss + weights[s.name] * parts[s.name]
        if not torch.is_tensor(loss):  # every weight is 0 at this step: a zero still connected to the graph
            loss = reliability.connected_zero(model)
        loss = loss * counts["scale"]
        if not torch.isfinite(loss):  # cheap check on the total; the culprit is looked for only now
            loss, parts = reliability.handle_nonfinite(self, model, loss, parts, ctx.student, ctx.teacher)
        self._record(parts, counts["scale"], model.training)
        for name in teachers:  # every term is computed: free a sharded teacher's gathered weights
            placement.free_gathered(self.teachers[name])
        outputs = ctx.student.outputs
        if return_outputs and getattr(outputs, "hidden_states", None) is not None:
            outputs.hidden_states = None  # keep evaluation from gathering them
        return (loss, outputs) if return_outputs else loss

    def _signal(self, name: str) -> Signal:
        return next(s for s in self.signals if s.name == name)

    def _check_batch(self, active: list, labels, cache: dict) -> None:
        if labels is None and any(s.teacher_free or s.needs("student").grads for s in active):
            raise ValueError("the task loss (alpha_task > 0) and gradient signals need 'labels' in the batch: use a "
                             "collator that makes labels (e.g. DataCollatorForLanguageModeling) or set alpha_task=0")
        if not self.teachers and not cache and any(not s.teacher_free for s in active):
            raise ValueError("training from a teacher cache, but the batch has no teacher_topk_* columns: use the "
                             "cache as train_dataset (or keep its columns)")

    def _passes(self, model, inputs: dict, labels, active: list, cached: bool):
        """One pass of each teacher that a signal reads (one after another, each keeping only what its signals
        need) and one student pass: ({name: teacher pass}, student pass)."""
        task = any(s.logit and s.teacher_free for s in active)
        kd = any(s.logit and not s.teacher_free for s in active)
        s_needs = logit_needs(self.kd_impl, "student", kd, task)
        t_needs = {}
        for s in active:
            if not s.logit:
                s_needs = s_needs | s.needs("student")
            if s.teacher_free:
                continue
            side = logit_needs(self.kd_impl, "teacher", not cached, False) if s.logit else s.needs("teacher")
            for name in s.teacher_names(self.default_teacher):
                t_needs[name] = t_needs.get(name, side) | side
        fused = self.kd_impl == "fused"
        teachers = {name: capture.run(self.teachers[name], inputs, needs, self.task, teacher=True, fused=fused,
                                      labels=labels)
                    for name, needs in t_needs.items() if name in self.teachers and needs.any()}
        student = capture.run(model, inputs, s_needs, self.task, teacher=False, fused=fused, labels=labels)
        return teachers, student

    def _logit_terms(self, ctx: Context, active: list, weights: dict, counts: dict):
        terms = {}
        for s in active:
            if s.logit:
                terms["task" if s.teacher_free else "kd"] = (s, weights[s.name] / counts[s.normalizer])
        if not terms:
            return 0.0, {}
        return self.engine(ctx, terms.get("task"), terms.get("kd"))

    # ---- logging -----------------------------------------------------------------------------------------------
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
        if mode == "train":
            step = max(self.state.global_step - 1, 0)  # what the last step used
            logs.update(self._scheduled_values(step))
            for s in self.signals:
                logs.update(s.log_values())
            logs.update(param_groups.group_rates(self.optimizer, self.lr_scheduler, step))
            if self.curriculum is not None:
                logs["teacher_checkpoint"] = self.curriculum.stage(step, self.state.max_steps)
            if self.on_policy is not None:
                logs.update(self.on_policy.log_values())  # on_policy_fraction, generation_seconds
        super().log(logs, start_time)

    def _scheduled_values(self, step: int) -> dict:
        total, out = max(self.state.max_steps, 1), {}
        for s in self.signals:
            if s.weight.varies:
                out[WEIGHT_FIELDS.get(s.name, f"{s.name}_weight")] = round(s.weight.value(step, total), 6)
            temperature = getattr(s, "temperature", None)
            if isinstance(temperature, Schedule) and temperature.varies:
                out["temperature" if s.name == "kd" else f"{s.name}_temperature"] = round(
                    temperature.value(step, total), 6)
        return out

    # ---- the signals' trainable parts: own optimizer groups, averaged across processes, checkpointed ----------
    def _own_groups(self) -> list:
        return [g for s in self.signals for g in s.optimizer_groups()]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        param_groups.split_groups(optimizer, self._own_groups())
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = param_groups.own_schedules(scheduler, optimizer or self.optimizer, self._own_groups(),
                                                       self.args, num_training_steps)
        return self.lr_scheduler

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """data_mode='on_policy': an optimizer step's micro-batches may become the student's own generations
        (hf_kd.data.on_policy), here, before they are counted, so the global token counts are those trained on."""
        batches, counts = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.on_policy is None:
            return batches, counts
        batches = self.on_policy(self.model_wrapped, batches, self.state.global_step)
        return batches, self._get_num_items_in_batch(batches, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._begin_micro_batch(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:  # DDP ignores the signals' parameters: average their grads
            for p in self.signals.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.accelerator.num_processes
        return loss

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and len(self.signals.state_dict()):
            torch.save(self.signals.state_dict(), os.path.join(output_dir, EXTRAS_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, EXTRAS_FILE)):
            state = torch.load(os.path.join(checkpoint, EXTRAS_FILE), map_location=self.accelerator.device)
            self.signals.load_state_dict(state)
        super()._load_optimizer_and_scheduler(checkpoint)

    # ---- reliability: bad input, non-finite losses, interrupts, atomic saves (hf_kd/tools/reliability.py) ---------
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
            with self._teacher_use:
                return super().train(*train_args, **train_kwargs)
        finally:  # also when training raises: never leave our signal handlers installed
            self.interrupt.restore()

    def evaluate(self, *args, **kwargs):
        with self._teacher_use:
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._teacher_use:
            return super().predict(*args, **kwargs)
