"""hf_kd: knowledge distillation for Hugging Face transformers.

    from hf_kd import DistillationConfig, DistillationTrainer, make_student, losses
"""

from . import losses, signals
from .config import DistillationConfig
from .schedules import Schedule
from .student import layer_importance, make_student
from .trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationTrainer", "make_student", "layer_importance", "losses", "signals",
           "Schedule"]
__version__ = "0.1.0"
