"""Image-classification distillation recipe: a thin wrapper over hf_kd.jobs.image.

    python recipes/distill_image.py --config recipes/configs/image_mnist.yaml [--student resnet] [--quick]
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/distill_image.py --config ...
"""

from hf_kd.jobs import image


def main(argv=None):
    job, args = image.parse(image.ImageJob, argv, image.DEFAULTS, image.QUICK)
    report = image.run(job, args)
    print(f"student saved to {args.output_dir}; report: {args.output_dir}/report.md")
    return report


if __name__ == "__main__":
    main()
