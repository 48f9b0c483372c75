"""Teacher-assistant chains: the geometric-mean assistant size against brute force, and a two-stage chain that
trains each stage, leaves the teacher untouched, and resumes stage by stage."""

import json
import math
import os
import signal

import pytest
import torch

from hf_kd import make_student
from transformers import TrainerCallback

from hf_kd.modes.chain import assistant_layers, chain_vs_direct, distill_chain
from hf_kd.modes.experiment import Interrupted

from .scripts.tiny import args, llama, one_thread, rows  # noqa: F401  (one_thread: autouse fixture)


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_assistant_size_is_the_geometric_mean_by_brute_force():
    teacher = llama(hidden=32, layers=8)
    for student_layers in (1, 2):
        student = make_student(teacher, num_layers=student_layers)
        target = math.sqrt(count(teacher) * count(student))
        sizes = {n: count(make_student(teacher, num_layers=n)) for n in range(1, 9)}
        best = min(sizes, key=lambda n: abs(sizes[n] - target))
        assert assistant_layers(teacher, count(student)) == best
        assert student_layers < best < 8


def test_chain_trains_each_stage_and_resumes(tmp_path):
    teacher = llama(layers=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assistant = make_student(teacher, num_layers=assistant_layers(teacher, count(make_student(teacher, num_layers=1))))
    student = make_student(assistant, num_layers=1)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    a = args(tmp_path, max_steps=2, hidden_weight=0.0)
    trainers = distill_chain(teacher, [assistant, student], a, train_dataset=rows())
    assert [t.state.global_step for t in trainers] == [2, 2]
    assert trainers[1].teacher is assistant  # the assistant taught the student
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in initial.items())
    for i in (0, 1):
        assert os.path.isfile(tmp_path / f"stage_{i}" / "hf_kd_stage.json")
    # a rerun finds both stages done: nothing is trained, the saved students are loaded
    fresh = make_student(make_student(teacher, num_layers=2), num_layers=1)
    again = distill_chain(teacher, [make_student(teacher, num_layers=2), fresh], a, train_dataset=rows())
    assert again == [None, None]
    trained = {k: v for k, v in student.state_dict().items() if not k.startswith("hf_kd_signals")}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items())


def test_born_again_generations(tmp_path):
    from hf_kd.modes.chain import born_again
    teacher = llama(layers=2, seed=0)
    students, trainers = born_again(teacher, lambda: llama(layers=2, seed=7), 2, args(tmp_path, max_steps=2),
                                    train_dataset=rows())
    assert len(students) == 2 and trainers[1].teacher is students[0]  # generation 2 learned from generation 1
    first, second = (s.model.layers[0].mlp.up_proj.weight for s in students)
    assert not torch.equal(first, second)  # each generation trained on its own
    with pytest.raises(ValueError, match="architecture"):
        born_again(teacher, lambda: llama(layers=3), 1, args(tmp_path / "x"), train_dataset=rows())


class StopInStage(TrainerCallback):
    """SIGTERM to this process after optimizer step ``step`` of chain stage ``stage`` (a real interrupt: the
    trainer's handler saves a checkpoint and stops)."""

    def __init__(self, stage, step):
        self.stage, self.step = stage, step

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.endswith(f"stage_{self.stage}") and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_chain_interrupted_mid_stage_resumes_to_the_uninterrupted_result(tmp_path):
    def models():
        teacher = llama(layers=4)
        assistant = make_student(teacher, num_layers=2)
        return teacher, assistant, make_student(assistant, num_layers=1)

    teacher, assistant, reference = models()
    distill_chain(teacher, [assistant, reference], args(tmp_path / "ref", max_steps=4), train_dataset=rows())
    teacher, assistant, student = models()
    a = args(tmp_path / "run", max_steps=4)
    with pytest.raises(Interrupted, match="stage 1 interrupted at step 2"):
        distill_chain(teacher, [assistant, student], a, train_dataset=rows(), callbacks=[StopInStage(1, 2)])
    assert not (tmp_path / "run" / "stage_1" / "hf_kd_stage.json").exists()  # not marked done
    assert (tmp_path / "run" / "stage_1" / "checkpoint-2").is_dir()
    teacher, assistant, student = models()
    trainers = distill_chain(teacher, [assistant, student], a, train_dataset=rows())
    assert trainers[0] is None and trainers[1].state.global_step == 4  # stage 0 loaded, stage 1 resumed
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(student.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_chain_vs_direct_report(tmp_path):
    teacher = llama(layers=4)
    assistant = make_student(teacher, num_layers=2)

    def score(m):
        return {"first_weight": float(m.model.layers[0].mlp.up_proj.weight.detach().sum())}
    report = chain_vs_direct(teacher, [assistant], lambda: make_student(teacher, num_layers=1),
                             args(tmp_path, max_steps=2), score, train_dataset=rows())
    assert [r["model"] for r in report["models"]] == ["teacher", "assistant 1", "student, chained",
                                                      "student, direct"]
    assert [r["steps"] for r in report["models"]] == [0, 2, 4, 4] and report["total_steps"] == 4
    done = json.load(open(tmp_path / "direct" / "stage_0" / "hf_kd_stage.json"))
    assert done["steps"] == 4  # the direct student trained for the chain's total steps
    chained, direct = report["models"][2:]
    assert chained["first_weight"] != direct["first_weight"] and chained["parameters"] == direct["parameters"]
    md = (tmp_path / "chain_report.md").read_text()
    assert "| student, chained |" in md and json.load(open(tmp_path / "chain_report.json")) == report
