"""Optimizer groups of their own for parts of the model that train by other rules (e.g. the peers of mutual
learning, each with its own learning rate, weight decay and learning-rate schedule).

A signal asks for them through ``Signal.optimizer_groups()``: a list of :class:`OwnGroup`. After the Trainer has
built its optimizer, :func:`split_groups` moves those parameters out of the Trainer's groups into groups of their
own (keeping the Trainer's decay / no-decay split); :func:`own_schedules` then gives each such group its own
learning-rate schedule in the one ``LambdaLR`` the Trainer steps, checkpoints and resumes. AdamW-style
optimizers keep per-parameter state, so a group with its own settings trains exactly as a separate optimizer of
the same kind would; gradient clipping stays global (one norm over all parameters, as the Trainer clips).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_scheduler


@dataclass
class OwnGroup:
    """Parameters trained with their own settings; None = the Trainer's (TrainingArguments) value."""

    name: str
    params: list[nn.Parameter]
    learning_rate: float | None = None
    weight_decay: float | None = None
    lr_scheduler_type: str | None = None
    warmup_steps: int | None = None


def split_groups(optimizer: torch.optim.Optimizer, own: list[OwnGroup]) -> None:
    """Move each OwnGroup's parameters into new param groups (one per Trainer group they were in: decay and
    no-decay stay apart), with the group's learning rate and, where the Trainer group decays, its weight decay."""
    for group in own:
        ids = {id(p) for p in group.params}
        for old in list(optimizer.param_groups):
            if old.get("hf_kd_group") is not None:
                continue
            mine = [p for p in old["params"] if id(p) in ids]
            if not mine:
                continue
            old["params"] = [p for p in old["params"] if id(p) not in ids]
            new = {k: v for k, v in old.items() if k != "params"}
            if group.learning_rate is not None:
                new["lr"] = group.learning_rate
            if group.weight_decay is not None and old.get("weight_decay", 0.0) > 0:
                new["weight_decay"] = group.weight_decay
            new["hf_kd_group"] = group.name
            optimizer.add_param_group({**new, "params": mine})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


def own_schedules(scheduler, optimizer: torch.optim.Optimizer, own: list[OwnGroup], args,
                  num_training_steps: int):
    """The Trainer's scheduler, or (when a group sets its own schedule) one LambdaLR with a lambda per group: the
    Trainer's for its own groups, ``get_scheduler(type, warmup)``'s for the others."""
    settings = {g.name: g for g in own if g.lr_scheduler_type is not None or g.warmup_steps is not None}
    if not settings or getattr(scheduler, "hf_kd_own", False):
        return scheduler
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or len(set(map(id, scheduler.lr_lambdas))) > 1:
        raise ValueError(f"per-group learning-rate schedules need a LambdaLR schedule for the rest of the model "
                         f"(lr_scheduler_type {args.lr_scheduler_type!r} is not one)")
    default = scheduler.lr_lambdas[0]
    lambdas = []
    for group in optimizer.param_groups:
        g = settings.get(group.get("hf_kd_group"))
        if g is None:
            lambdas.append(default)
            continue
        warmup = args.get_warmup_steps(num_training_steps) if g.warmup_steps is None else g.warmup_steps
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        own_sched = get_scheduler(g.lr_scheduler_type or args.lr_scheduler_type, dummy, num_warmup_steps=warmup,
                                  num_training_steps=num_training_steps)
        if not isinstance(own_sched, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(f"group {g.name!r}: lr_scheduler_type {g.lr_scheduler_type!r} is not a LambdaLR schedule")
        lambdas.append(own_sched.lr_lambdas[0])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    scheduler.hf_kd_own = True
    return scheduler


def group_rates(optimizer, scheduler, step: int) -> dict:
    """{'learning_rate_<name>': the rate the named groups used at optimizer step ``step`` (0-based; the first
    group of each name), for the logs beside the Trainer's ``learning_rate``."""
    out = {}
    lambdas = getattr(scheduler, "lr_lambdas", None)
    for i, group in enumerate(getattr(optimizer, "param_groups", [])):
        name = group.get("hf_kd_group")
        if name is not None and f"learning_rate_{name}" not in out:
            rate = group["initial_lr"] * lambdas[i](step) if lambdas and "initial_lr" in group else group["lr"]
            out[f"learning_rate_{name}"] = rate
    return out
