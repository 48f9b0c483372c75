"""An int8 dynamically quantised copy of a teacher, for CPUs that do not compute bf16 natively.

A teacher only runs forward passes, so its ``nn.Linear`` layers can hold int8 weights: torch's dynamic quantisation
(``torch.ao.quantization.quantize_dynamic``) stores each weight matrix as int8 with a scale per output row and, at
every call, quantises the incoming activations to 8 bits (7 on x86) on the fly (their range is measured per call: no
calibration data is needed) and multiplies with int8 kernels (fbgemm / oneDNN). Everything else stays float32:
embeddings, norms, convolutions (a ViT's patch embedding), attention's softmax.

Check the copy against the float teacher before distilling from it: one scale per activation tensor (x86 kernels
use 7 bits: ``reduce_range``) cannot resolve inputs whose largest values are thousands of times their mean. Small
encoders (tiny BERT / ViT in the tests) stay within a mean token KL of 1e-3 of the float model, but decoder LMs
with outlier activations do not: on SmolLM2-135M (inputs to ``mlp.down_proj`` reach 20,000x their mean) the int8
copy's mean token KL to the float teacher on 32 held-out tales blocks is 1.55 nats at T=1, its top-1 agreement 0.32
and its perplexity 334 against 91; keeping the LM head float32 gives 1.46 nats, every ``down_proj`` float32 about
0.3 (``scripts/teacher_int8.py``, results/teacher_int8.json). For such a
model keep the float32 teacher, or bf16 where the CPU computes it natively (KL 1.1e-3 here).

The quantised modules run on the CPU only. torch marks ``torch.ao.quantization`` deprecated in favour of the
separate ``torchao`` package; the API still works in torch 2.13 and its warnings are silenced inside the call.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

_QUANTISED = "DynamicQuantizedLinear"


def _qconfig(per_channel: bool):
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig
    return per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig


def _check_cpu(model: nn.Module) -> None:
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if devices - {"cpu"}:
        raise ValueError(f"quantize_teacher needs a model on the CPU (found {sorted(devices)}): int8 dynamic "
                         "quantisation has CPU kernels only; on a GPU use teacher_dtype='bfloat16' instead")


def _check_names(model: nn.Module, keep_float: tuple[str, ...]) -> None:
    names = dict(model.named_modules())
    bad = [n for n in keep_float if n not in names]
    if bad:
        raise ValueError(f"keep_float names {bad} are not modules of the model; use names from "
                         "model.named_modules(), e.g. 'lm_head'")


def quantize_teacher(model: nn.Module, *, keep_float: Iterable[str] = (), per_channel: bool = True) -> nn.Module:
    """A NEW module: a deep copy of ``model`` whose ``nn.Linear`` layers hold int8 weights (dynamic quantisation).

    ``model`` itself is left unchanged (its weights, dtype and mode). The copy is put in float32 first (a bf16 or
    fp16 model's copy is upcast: the int8 kernels take float32 activations), set to evaluation mode, and every
    ``nn.Linear`` is replaced by torch's dynamically quantised Linear: attention projections, MLPs, classifier
    heads and the LM head. An LM head tied to the input embeddings is quantised too (the copy's head gets its own
    int8 weights; the embedding table stays float32). ``keep_float`` names modules (as in ``named_modules()``,
    e.g. ``("lm_head",)``) to leave in float32, a whole subtree for a parent's name; ``per_channel`` (default)
    gives each output row its own scale (a little more accurate than one scale per matrix on the tests' tiny models).

    Use the result as ``DistillationTrainer(teacher_model=quantize_teacher(teacher), ...)`` with ``use_cpu=True``
    and ``teacher_dtype`` 'auto' or 'model' (an explicit dtype would cast it). The trainer's ``.to('cpu')``,
    ``.eval()`` and ``.requires_grad_(False)`` leave the int8 layers intact; it is a teacher for forward passes,
    not a model to train or to save with ``save_pretrained``. Signals that need gradients through the teacher
    (input-gradient signals) do not work with it.
    """
    from torch.ao.quantization import quantize_dynamic
    _check_cpu(model)
    keep_float = tuple(keep_float)
    _check_names(model, keep_float)
    copied = copy.deepcopy(model).float().eval()
    spec = {nn.Linear: _qconfig(per_channel), **{name: None for name in keep_float}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated.*")
        quantised = quantize_dynamic(copied, spec, dtype=torch.qint8, inplace=True)
    if not quantised_linear_names(quantised):
        raise ValueError("quantize_teacher found no nn.Linear layer to quantise (outside keep_float): the copy "
                         "would be the float model")
    return quantised


def quantised_linear_names(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that are int8 dynamically quantised Linear layers."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    return [name for name, m in model.named_modules() if isinstance(m, DynamicLinear)]


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights by kind: ``int8`` (packed quantised Linear weights, one byte each, scales not counted)
    and ``float`` (every remaining parameter; a tied tensor counted once)."""
    int8 = 0
    for name in quantised_linear_names(model):
        w = model.get_submodule(name).weight()
        int8 += w.numel() * w.element_size()
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return {"int8": int8, "float": sum(seen.values())}
