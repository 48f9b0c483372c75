"""hf_kd: knowledge distillation for Hugging Face transformers."""
