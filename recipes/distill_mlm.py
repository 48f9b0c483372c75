"""Masked-LM / sentence-encoder distillation recipe: a thin wrapper over hf_kd.jobs.mlm.

    python recipes/distill_mlm.py --config recipes/configs/mlm_minilm.yaml      # MLM student (KD on MLM logits)
    python recipes/distill_mlm.py --config recipes/configs/encoder_minilm.yaml  # sentence-encoder student
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/distill_mlm.py --config ...
"""

from hf_kd.jobs import mlm


def main(argv=None):
    job, args = mlm.parse_job(argv)
    report = mlm.run(job, args)
    print(f"student saved to {args.output_dir}; report: {args.output_dir}/report.md")
    return report


if __name__ == "__main__":
    main()
