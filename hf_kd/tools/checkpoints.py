"""Atomic saves: a checkpoint or student folder is complete or absent, never partial (a crash, a full disk or a
kill during a save leaves only a hidden staging folder)."""

from __future__ import annotations

import os
import re
import shutil

_WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def publish_dir(src: str, dst: str) -> None:
    """Make the complete folder ``src`` appear at ``dst`` with renames (same filesystem): ``dst`` is either the
    old complete folder, absent for an instant, or the new complete folder; never a partial one."""
    if not os.path.exists(dst):
        return os.replace(src, dst)
    old = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.hf_kd-old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def merge_into_dir(src: str, dst: str) -> None:
    """Move the complete save in ``src`` into the existing folder ``dst`` entry by entry (each rename atomic),
    dropping weight files of an earlier save that the new one does not have (e.g. old shards)."""
    new = set(os.listdir(src))
    for name in new:
        (publish_dir if os.path.isdir(os.path.join(src, name)) else os.replace)(os.path.join(src, name),
                                                                                 os.path.join(dst, name))
    for name in set(os.listdir(dst)) - new:
        if _WEIGHT_FILE.match(name) and os.path.isfile(os.path.join(dst, name)):
            os.remove(os.path.join(dst, name))
    shutil.rmtree(src, ignore_errors=True)


def staging_path(target: str) -> str:
    """A hidden sibling of ``target`` (same filesystem, same name on every process)."""
    head, name = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{name}.hf_kd-tmp")


class AtomicSaveMixin:
    """Trainer methods that stage saves in a hidden sibling folder and rename them into place."""

    def _save_checkpoint(self, model, trial) -> None:
        """Atomic checkpoints: checkpoint-N is complete or absent.

        Trainer names the folder itself (``checkpoint-<global_step>`` under ``_get_output_dir(trial)``), so for the
        duration of super()'s call ``_get_output_dir`` points at a hidden staging folder beside it
        (``.checkpoint-N.hf_kd-tmp/``); once every process has written its part, the finished folder is renamed
        into place, and rotation (save_total_limit) runs after the rename. get_last_checkpoint and
        resume_from_checkpoint=True therefore never see a half-written checkpoint; a killed save leaves only a
        hidden staging folder, removed by the next save of that step. With push_to_hub (background upload from the
        folder) Trainer's in-place save is kept.
        """
        if self.args.push_to_hub:
            return super()._save_checkpoint(model, trial)


        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging = staging_path(final)
        staged = os.path.join(staging, name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            del self._get_output_dir
        best = self.state.best_model_checkpoint
        if best and os.path.abspath(best) == os.path.abspath(staged):  # super() saw the staged path
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_dir(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Atomic save: the model is written to a hidden sibling folder and renamed into place, so a failed save
        never leaves a partial folder that looks complete. An existing non-empty folder (e.g. the run's
        output_dir with its checkpoints) receives the finished files one rename each. DeepSpeed, FSDP, XLA,
        SageMaker and push_to_hub keep Trainer's in-place save."""
        from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available
        target = output_dir if output_dir is not None else self.args.output_dir
        if (_internal_call or not self.args.should_save or self.is_deepspeed_enabled or self.is_fsdp_enabled
                or self.args.push_to_hub or is_torch_xla_available() or is_sagemaker_mp_enabled()):
            return super().save_model(output_dir, _internal_call)
        staging = staging_path(target)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            super().save_model(staging, _internal_call=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if os.path.isdir(target) and os.listdir(target):
            merge_into_dir(staging, target)
        else:
            publish_dir(staging, target)
