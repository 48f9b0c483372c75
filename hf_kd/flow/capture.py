"""Model glue: one forward pass of a model that keeps exactly what the signals asked for.

A signal declares its :class:`Needs` (logits, hidden states by index, outputs of named modules through
forward hooks, attention probabilities, the gradient of the task loss w.r.t. the input); :func:`run` makes
one forward pass and returns a :class:`Captured`. The teacher's pass runs under ``inference_mode`` (unless an
input gradient is needed) and only the tensors asked for are kept, copied out of inference mode.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .align import task_loss_sum
from .tasks import CAUSAL_LM, CLASSIFICATION, as_model_dtype, base_model_of

Tensor = torch.Tensor


@dataclass
class Needs:
    """What one side (teacher or student) must capture for the signals."""

    logits: bool = False
    last_hidden: bool = False  # the LM head's input (fused logit losses), without computing logits
    hidden: set = field(default_factory=set)  # hidden-state indices (0 = embeddings output)
    modules: set = field(default_factory=set)  # dotted module names inside the base model
    attentions: set = field(default_factory=set)  # layer indices whose attention probabilities are kept
    input_grad: bool = False  # d(task loss)/d(input embeddings or pixels)
    module_grads: set = field(default_factory=set)  # d(task loss)/d(output of these named modules)

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.logits or other.logits, self.last_hidden or other.last_hidden, self.hidden | other.hidden,
                     self.modules | other.modules, self.attentions | other.attentions,
                     self.input_grad or other.input_grad, self.module_grads | other.module_grads)

    @property
    def grads(self) -> bool:
        """Whether the pass must take gradients of the task loss (a grad-enabled pass, labels needed)."""
        return self.input_grad or bool(self.module_grads)

    def any(self) -> bool:
        return bool(self.logits or self.last_hidden or self.hidden or self.modules or self.attentions or self.grads)


@dataclass
class Captured:
    """One model's outputs for one batch: what its Needs asked for (absent entries are None / empty)."""

    outputs: object = None  # the model's own output object (the student's is returned by compute_loss)
    logits: Tensor | None = None
    last_hidden: Tensor | None = None
    hidden: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)
    attentions: dict = field(default_factory=dict)
    input_grad: Tensor | None = None
    module_grads: dict = field(default_factory=dict)


# ---- named modules ---------------------------------------------------------------------------------------

def find_module(model: nn.Module, name: str) -> nn.Module:
    """``name`` (dotted path, e.g. 'resnet.encoder.stages.2') inside the model under any wrapper."""
    core = base_model_of(model)
    try:
        return core.get_submodule(name)
    except AttributeError:
        near = [n for n, _ in core.named_modules() if n and n.split(".")[-1] == name.split(".")[-1]][:5]
        raise ValueError(f"{type(core).__name__} has no module {name!r}" + (f"; similar: {near}" if near else
                         "; list them with [n for n, _ in model.named_modules()]")) from None


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    raise TypeError(f"cannot take a tensor from a module output of type {type(out).__name__}")


def _replace_first(out, x):
    if isinstance(out, Tensor):
        return x
    if isinstance(out, tuple):
        return (x, *out[1:])
    out[0] = x  # a ModelOutput
    return out


class ModuleHooks:
    """Forward hooks that record the (first tensor) output of named modules while active. For the names in
    ``leaves`` the output is replaced by a detached copy that requires grad, so the loss can be differentiated
    w.r.t. it even in a model whose parameters are frozen (the teacher)."""

    def __init__(self, model: nn.Module, names, leaves=()):
        self.modules = {name: find_module(model, name) for name in sorted(set(names) | set(leaves))}
        self.leaves, self.out, self.handles = set(leaves), {}, []

    def _hook(self, name):
        def hook(_module, _args, out):
            x = _first_tensor(out)
            if name in self.leaves:
                x = x.detach().requires_grad_(True)
                out = _replace_first(out, x)
            self.out[name] = x
            return out
        return hook

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self.out

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ---- LM heads and the fused path -----------------------------------------------------------------------

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lm_head_of(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, D], bias or None) of a causal LM's output layer, which must be a plain nn.Linear."""
    head = base_model_of(model).get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"kd_impl='fused' needs the LM head to be a plain nn.Linear, {type(model).__name__} has "
                         f"{type(head).__name__} (e.g. a PEFT-wrapped head): use kd_impl='chunked'")
    return head.weight, head.bias


def _check_logits_from_hidden(core: nn.Module, inputs: dict) -> None:
    """Once per model: logits == head(last_hidden_state) on a few tokens (no softcap / logit scaling...)."""
    if core in _CHECKED or inputs.get("input_ids") is None:
        return
    small = {k: inputs[k][:1, :8] for k in ("input_ids", "attention_mask") if inputs.get(k) is not None}
    extra = {"use_cache": False} if getattr(core.config, "use_cache", None) is not None else {}
    weight, bias = lm_head_of(core)
    training = core.training
    core.eval()
    try:
        with torch.no_grad():
            reference = core(**small, **extra).logits.float()
            mine = F.linear(core.base_model(**small, **extra)[0], weight, bias).float()
    finally:
        core.train(training)
    # 3% of the largest logit: loose enough for bf16 weights or a forward that accelerate runs under autocast
    # (the base model is then called outside it), tight enough to catch soft-capping and logit scales
    tol = 3e-2
    if mine.shape != reference.shape or not torch.allclose(mine, reference, rtol=tol,
                                                           atol=tol * float(reference.abs().max()) + 1e-6):
        raise ValueError(f"{type(core).__name__} does not compute logits as lm_head(base_model(...).last_hidden_state)"
                         " (logit soft-capping or scaling?): kd_impl='fused' would be wrong; use 'chunked'")
    _CHECKED[core] = True


def resolve_kd_impl(kd_impl: str, task: str) -> str:
    """'full', 'chunked' or 'fused' for DistillationConfig.kd_impl: 'auto' = chunked except for classifiers."""
    if kd_impl == "auto":
        return "full" if task == CLASSIFICATION else "chunked"
    if kd_impl == "fused" and task != CAUSAL_LM:
        raise ValueError(f"kd_impl='fused' computes logits from a causal LM's last hidden states; this is a {task} "
                         "model: use kd_impl='chunked' or 'auto'")
    if kd_impl not in ("full", "chunked", "fused"):
        raise ValueError(f"kd_impl must be 'auto', 'full', 'chunked' or 'fused', got {kd_impl!r}")
    return kd_impl


def forward_hidden(model: nn.Module, inputs: dict, check: bool = True, **kwargs):
    """Run a causal LM (through any DDP / PEFT wrapper) without computing logits.

    Returns (outputs, last_hidden [B, T, D]): outputs as ``model(**inputs, **kwargs)`` would give them but
    with logits for no position (``logits_to_keep`` = no index), and the LM head's input captured by a
    hook on the base model (``model.base_model``, e.g. ``LlamaModel``, whose output is already final-normed).
    ``check``: verify once per model that its logits are lm_head(last hidden state).
    """
    core = base_model_of(model)
    body = core.base_model
    if body is core or core.get_output_embeddings() is None:
        raise ValueError("kd_impl='fused' needs a causal LM with a base model and an LM head; "
                         f"got {type(core).__name__}")
    if check:
        _check_logits_from_hidden(core, inputs)
    captured = []
    handle = body.register_forward_hook(lambda _module, _args, out: captured.append(out[0]))
    try:
        if "logits_to_keep" in inspect.signature(core.forward).parameters:
            device = next(iter(v for v in inputs.values() if isinstance(v, Tensor))).device
            outputs = model(**inputs, **kwargs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
        else:
            warnings.warn(f"{type(core).__name__}.forward has no logits_to_keep: its full logits are still "
                          "computed (then dropped)", stacklevel=2)
            outputs = model(**inputs, **kwargs)
            outputs.logits = None
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{type(core).__name__}.forward did not call its base model {type(body).__name__}: "
                         "kd_impl='fused' cannot find the LM head's input; use 'chunked'")
    return outputs, captured[-1]


# ---- one pass ----------------------------------------------------------------------------------------------

def use_eager_attention(model: nn.Module) -> None:
    """Attention probabilities are not returned by SDPA / flash kernels: switch the model to eager attention."""
    core = base_model_of(model)
    if getattr(core.config, "_attn_implementation", "eager") == "eager":
        return
    if hasattr(core, "set_attn_implementation"):
        core.set_attn_implementation("eager")
    else:
        core.config._attn_implementation = "eager"


def _input_leaf(model: nn.Module, inputs: dict, teacher: bool) -> tuple[dict, Tensor]:
    """``inputs`` with the input as a tensor the task loss can be differentiated against: pixel values, or
    the token embeddings (passed as inputs_embeds). The teacher's is a detached leaf; the student's stays in
    its graph (its gradient reaches the embedding table)."""
    if inputs.get("pixel_values") is not None:
        x = inputs["pixel_values"].detach().clone().requires_grad_(True)
        return {**inputs, "pixel_values": x}, x
    ids = inputs.get("input_ids")
    if ids is None:
        raise ValueError("input-gradient signals need input_ids or pixel_values in the batch")
    x = base_model_of(model).get_input_embeddings()(ids)
    x = x.detach().requires_grad_(True) if teacher else x
    return {**{k: v for k, v in inputs.items() if k != "input_ids"}, "inputs_embeds": x}, x


def _forward(model, inputs: dict, needs: Needs, task: str, fused: bool, check: bool):
    kwargs = {}
    if needs.hidden:
        kwargs["output_hidden_states"] = True
    if needs.attentions:
        kwargs["output_attentions"] = True
    if getattr(base_model_of(model).config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    if task == CAUSAL_LM and not needs.logits and not needs.grads:  # no [B, T, V] logits at all
        return forward_hidden(model, inputs, check=check, **kwargs)
    return model(**inputs, **kwargs), None


def run(model: nn.Module, inputs: dict, needs: Needs, task: str, *, teacher: bool, fused: bool = False,
        labels: Tensor | None = None) -> Captured:
    """One forward pass of ``model`` on ``inputs`` (no labels) keeping what ``needs`` asks for.

    Teacher: under inference_mode, every kept tensor copied out (they may then be saved for backward); with
    gradients of the task loss (w.r.t. the input or module outputs), a grad-enabled pass whose graph is dropped once
    they are taken. The student's gradients keep their graph (create_graph: a double backward).
    """
    if needs.grads and labels is None:
        raise ValueError("gradient signals take the gradient of the task loss: the batch needs labels")
    inputs, leaf = as_model_dtype(model, inputs), None
    # the teacher: inference mode unless gradients are taken; the student: as the caller has it (no_grad in
    # evaluation), but gradients of the task loss need a graph even there
    grad_mode = torch.enable_grad() if needs.grads else torch.inference_mode() if teacher else contextlib.nullcontext()
    # the teacher's module outputs become leaves (its weights are frozen, so nothing else would require grad), unless
    # the input is a leaf too: then they are in the input's graph already, and detaching them would cut it
    leaves = needs.module_grads if teacher and not needs.input_grad else ()
    with grad_mode, ModuleHooks(model, needs.modules | needs.module_grads, leaves) as module_out:
        if needs.input_grad:
            inputs, leaf = _input_leaf(model, inputs, teacher)
        outputs, last_hidden = _forward(model, inputs, needs, task, fused, check=fused)
    got = Captured(outputs=outputs, last_hidden=last_hidden, modules=dict(module_out))
    got.logits = getattr(outputs, "logits", None)
    states = getattr(outputs, "hidden_states", None)
    got.hidden = {i: states[i] for i in needs.hidden} if states is not None else {}
    attentions = getattr(outputs, "attentions", None)
    got.attentions = {i: attentions[i] for i in needs.attentions} if attentions is not None else {}
    if needs.grads:
        with torch.enable_grad():
            _task_loss_grads(model, got, needs, task, labels, leaf, teacher)
    if teacher:
        _keep_only(got, needs)
    return got


def _task_loss_grads(model, got: Captured, needs: Needs, task: str, labels, leaf, teacher: bool) -> None:
    """d(task loss on the labels)/d(input) and /d(named module outputs), into ``got``."""
    loss = task_loss_sum(got.logits, labels, task, base_model_of(model).config)
    names = sorted(needs.module_grads)
    wrt = ([leaf] if needs.input_grad else []) + [got.modules[n] for n in names]
    grads = torch.autograd.grad(loss, wrt, create_graph=not teacher)
    if needs.input_grad:
        got.input_grad, grads = grads[0], grads[1:]
    got.module_grads = dict(zip(names, grads))


def _keep_only(got: Captured, needs: Needs) -> None:
    """Teacher: drop what no signal reads, and copy the rest out of inference mode / the autograd graph."""
    def own(x):
        return None if x is None else x.detach().clone()
    got.outputs = None
    # logits and the last hidden state are only read by gradient-free code or as constants: detached, no copy
    got.logits = got.logits.detach() if needs.logits and got.logits is not None else None
    got.last_hidden = got.last_hidden.detach() if needs.last_hidden and got.last_hidden is not None else None
    got.hidden = {i: own(h) for i, h in got.hidden.items()}
    got.modules = {k: own(v) for k, v in got.modules.items() if k in needs.modules}
    got.attentions = {i: own(a) for i, a in got.attentions.items()}
    got.input_grad = own(got.input_grad)
    got.module_grads = {k: own(v) for k, v in got.module_grads.items()}


def dummy_inputs(model: nn.Module) -> dict:
    """A one-example input for shape probes: pixels for vision models, a few token ids otherwise."""
    config = base_model_of(model).config
    param = next(base_model_of(model).parameters())  # a wrapper may hold none (SameBaseTeacher)
    if getattr(base_model_of(model), "main_input_name", "input_ids") == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (tuple, list)) else size
        return {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), size, size, device=param.device,
                                            dtype=param.dtype)}
    return {"input_ids": torch.ones(1, 4, dtype=torch.long, device=param.device)}


@torch.no_grad()
def probe_shapes(model: nn.Module, names) -> dict[str, tuple]:
    """The output shapes of the named modules on a dummy input (to size adapters before training starts)."""
    training = model.training
    model.eval()
    try:
        with ModuleHooks(model, names) as out:
            extra = {"use_cache": False} if getattr(base_model_of(model).config, "use_cache", None) is not None else {}
            model(**dummy_inputs(model), **extra)
    finally:
        model.train(training)
    return {k: tuple(v.shape) for k, v in out.items()}
