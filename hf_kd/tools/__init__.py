"""Around the trainer, not inside its step: building students (student), memory estimates (memory), metrics and
held-out curves (metrics, curves, metric_modules), reports (report), packaged assets (assets), reliability,
atomic checkpoints (checkpoints) and PEFT students (peft_utils)."""
