"""Where the teacher lives in a multi-process run.

``teacher_placement='auto'``: replicated on every process under DDP (``accelerator.prepare_model(teacher,
evaluation_mode=True)``), ZeRO-3-partitioned under DeepSpeed ZeRO-3, and sharded by :func:`shard_teacher` under
FSDP with several processes (accelerate moves an evaluation-mode model to the device but does not shard it: left
to itself, every rank would hold a full teacher); under FSDP on one process it is placed whole. ``'shard'`` shards the teacher with FSDP2 (``torch.distributed.fsdp.fully_shard``)
over all processes whatever the student's strategy (also a DDP student, also on CPU with gloo): each transformer block is one FSDP unit, so a
process holds 1/world of the blocks' weights between passes and gathers one block at a time during the teacher's
forward; the rest (embeddings, final norm, head) is the root unit, gathered for the pass and freed after it
(:func:`free_gathered`). The teacher's outputs are unchanged; its memory per process shrinks by about the world
size, at the cost of an all-gather per block per pass.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .pairs import cast_teacher
from ..flow.layers import find_layers
from ..flow.tasks import base_model_of


def shard_teacher(teacher: nn.Module, device: torch.device, offload: bool = False) -> nn.Module:
    """FSDP2-shard ``teacher`` (frozen, in evaluation mode) over every process of the default process group;
    ``offload``: its shards stay in CPU memory and each block is brought to the accelerator for the pass
    (``CPUOffloadPolicy``), for a teacher that does not fit next to the student."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise ValueError("teacher_placement='shard' / 'offload' shards the teacher over several processes: launch "
                         "with `accelerate launch` / torchrun and 2+ processes, or use teacher_placement='auto'")
    if offload and device.type == "cpu":
        raise ValueError("teacher_placement='offload' keeps the teacher in CPU memory between uses of an "
                         "accelerator; on the CPU the teacher is there already: use 'shard'")
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    if not offload:
        teacher.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    _, blocks = find_layers(base_model_of(teacher))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    return teacher


def free_gathered(teacher: nn.Module) -> None:
    """After a pass of a sharded teacher: free the root unit's gathered parameters (FSDP2 keeps the root's
    parameters after forward, for a backward the teacher never runs)."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(teacher, FSDPModule):
        teacher.reshard()


def local_fraction(model: nn.Module) -> float:
    """The share of ``model``'s parameter elements held by this process (1.0 when nothing is sharded)."""
    from torch.distributed.tensor import DTensor
    params = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return local / max(sum(p.numel() for p in params), 1)


def user_state(model: nn.Module) -> tuple:
    """What hf_kd changes on a teacher while it uses it and gives back after: its mode and parameters' flags."""
    return model.training, [p.requires_grad for p in model.parameters()]


def restore_state(model: nn.Module, state: tuple) -> None:
    training, flags = state
    model.train(training)
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)


def freeze(model: nn.Module) -> nn.Module:
    """Evaluation mode (no dropout) and no gradients: how a teacher runs inside hf_kd."""
    return model.eval().requires_grad_(False)


class TeacherUse:
    """A re-entrant context for the trainer's train / evaluate / predict: the teachers frozen inside it, and the
    objects the user passed given back in their own mode and ``requires_grad`` flags when the outermost call ends
    (also when it raises). Their dtype changes only with an explicit ``teacher_dtype`` (a warning says so)."""

    def __init__(self, teachers: list[nn.Module]):
        self.teachers = teachers
        self.states = [user_state(t) for t in teachers]
        self.depth = 0

    def __enter__(self):
        if self.depth == 0:
            for t in self.teachers:
                freeze(t)
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            for t, state in zip(self.teachers, self.states):
                restore_state(t, state)


def prepare_teacher(teacher: nn.Module, args, accelerator, *, deepspeed: bool, fsdp: bool) -> nn.Module:
    """Freeze the teacher, cast it if ``args.teacher_dtype`` names a dtype (:func:`hf_kd.teachers.pairs.cast_teacher`) and
    place it: FSDP2 shards (``teacher_placement`` 'shard' / 'offload', and under FSDP with several processes), a
    DeepSpeed engine (ZeRO-3 partitions it; other stages run it plain), else the accelerator's evaluation-mode
    placement (replicated; also FSDP on one process, where there is nothing to shard over)."""
    freeze(teacher)
    cast_teacher(teacher, args.teacher_dtype)
    sharded_fsdp = fsdp and accelerator.num_processes > 1  # accelerate does not shard an evaluation-mode model
    if args.teacher_placement != "auto" or sharded_fsdp:
        if deepspeed:
            raise ValueError(f"teacher_placement={args.teacher_placement!r} with DeepSpeed: ZeRO-3 shards the "
                             "teacher itself; use teacher_placement='auto'")
        return shard_teacher(teacher, args.device, args.teacher_placement == "offload")
    if deepspeed:  # GPU only
        import deepspeed as ds_lib
        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        if config.get("zero_optimization", {}).get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}
        teacher, *_ = ds_lib.initialize(model=teacher, config=config)
        return teacher.eval()
    return accelerator.prepare_model(teacher, evaluation_mode=True)
