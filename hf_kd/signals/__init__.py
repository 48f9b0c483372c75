"""Distillation terms as composable signals (see :mod:`hf_kd.signals.base`), and the signals a
DistillationConfig's shorthand fields ask for."""

from __future__ import annotations

import torch
from torch import nn

from ..flow.schedules import Schedule, from_args
from ..flow.tasks import ENCODER
from .attention import AttentionProbs, AttentionTransfer
from .base import Context, Signal
from .cross_tokenizer import CrossTokenizerKD, cross_tokenizer_signals
from .gradients import AdversarialGradient, FeatureGradient, InputGradient
from .hints import Hint
from .hidden import (HiddenStates, SimilarityPreserving, build_projections, check_layer_map, default_layer_map,
                     layer_pairs_for)
from .logits import LogitKD, TaskLoss
from .maps import parse_layer_map, parse_module_pairs
from .mutual import MutualLearning
from .self_distill import SelfDistillation

# log names of the config-built signals' weights (others log "<name>_weight")
WEIGHT_FIELDS = {"task": "alpha_task", "kd": "kd_weight", "hidden": "hidden_weight", "relation": "relation_weight",
                 "mutual": "mutual_weight", "self_distill": "self_distill_weight"}


def from_config(args, task: str, teachers: dict, student, tokenizers: tuple | None = None) -> list[Signal]:
    """The signals of the config's shorthand fields (alpha_task, kd_weight, hidden_weight, relation_weight, ...),
    each with its schedule; a term whose weight is 0 throughout is not built. ``teachers``: {name: model}, empty
    when training from a teacher cache; logit KD reads all of them (a mixture, ``teacher_weights``), the feature
    signals the first. ``tokenizers``: (student's, teacher's), read by ``cross_tokenizer='exact'``."""
    if getattr(args, "cross_tokenizer", None):  # two vocabularies: the task loss and the cross-tokenizer term
        return cross_tokenizer_signals(args, task, tokenizers) + _teacher_free_signals(args, student)
    signals = []
    teacher = next(iter(teachers.values()), None)
    alpha, kd = from_args(args, "alpha_task"), from_args(args, "kd_weight")
    if alpha.peak > 0 and task != ENCODER:
        signals.append(TaskLoss("task", alpha))
    if kd.peak > 0 and task != ENCODER:
        signals.append(LogitKD("kd", kd, kind=args.kd_loss, beta=args.jsd_beta, skew_alpha=args.skew_alpha,
                               temperature=from_args(args, "temperature"), **_mixture_of(args, teachers)))
    hidden = from_args(args, "hidden_weight")
    if (hidden.peak > 0 or args.relation_weight > 0) and teacher is not None:
        pairs = layer_pairs_for(args.layer_pairs, teacher, student)
        if hidden.peak > 0:
            projections = build_projections(pairs, teacher.config, student.config, args.use_projection)
            signals.append(HiddenStates("hidden", hidden, pairs=pairs, loss=args.hidden_loss,
                                        projections=projections))
        if args.relation_weight > 0:
            signals.append(SimilarityPreserving("relation", args.relation_weight, pairs))
    elif hidden.peak > 0 or args.relation_weight > 0:
        where = "a teacher cache or server holds only its top-k output" if args.teacher_cache or args.teacher_url \
            else "no teacher was passed"
        raise ValueError(f"hidden-state and relational losses need the teacher's hidden states ({where}): set "
                         "hidden_weight=0 (and its *_end) and relation_weight=0, or pass teacher_model=")
    signals += _feature_signals(args, teacher, student) + _teacher_free_signals(args, student)
    if args.progressive:
        signals = _progressive(signals)
    return _first_stage(signals, args.hint_first_stage)


def _mixture_of(args, teachers: dict) -> dict:
    """LogitKD's teacher arguments from teacher_weights / teacher_temperatures (several teachers only)."""
    if len(teachers) < 2:
        if args.teacher_weights != "uniform" or args.teacher_temperatures:
            raise ValueError("teacher_weights / teacher_temperatures need several teachers (teacher_model= a list "
                             "or a name -> model mapping)")
        return {}
    weights, mixing = None, args.teacher_weights
    if mixing == "uniform":
        mixing = "fixed"
    elif mixing not in ("learned", "confidence", "entropy"):
        weights, mixing = [float(w) for w in mixing.split(",")], "fixed"
    temperatures = [float(t) for t in args.teacher_temperatures.split(",")] if args.teacher_temperatures else None
    return dict(teachers=list(teachers), mixing=mixing, teacher_weights=weights, teacher_temperatures=temperatures)


def _feature_signals(args, teacher, student) -> list[Signal]:
    out = []
    if args.hint_weight > 0:
        out.append(Hint("hint", args.hint_weight, pairs=parse_module_pairs(args.hint_layers),
                        normalize=args.hint_normalize))
    if args.at_weight > 0:
        out.append(AttentionTransfer("attention_transfer", args.at_weight, pairs=parse_module_pairs(args.at_layers)))
    if args.attention_weight > 0:
        layers = parse_layer_map(args.attention_layers, unique=False) or [
            (t - 1, s - 1) for t, s in layer_pairs_for(args.layer_pairs, teacher, student) if t > 0 and s > 0]
        out.append(AttentionProbs("attention", args.attention_weight, layers=layers, kind=args.attention_loss))
    if args.input_grad_weight > 0:
        out.append(InputGradient("input_gradient", args.input_grad_weight))
    if args.feature_grad_weight > 0:
        out.append(FeatureGradient("feature_gradient", args.feature_grad_weight,
                                   pairs=parse_module_pairs(args.feature_grad_layers)))
    if args.great_weight > 0:
        out.append(AdversarialGradient("great", args.great_weight))
    if out and teacher is None:
        raise ValueError(f"teacher_cache: {', '.join(s.name for s in out)} need the teacher in memory")
    return out


def _per_peer(value: str | None, n: int, cast) -> list:
    values = [cast(v) for v in value.split(",")] if value else [None]
    if len(values) not in (1, n):
        raise ValueError(f"{value!r}: one value or one per peer ({n})")
    return values * n if len(values) == 1 else values


def _teacher_free_signals(args, student) -> list[Signal]:
    """Mutual learning with fresh peers of the student's architecture; self-distillation exits."""
    out = []
    if args.mutual_weight > 0:
        n = args.mutual_peers
        with torch.random.fork_rng():  # peers differ from the student and each other; the caller's RNG untouched
            torch.manual_seed(args.seed + 1)
            peers = [type(student)(student.config) for _ in range(n)]
        rates = _per_peer(args.peer_learning_rate, n, float)
        kinds = _per_peer(args.peer_lr_scheduler_type, n, str)
        optim = [{k: v for k, v in (("learning_rate", r), ("lr_scheduler_type", t)) if v is not None}
                 for r, t in zip(rates, kinds)]
        out.append(MutualLearning("mutual", args.mutual_weight, peers=peers, temperature=args.temperature,
                                  peer_optim=optim))
    if args.self_distill_weight > 0:
        exits = [int(e) for e in args.self_distill_exits.split(",")]
        out.append(SelfDistillation("self_distill", args.self_distill_weight, exits=exits,
                                    temperature=args.temperature))
    return out


def _progressive(signals: list[Signal]) -> list[Signal]:
    """Progressive layer-wise distillation: the layer map's pairs switched on one stage after another (pair i from
    stage i of n + 1), the logit terms in the last stage; each pair a HiddenStates signal of its own."""
    hidden = next((s for s in signals if type(s) is HiddenStates), None)
    if hidden is None:
        raise ValueError("progressive=True needs hidden-state distillation: set hidden_weight > 0")
    if any(s.weight.varies for s in signals):
        raise ValueError("progressive=True sets the weights' schedules itself: drop weight_schedule")
    n = len(hidden.pairs)
    staged = [HiddenStates(f"hidden_{i}", Schedule(0.0, hidden.weight.start, "step", at=i / (n + 1)), pairs=[pair],
                           loss=hidden.loss, projections=nn.ModuleList([proj]), teacher=hidden.teacher)
              for i, (pair, proj) in enumerate(zip(hidden.pairs, hidden.projections))]
    for s in signals:
        if s.logit:
            s.weight = Schedule(0.0, s.weight.start, "step", at=n / (n + 1))
    return [s for s in signals if s is not hidden] + staged


def _first_stage(signals: list[Signal], fraction: float) -> list[Signal]:
    """FitNets' two stages: during the first ``fraction`` of training only the hints train; every other signal
    starts (at its weight) when it ends."""
    if fraction <= 0:
        return signals
    if not any(isinstance(s, Hint) for s in signals):
        raise ValueError("hint_first_stage > 0 needs hints (hint_weight > 0 and hint_layers)")
    for s in signals:
        if not isinstance(s, Hint):
            if s.weight.varies:
                raise ValueError(f"hint_first_stage with a scheduled {s.name!r} weight: use one or the other")
            s.weight = Schedule(0.0, s.weight.start, "step", at=fraction)
    return signals


__all__ = ["Context", "Signal", "TaskLoss", "LogitKD", "HiddenStates", "SimilarityPreserving", "Hint",
           "AttentionTransfer", "AttentionProbs", "InputGradient", "FeatureGradient", "AdversarialGradient",
           "MutualLearning", "SelfDistillation", "CrossTokenizerKD",
           "from_config",
           "default_layer_map", "check_layer_map", "build_projections", "layer_pairs_for", "WEIGHT_FIELDS"]
