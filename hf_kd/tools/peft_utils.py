"""PEFT students: a LoRA (or any PEFT) student trains with DistillationTrainer like any model; this module adds what
is particular to them.

* :class:`SameBaseTeacher`: the teacher is the student's own base model with its adapters disabled (self-distillation
  while fine-tuning, e.g. to stay close to the base): one copy of the base weights in memory, not two.
* :func:`merge_student`: merge the trained adapters into the base and save a plain student folder that
  ``pipeline()`` and ``from_pretrained`` load without peft.
* :func:`qlora_student`: a 4-bit (NF4) base with LoRA adapters, for a CUDA GPU with bitsandbytes.
* :func:`parameter_bytes`: the bytes of the distinct weights a set of models holds (shared storage counted once).

::

    student = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = DistillationTrainer(model=student, teacher_model=SameBaseTeacher(student), args=args, ...)
    trainer.train()
    trainer.save_model("adapter")                        # the adapters only (a PEFT folder)
    merge_student(student, "student", processing_class=tokenizer)   # pipeline("text-generation", model="student")
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..signals.base import EXTRAS  # the signals' module the trainer attaches to the student


def _peft_model(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
        model = model.module
    if not (hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")):
        raise TypeError(f"expected a PEFT model (peft.get_peft_model(base, LoraConfig(...))), got "
                        f"{type(model).__name__}")
    return model


class SameBaseTeacher(nn.Module):
    """The teacher "the student's base, adapters disabled", for ``DistillationTrainer(teacher_model=...)``.

    Its forward runs the PEFT student under ``disable_adapter()`` and in eval mode (no dropout), then restores both;
    the trainer runs it under ``inference_mode`` like any teacher, and the student's own pass (adapters on) comes
    after. The student is held outside the module tree, so this module has no parameters: the trainer's freezing
    (``requires_grad_(False)``), ``eval()`` and device placement of its teacher leave the student alone, and the base
    weights exist once in memory (:func:`parameter_bytes`). It computes in the student's dtype: a ``teacher_dtype``
    other than 'auto' / 'model' is refused.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.__dict__["student"] = _peft_model(student)  # not a submodule, on purpose

    @property
    def config(self):
        return self.get_base_model().config

    def get_base_model(self) -> nn.Module:
        """The transformers model under the adapters (hf_kd.flow.tasks.base_model_of finds it through this)."""
        return self.student.get_base_model()

    def forward(self, *args, **kwargs):
        model, training = self.student, self.student.training
        model.eval()
        try:
            with model.disable_adapter():
                return model(*args, **kwargs)
        finally:
            model.train(training)

    def to(self, *args, **kwargs):
        """Device moves are the student's business (a no-op here); a dtype change would need a second copy."""
        dtype = kwargs.get("dtype") or next((a.dtype if torch.is_tensor(a) else a for a in args
                                              if isinstance(a, torch.dtype) or torch.is_tensor(a)), None)
        if dtype is not None and dtype != self.student.get_base_model().dtype:
            raise ValueError(f"SameBaseTeacher shares the student's weights ({self.student.get_base_model().dtype}): "
                             f"it cannot run in {dtype}; set teacher_dtype='model' (or 'auto')")
        return self


def merge_student(model: nn.Module, output_dir: str | None = None, processing_class=None) -> nn.Module:
    """Merge a trained PEFT student's adapters into its base (``merge_and_unload``) and, with ``output_dir``, save
    the plain model (and ``processing_class``) there. Returns the merged transformers model.

    In place, as peft's ``merge_and_unload``: the PEFT model is consumed (save its adapters first if you want them,
    ``trainer.save_model(dir)``). The signals' parts the trainer attached (projections...) are detached from the
    merged model. A 4-bit (QLoRA) base is refused: merge into the full-precision base instead,
    ``merge_student(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id, dtype=torch.bfloat16),
    adapter_dir), output_dir)``.
    """
    peft_model = _peft_model(model)
    base = peft_model.get_base_model()
    if getattr(base, "is_quantized", False) or getattr(base.config, "quantization_config", None):
        raise ValueError("merge_student: the base is quantized (QLoRA); merging into 4-bit weights rounds the "
                         "adapters away. Load the base in bf16/fp32, PeftModel.from_pretrained(base, adapter_dir), "
                         "and merge that")
    merged = peft_model.merge_and_unload()
    merged._modules.pop(EXTRAS, None)
    merged._keys_to_ignore_on_save = {k for k in (merged._keys_to_ignore_on_save or ())
                                      if not k.startswith(EXTRAS + ".")} or None
    if output_dir is not None:
        merged.save_pretrained(output_dir)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
    return merged


def qlora_student(path_or_id: str, lora_config, compute_dtype: torch.dtype = torch.bfloat16,
                  gradient_checkpointing: bool = False, **from_pretrained_kwargs) -> nn.Module:
    """QLoRA (Dettmers et al. 2023): a causal LM loaded in 4-bit NF4 (double quantisation, ``compute_dtype``
    matmuls) with ``lora_config``'s adapters on top, ready for DistillationTrainer (train with ``bf16=True``).
    Needs a CUDA GPU and bitsandbytes; raises with what is missing otherwise."""
    if not torch.cuda.is_available():
        raise RuntimeError("qlora_student: 4-bit bitsandbytes training needs a CUDA GPU; on this machine use a "
                           "plain LoRA student (peft.get_peft_model on a bf16/fp32 base)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("qlora_student needs bitsandbytes: pip install bitsandbytes")
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(path_or_id, quantization_config=quantization, dtype=compute_dtype,
                                                device_map={"": torch.cuda.current_device()},
                                                **from_pretrained_kwargs)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(base, lora_config)


def parameter_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages ``modules`` hold together: weights shared between them
    (a SameBaseTeacher and its student) are counted once."""
    storages = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
