"""Deep mutual learning (Zhang et al. 2018): models that teach each other while they all train, no pre-trained
teacher needed.

The trainer's model and each peer learn their own task loss plus T^2 * KL(other's detached prediction || own), at
temperature T, over the KD positions; with several peers each model learns from the mean of the others' KLs. The
peers are this signal's trainable parts: they share the trainer's optimizer and learning-rate schedule, and are
clipped, checkpointed and resumed with the student; :meth:`MutualLearning.save_peers` writes each as its own model
folder. The signal's weight scales the peers' whole objective (their task losses and KLs) and the student's KL.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..flow.align import predicting, task_loss_sum
from ..flow.capture import Needs
from ..losses import forward_kl
from .groups import OwnGroup
from ..flow.tasks import base_model_of, task_of
from .base import Context, Signal


class MutualLearning(Signal):
    normalizer = "kd"
    teacher_free = True  # no teacher: the models teach each other

    def __init__(self, name="mutual", weight=1.0, *, peers: list[nn.Module], temperature: float = 1.0,
                 peer_optim: list[dict] | None = None):
        super().__init__(name, weight)
        if not peers:
            raise ValueError("mutual learning needs at least one peer model")
        if peer_optim is not None and len(peer_optim) != len(peers):
            raise ValueError(f"peer_optim: one settings dict per peer ({len(peers)}), got {len(peer_optim)}")
        self.peers = nn.ModuleList(peers)
        self.temperature = float(temperature)
        self.peer_optim = [dict(o) for o in peer_optim] if peer_optim else [{} for _ in peers]
        for i, settings in enumerate(self.peer_optim):
            OwnGroup(f"peer_{i}", [], **settings)  # unknown keys fail here, not when training starts

    def optimizer_groups(self) -> list[OwnGroup]:
        return [OwnGroup(f"peer_{i}", list(peer.parameters()), **settings)
                for i, (peer, settings) in enumerate(zip(self.peers, self.peer_optim)) if settings]

    def needs(self, side: str) -> Needs:
        return Needs(logits=side == "student")

    def check(self, teacher, student) -> None:
        for peer in self.peers:
            if task_of(peer) != task_of(student):
                raise ValueError(f"peer {type(peer).__name__} is not a {task_of(student)} model like the student")

    def _kl(self, ctx: Context, learner, target) -> torch.Tensor:
        s, t = predicting(learner, ctx.task), predicting(target.detach(), ctx.task)
        width = min(s.shape[-1], t.shape[-1])
        return forward_kl(s[..., :width], t[..., :width], temperature=self.temperature, mask=ctx.masks["kd"],
                          reduction="sum")

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        models = [ctx.student.logits] + [peer(**ctx.inputs, **_no_cache(peer)).logits for peer in self.peers]
        counts = ctx.extra["counts"]
        total = 0.0
        for i, logits in enumerate(models):
            others = [m for j, m in enumerate(models) if j != i]
            total = total + sum(self._kl(ctx, logits, o) for o in others) / len(others)
            if i > 0 and ctx.labels is not None:  # the peer's own task loss (the student's is the task signal's)
                peer = base_model_of(self.peers[i - 1])
                task = task_loss_sum(logits, ctx.labels, ctx.task, peer.config) / counts["task"]
                total = total + task * counts["kd"]  # the trainer divides this signal by the KD count
        return total

    def save_peers(self, output_dir: str) -> list[str]:
        """Each peer saved as its own model folder (output_dir/peer_<i>); returns the folders."""
        folders = []
        for i, peer in enumerate(self.peers):
            folder = os.path.join(output_dir, f"peer_{i}")
            base_model_of(peer).save_pretrained(folder)
            folders.append(folder)
        return folders


    def ranked(self, student: nn.Module, score) -> list[tuple[str, float]]:
        """[(name, score(model))] for the student and each peer ('student', 'peer_0', ...), best (highest) first."""
        models = {"student": student, **{f"peer_{i}": p for i, p in enumerate(self.peers)}}
        return sorted(((name, float(score(m))) for name, m in models.items()), key=lambda x: -x[1])


def _no_cache(model) -> dict:
    return {"use_cache": False} if getattr(base_model_of(model).config, "use_cache", None) is not None else {}
