"""Estimate the per-device memory of a distillation run before launching it (``hf-kd estimate-memory``).

    hf-kd estimate-memory --teacher smollm2 --student_layers 15 --batch 8 --seq_len 256
    hf-kd estimate-memory --teacher meta-llama/Llama-3.1-8B --student ./my-student --batch 4 --seq_len 2048 \\
        --precision bf16 --teacher_dtype bfloat16 --strategy fsdp --num_processes 8 --kd_impl fused --json

Teacher and student: 'smollm2' (the packaged SmolLM2-135M), a folder or a Hub id (only the config is read; the
models are instantiated on the meta device, no weights are loaded); ``--student_layers N`` instead of
``--student`` = ``make_student(teacher, num_layers=N)`` (same widths, N layers). Prints teacher and student
weights, gradients, AdamW state, the student's saved activations, the logit loss's buffers, the teacher's
forward, communication buffers, their sum and the estimated peak (what coexists), per device; ``--json`` prints
the same as JSON. The formulas and what is not counted: :mod:`hf_kd.tools.memory`; the measured error:
docs/scale_out.md ("Estimate memory before launch").
"""

from __future__ import annotations

import argparse

from hf_kd.tools.memory import ATTENTIONS, DTYPE_BYTES, KD_IMPLS, PRECISIONS, STRATEGIES, TEACHER_PLACEMENTS, Setup, \
    estimate, student_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-kd estimate-memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="'smollm2', a folder or a Hub id of a causal LM (config only).")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--student", help="The student: a folder or a Hub id (config only).")
    who.add_argument("--student_layers", type=int, help="The student = make_student(teacher, num_layers=N).")
    p.add_argument("--batch", type=int, default=8, help="Per-device micro-batch (per_device_train_batch_size).")
    p.add_argument("--seq_len", type=int, default=256, help="Tokens per sequence.")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="Student: fp32, or bf16/fp16 autocast over float32 master weights (--bf16 / --fp16).")
    p.add_argument("--teacher_dtype", default="float32", choices=list(DTYPE_BYTES),
                   help="The teacher's weights (hf_kd's teacher_dtype='auto' is bfloat16 on bf16-native hardware).")
    p.add_argument("--strategy", default="single", choices=STRATEGIES,
                   help="single process, ddp, fsdp (FSDP2 full shard), zero2 / zero3 (DeepSpeed).")
    p.add_argument("--num_processes", type=int, default=1, help="Processes (devices) the run is spread over.")
    p.add_argument("--teacher_placement", default="auto", choices=TEACHER_PLACEMENTS,
                   help="As DistillationConfig.teacher_placement: shard = FSDP2-shard the teacher over the processes.")
    p.add_argument("--kd_impl", default="chunked", choices=KD_IMPLS, help="Logit-loss implementation (auto = chunked).")
    p.add_argument("--kd_chunk_size", type=int, default=0, help="Rows per chunk (0 = automatic, as the trainer).")
    p.add_argument("--attention", default="sdpa", choices=ATTENTIONS, help="Attention implementation.")
    p.add_argument("--padded", action="store_true", help="Batches carry a padding mask (SDPA repeats k/v heads).")
    p.add_argument("--no_task_loss", action="store_true", help="alpha_task = 0 (no student cross-entropy).")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="> 1: gradients live across steps.")
    p.add_argument("--gradient_checkpointing", action="store_true", help="Checkpoint the student's blocks.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of the table.")
    return p


def load_config(name: str):
    """The config of 'smollm2' (packaged), a folder or a Hub id."""
    from transformers import AutoConfig
    if name == "smollm2":
        from hf_kd.tools.assets import smollm2_path
        name = str(smollm2_path())
    return AutoConfig.from_pretrained(name)


def main(argv: list[str] | None = None):
    p = parser()
    args = p.parse_args(argv)
    try:
        setup = Setup(batch=args.batch, seq_len=args.seq_len, precision=args.precision,
                      teacher_dtype=args.teacher_dtype, strategy=args.strategy, num_processes=args.num_processes,
                      teacher_placement=args.teacher_placement, kd_impl=args.kd_impl, attention=args.attention,
                      padded=args.padded, task_loss=not args.no_task_loss,
                      grad_accum=args.gradient_accumulation_steps,
                      gradient_checkpointing=args.gradient_checkpointing, chunk_rows=args.kd_chunk_size)
    except ValueError as e:
        p.error(str(e))
    try:
        teacher = load_config(args.teacher)
        student = student_config(teacher, args.student_layers) if args.student_layers is not None \
            else load_config(args.student)
        result = estimate(teacher, student, setup)
    except (OSError, ValueError) as e:
        p.error(f"{type(e).__name__}: {e}")
    if args.json:
        print(result.to_json())
    else:
        t, s = result.teacher, result.student
        print(f"teacher {args.teacher}: {t['params'] / 1e6:.1f}M parameters, {t['layers']} layers; student "
              f"{args.student or f'{args.student_layers} layers of it'}: {s['params'] / 1e6:.1f}M parameters, "
              f"{s['layers']} layers")
        print(f"per device: batch {setup.batch} x {setup.seq_len} tokens, {setup.precision}, teacher "
              f"{setup.teacher_dtype}, {setup.strategy} x {setup.num_processes}, kd_impl {setup.kd_impl}\n")
        print(result.table())
    return result


if __name__ == "__main__":
    main()
