"""hf_kd: knowledge distillation for Hugging Face transformers.

    from hf_kd import DistillationConfig, DistillationTrainer, make_student, losses

The package is layered (docs/architecture.md): losses -> flow -> data -> teachers -> signals -> tools -> the root
modules (config, engine, trainer) -> modes; a module imports only from its own folder or the folders before it.
"""

import importlib as _importlib
import sys as _sys

from . import losses, signals
from .config import DistillationConfig
from .flow.schedules import Schedule
from .tools.student import layer_importance, make_student
from .trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationTrainer", "make_student", "layer_importance", "losses", "signals",
           "Schedule"]
__version__ = "0.1.0"

# Old import paths. Until the layered layout these modules sat directly in hf_kd/ (hf_kd.pairs, hf_kd.metrics, ...).
# Each old name is registered in sys.modules as the moved module itself (the same object, not a copy) and set as an
# attribute of hf_kd, so `import hf_kd.pairs`, `from hf_kd.pairs import X`, `from hf_kd import pairs`,
# monkeypatch targets and pickles that name an old path keep working. This is the only place that knows them; the
# library, recipes, scripts, tests and docs use the new paths. (hf_kd.data kept its name: it is now a package
# that re-exports the old module's functions.)
_MOVED = {
    "tasks": "flow.tasks", "align": "flow.align", "schedules": "flow.schedules", "capture": "flow.capture",
    "prompts": "data.prompts", "generation": "data.generation", "on_policy": "data.on_policy",
    "cross_tokenizer": "data.cross_tokenizer", "views": "data.views",
    "pairs": "teachers.pairs", "placement": "teachers.placement", "teacher_cache": "teachers.cache",
    "served": "teachers.served", "curriculum": "teachers.curriculum", "quantize": "teachers.quantize",
    "param_groups": "signals.groups",
    "student": "tools.student", "memory": "tools.memory", "metrics": "tools.metrics",
    "metric_modules": "tools.metric_modules", "curves": "tools.curves", "report": "tools.report",
    "assets": "tools.assets", "reliability": "tools.reliability", "checkpoints": "tools.checkpoints",
    "peft_utils": "tools.peft_utils",
    "chain": "modes.chain", "experiment": "modes.experiment",
}
for _old, _new in _MOVED.items():
    globals()[_old] = _sys.modules[f"{__name__}.{_old}"] = _importlib.import_module(f"{__name__}.{_new}")
del _old, _new
