"""Training modes built on the trainer: chains of students and born-again generations (chain), a whole distillation
experiment with its baseline and report (experiment)."""
