"""Causal-LM distillation recipe: a thin wrapper over hf_kd.jobs.clm.

    python recipes/distill_clm.py --config recipes/configs/clm_smollm2.yaml [--any_DistillationConfig_field v]
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/distill_clm.py --config ...
"""

from hf_kd.jobs import clm


def main(argv=None):
    job, args = clm.parse(clm.CausalLMJob, argv, clm.DEFAULTS, clm.QUICK)
    report = clm.run(job, args)
    print(f"student saved to {args.output_dir}; report: {args.output_dir}/report.md")
    return report


if __name__ == "__main__":
    main()
