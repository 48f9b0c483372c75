"""Per-device memory of a distillation step, estimated from the model configs before launch (``hf-kd estimate-memory``).

Pure arithmetic: parameter counts come from instantiating each config on the meta device (no weights allocated);
everything else from the configs' widths and the run's batch, sequence length, precision, strategy and ``kd_impl``.
Bytes per device at steady state (the optimizer state exists from the first optimizer step on).

Notation: N = batch x seq_len tokens per device and micro-batch; V, V_T the student's and teacher's vocabularies;
H hidden size, Q = heads x head_dim, K = kv_heads x head_dim, I intermediate size, L layers; P_S, P_T parameters;
n processes; c = bytes of the student's activations' compute dtype (4 fp32, 2 under bf16/fp16), t = bytes of the
teacher's weights, c_T = bytes of its compute dtype (2 when its weights or the autocast are 16-bit, else 4) and
l_T = bytes of its logits (4 under autocast: accelerate returns the prepared teacher's outputs in float32; else t).

Components (one row each in :meth:`MemoryEstimate.table`):

- teacher weights    P_T * t; / n when sharded (strategy fsdp, ``teacher_placement`` shard, DeepSpeed zero3);
                     only its gathered blocks when offloaded
- student weights    P_S * 4 (float32 master weights); fsdp: / n; DeepSpeed: P_S * c (/ n under zero3)
- gradients          P_S * 4; / n under fsdp, zero2, zero3 (DeepSpeed: c bytes)
- optimizer state    AdamW: exp_avg + exp_avg_sq, P_S * 8 (float32); fsdp: / n; DeepSpeed: (4 master + 8) * P_S / n
- activations        what the student saves for backward: N * (L * a + 3H * 4), per layer and token
                       fp32:     a = (6H + 2Q + 2K + 4I) * 4
                       autocast: a = 4H * 4 + (5H + 2Q + 2K + 4I) * 2  (norms and the residual stay float32; each
                                 linear casts its input again, so the 5H)
                     plus ``heads * seq_len * c`` per layer for eager attention (its softmax; SDPA/flash keep no
                     seq_len^2 term), K -> Q when the k/v heads are repeated (eager, or SDPA with a padding mask),
                     2I instead of 4I for an MLP without gate. Gradient checkpointing: L * H * 4 + one layer (these
                     two not measured).
                     Constants measured on transformers' Llama with ``torch.autograd.graph.saved_tensors_hooks``
                     (exact for Llama-style blocks; other blocks differ by their own saved tensors).
- autocast copies    bf16/fp16 autocast (single, ddp): the forward caches a 16-bit copy of every matmul weight that
                     needs a gradient: (block params + head) * 2
- logit loss         the [tokens, vocab] buffers of the loss (``hf_kd.engine``), at their forward peak:
                       full:    N*V*4 + N*V_T*l_T + N*V*4*7.25: the reference losses hold float32 log-softmaxes of
                                the task CE, the student and the teacher, p_T, log p_T - log q, zeros_like and the
                                where (7) and a bool mask (0.25) at once; 6.25 without the task term (measured alone:
                                7.24 buffers)
                       chunked: N*V*4 + N*V_T*l_T + N*V*4 (the one stored gradient) + 5 float32 chunks [rows, V]
                       fused:   no logits: N*H_T*c_T (teacher's last hidden) + N*H*4 (dL/dh) + V*H*4 (the head's
                                weight gradient, made in the forward) + 5 float32 chunks [256, V]
- teacher forward    one teacher layer under inference_mode, N * (2H_T + 3I_T) * c_T, then its logits (transient)
- comm buffers       ddp: P_S * 4 (DDP's gradient buckets, gradient_as_bucket_view=False); fsdp / zero3: the gathered
                     root and 2 blocks in the parameter dtype plus one block's unsharded gradient; a sharded teacher:
                     its gathered root and 2 blocks

``total`` is the sum of every component. ``peak`` counts only what coexists: weights + optimizer
state + comm buffers + max(teacher forward, activations + logit loss + autocast copies, activations + logit gradient
+ head gradient, gradients): the Trainer frees gradients after each optimizer step (set_to_none), so they do not
meet the next forward's activations; with gradient accumulation they do and are added to the static part.
Not counted: CUDA context and allocator caching (GPU), DeepSpeed's bucket buffers, data loader workers, the
framework's own code. Checked against real steps on CPU, one process, by ``scripts/memory_estimate_check.py``
(docs/scale_out.md): peak 0.97-0.99 of the live tensors' peak; glibc's RSS peak fell between ``peak`` and ``total``.
The ddp / fsdp / DeepSpeed terms are arithmetic from how those engines hold memory, not measured here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3")
PRECISIONS = ("fp32", "bf16", "fp16")
KD_IMPLS = ("full", "chunked", "fused")
ATTENTIONS = ("sdpa", "eager", "flash")
TEACHER_PLACEMENTS = ("auto", "shard", "offload")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CHUNK_BYTES = 8 << 20  # hf_kd.losses.chunked: automatic chunks of one float32 [rows, V] buffer <= 8 MiB
FUSED_ROWS = 256  # hf_kd.losses.fused.FUSED_CHUNK_ROWS
CHUNK_BUFFERS = 5  # float32 [rows, V] buffers live per chunk (scratch copies, log-softmax, gradient)
FULL_BUFFERS = 7.25  # float32 [N, V] buffers of the reference losses with the task CE at their peak (module doc)
FULL_HELD = 4.0  # of which freed before backward (teacher log-softmax, diff, zeros_like, where): 3.25 are saved
COMPONENTS = ("teacher_weights", "student_weights", "gradients", "optimizer_state", "activations", "autocast_copies",
              "logit_loss", "teacher_forward", "comm_buffers")
LABELS = {"teacher_weights": "teacher weights", "student_weights": "student weights", "gradients": "gradients",
          "optimizer_state": "optimizer state (AdamW)", "activations": "activations (student, saved)",
          "autocast_copies": "autocast weight copies", "logit_loss": "logit loss buffers",
          "teacher_forward": "teacher forward (transient)", "comm_buffers": "comm / gathered buffers"}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate reads from one model: counts from a meta-device instance, widths from its config."""
    params: int  # distinct parameters (tied weights once)
    block_params: int  # the largest transformer block
    root_params: int  # everything outside the blocks (embeddings, final norm, untied head)
    head_params: int  # the LM head's weight (tied or not)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    q_width: int
    kv_width: int
    vocab: int
    gated: bool

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Count a causal LM's parameters by instantiating ``config`` on the meta device."""
        from transformers import AutoModelForCausalLM

        from ..flow.layers import find_layers
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        _, blocks = find_layers(model)
        block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
        head = model.get_output_embeddings()
        names = {n.split(".")[-2] for n, _ in blocks[0].named_parameters() if "." in n}
        hidden = _get(config, "hidden_size", "n_embd", "d_model")
        heads = _get(config, "num_attention_heads", "n_head")
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(params=params, block_params=block, root_params=params - in_blocks,
                   head_params=head.weight.numel() if head is not None else 0, layers=len(blocks), hidden=hidden,
                   intermediate=_get(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
                   heads=heads, q_width=heads * head_dim, kv_width=kv_heads * head_dim,
                   vocab=_get(config, "vocab_size"), gated=any("gate" in n or n in ("w1", "w3") for n in names))


def _get(config, *names, default=None):
    for name in names:
        if getattr(config, name, None):
            return int(getattr(config, name))
    if default is not None:
        return int(default)
    raise ValueError(f"{type(config).__name__} has none of {names}: cannot size {names[0]}")


def student_config(teacher_config, num_layers: int):
    """The config ``make_student(teacher, num_layers=N)`` gives: the teacher's, N layers, widths unchanged."""
    from ..flow.layers import _layer_counts
    from .student import _student_config, select_layers
    counts = [v for v in _layer_counts(teacher_config).values() if isinstance(v, int)]
    if not counts:
        raise ValueError(f"{type(teacher_config).__name__} has no layer count: cannot make a student from it")
    return _student_config(teacher_config, counts[0], select_layers(counts[0], num_layers))


@dataclass(frozen=True)
class Setup:
    """The run: per-device micro-batch and sequence length, precision, strategy, logit-loss implementation."""
    batch: int
    seq_len: int
    precision: str = "fp32"  # student: fp32, or bf16 / fp16 autocast over float32 master weights
    teacher_dtype: str = "float32"  # the teacher's weights (hf_kd's teacher_dtype='auto' = bfloat16 where native)
    strategy: str = "single"
    num_processes: int = 1
    teacher_placement: str = "auto"
    kd_impl: str = "chunked"
    attention: str = "sdpa"
    padded: bool = False  # a padding mask in the batch (SDPA then repeats k/v heads)
    task_loss: bool = True  # the student's own CE next to the KD term
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    chunk_rows: int = 0  # kd_chunk_size; 0 = automatic

    def __post_init__(self):
        for name, allowed in (("precision", PRECISIONS), ("strategy", STRATEGIES), ("kd_impl", KD_IMPLS),
                              ("attention", ATTENTIONS), ("teacher_placement", TEACHER_PLACEMENTS),
                              ("teacher_dtype", tuple(DTYPE_BYTES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("batch", "seq_len", "num_processes", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.chunk_rows < 0:
            raise ValueError(f"chunk_rows must be >= 0 (0 = automatic), got {self.chunk_rows}")
        if self.strategy == "single" and self.num_processes != 1:
            raise ValueError(f"strategy 'single' runs one process, got num_processes={self.num_processes}: "
                             "use ddp, fsdp, zero2 or zero3 for several")
        if self.teacher_placement != "auto" and (self.num_processes == 1 or self.strategy.startswith("zero")):
            raise ValueError(f"teacher_placement={self.teacher_placement!r} needs several processes and no DeepSpeed "
                             "(hf_kd refuses it in one process and under DeepSpeed): use 'auto'")

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32"

    @property
    def teacher_sharded(self) -> bool:
        return self.strategy in ("fsdp", "zero3") or self.teacher_placement != "auto"


@dataclass
class MemoryEstimate:
    """Bytes per device by component, their sum (``total``) and what coexists at the step's peak (``peak``)."""
    components: dict
    total: int
    peak: int
    phases: dict
    setup: dict
    teacher: dict
    student: dict
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A plain-text table, GiB and MiB per component, then the total and the peak."""
        rows = [(LABELS[k], v) for k, v in self.components.items() if v]
        rows += [("total (every component at once)", self.total),
                 ("estimated peak (what coexists)", self.peak)]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'component':<{width}}  {'GiB':>9}  {'MiB':>11}", "-" * (width + 24)]
        for i, (name, value) in enumerate(rows):
            if i == len(rows) - 2:
                lines.append("-" * (width + 24))
            lines.append(f"{name:<{width}}  {value / 2**30:9.3f}  {value / 2**20:11.1f}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def activation_bytes(m: ModelShape, s: Setup) -> int:
    """Bytes the student saves for backward over one micro-batch (module doc)."""
    n = s.batch * s.seq_len
    kv = m.q_width if (s.attention == "eager" or (s.padded and m.kv_width < m.q_width)) else m.kv_width
    mlp = (4 if m.gated else 2) * m.intermediate
    if s.autocast:
        per_layer = 4 * m.hidden * 4 + (5 * m.hidden + 2 * m.q_width + 2 * kv + mlp) * 2
    else:
        per_layer = (6 * m.hidden + 2 * m.q_width + 2 * kv + mlp) * 4
    c = 2 if s.autocast else 4
    if s.attention == "eager":
        per_layer += m.heads * s.seq_len * c
    if s.gradient_checkpointing:
        return n * (m.layers * m.hidden * 4 + per_layer + 3 * m.hidden * 4)
    return n * (m.layers * per_layer + 3 * m.hidden * 4)


def logit_bytes(t: ModelShape | None, m: ModelShape, s: Setup) -> tuple[int, int, int]:
    """(forward peak, held at the start of backward, head gradient made in the forward) of the logit loss."""
    n = s.batch * s.seq_len
    c_t = teacher_out_bytes(s)
    teacher_logits = n * t.vocab * teacher_logit_bytes(s) if t is not None else 0
    if s.kd_impl == "fused":
        rows = min(s.chunk_rows or FUSED_ROWS, n)
        hidden_t = n * t.hidden * c_t if t is not None else 0
        fwd = hidden_t + n * m.hidden * 4 + CHUNK_BUFFERS * rows * m.vocab * 4
        return fwd, n * m.hidden * 4, m.head_params * 4
    if s.kd_impl == "chunked":
        rows = min(s.chunk_rows or max(1, CHUNK_BYTES // (4 * m.vocab)), n)
        return n * m.vocab * 8 + teacher_logits + CHUNK_BUFFERS * rows * m.vocab * 4, n * m.vocab * 4, 0
    k = FULL_BUFFERS - (0 if s.task_loss else 1)
    return int(n * m.vocab * 4 * (1 + k)) + teacher_logits, int(n * m.vocab * 4 * (k - FULL_HELD)), 0


def teacher_out_bytes(s: Setup) -> int:
    """c_T: the teacher's compute dtype."""
    return 2 if s.autocast or DTYPE_BYTES[s.teacher_dtype] == 2 else 4


def teacher_logit_bytes(s: Setup) -> int:
    """l_T: the teacher's logits, float32 under autocast (accelerate's convert_outputs_to_fp32), else its dtype."""
    return 4 if s.autocast else DTYPE_BYTES[s.teacher_dtype]


def estimate(teacher, student, setup: Setup) -> MemoryEstimate:
    """Per-device memory of ``setup`` for ``teacher`` / ``student`` (configs or :class:`ModelShape`; teacher None =
    training from a teacher cache or a served teacher: no teacher in memory)."""
    t = teacher if isinstance(teacher, ModelShape) or teacher is None else ModelShape.from_config(teacher)
    m = student if isinstance(student, ModelShape) else ModelShape.from_config(student)
    s, n_proc = setup, setup.num_processes
    deepspeed, sharded = s.strategy.startswith("zero"), s.strategy in ("fsdp", "zero3")
    c = 2 if s.autocast else 4
    tb, c_t = DTYPE_BYTES[s.teacher_dtype], teacher_out_bytes(s)
    notes = []

    comp = dict.fromkeys(COMPONENTS, 0)
    if deepspeed:
        comp["student_weights"] = m.params * c // (n_proc if s.strategy == "zero3" else 1)
        comp["gradients"] = m.params * c // n_proc
        comp["optimizer_state"] = m.params * 12 // n_proc
        notes.append("DeepSpeed: 16-bit (or fp32) model weights, fp32 master copy + AdamW moments partitioned "
                     "(ZeRO paper's 2 + 2 + 12 bytes per parameter); bucket buffers not counted")
    else:
        comp["student_weights"] = m.params * 4 // (n_proc if sharded else 1)
        comp["gradients"] = m.params * 4 // (n_proc if sharded else 1)
        comp["optimizer_state"] = m.params * 8 // (n_proc if sharded else 1)
    comp["activations"] = activation_bytes(m, s)
    if s.autocast and s.strategy in ("single", "ddp"):
        comp["autocast_copies"] = (m.layers * m.block_params + m.head_params) * 2
    logit_fwd, logit_bwd, head_grad_fwd = logit_bytes(t, m, s)
    comp["logit_loss"] = logit_fwd + head_grad_fwd

    n_tok, gathered_teacher = s.batch * s.seq_len, 0
    if t is not None:
        comp["teacher_weights"] = t.params * tb // (n_proc if s.teacher_sharded else 1)
        comp["teacher_forward"] = n_tok * (2 * t.hidden + 3 * t.intermediate) * c_t
        if s.teacher_sharded:
            gathered_teacher = (t.root_params + 2 * t.block_params) * tb
        if s.teacher_placement == "offload":
            comp["teacher_weights"] = 0
            notes.append(f"teacher shards held in host memory: {t.params * tb / n_proc / 2**30:.2f} GiB per process")
    if s.strategy == "ddp":
        comp["comm_buffers"] = m.params * 4
    elif sharded:  # gathered root + 2 blocks (current and prefetched) + one block's unsharded gradient
        comp["comm_buffers"] = (m.root_params + 2 * m.block_params) * c + m.block_params * 4
    comp["comm_buffers"] += gathered_teacher

    grads, accumulating = comp["gradients"], s.grad_accum > 1
    head_grad = m.head_params * 4 // (n_proc if (sharded or deepspeed) else 1)
    teacher_logits = n_tok * t.vocab * teacher_logit_bytes(s) if t is not None and s.kd_impl != "fused" else 0
    phases = {"teacher_forward": comp["teacher_forward"] + teacher_logits,
              "forward": comp["activations"] + comp["logit_loss"] + comp["autocast_copies"]
              - (head_grad_fwd if accumulating else 0),
              "backward": comp["activations"] + logit_bwd + (0 if accumulating else head_grad),
              "optimizer": 0 if accumulating else grads}
    static = comp["teacher_weights"] + comp["student_weights"] + comp["optimizer_state"] + comp["comm_buffers"]
    static += grads if accumulating else 0  # gradients live across the micro-batches
    peak = static + max(phases.values())
    if s.kd_impl == "fused":
        notes.append("fused: the logit loss row holds the LM head's weight gradient (made during the forward)")
    if t is None:
        notes.append("no teacher in memory (teacher cache / served teacher): the logit loss reads top-k targets")
    notes.append("per device, steady state; peak = the tensors that coexist, allocator slack comes on top (CPU/glibc, "
                 "measured: between peak and total, docs/scale_out.md); not counted: CUDA context, data loader workers")
    return MemoryEstimate(components=comp, total=sum(comp.values()), peak=peak, phases=phases,
                          setup=asdict(s), teacher=asdict(t) if t is not None else {}, student=asdict(m), notes=notes)
