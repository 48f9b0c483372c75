"""Data modes (hf_kd.data.on_policy, hf_kd.data.generation): on-policy batches really are the student's generations, lmbda is
respected (and reproducible), prompts are never distilled, generation leaves the student in train mode; the
sequence-level teacher generations are made once, cached and resumable; vLLM is refused where it cannot run."""

import importlib.util
import math

import pytest
import torch
from datasets import Dataset

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.data.generation import GenerationSettings, generate_completions, teacher_generations
from hf_kd.data.on_policy import OnPolicy
from hf_kd.data.prompts import IGNORE, PromptCollator, tokenize_prompts
from .scripts.tiny import args, llama, losses, one_thread  # noqa: F401  (one_thread: autouse fixture)
from .test_prompts import chat_tokenizer, pairs

SETTINGS = GenerationSettings(max_new_tokens=5, temperature=1.0)


def _pair():
    return llama(), llama(hidden=16, layers=2, seed=1)


def _on_policy(lmbda, seed=0, reuse=1):
    return OnPolicy(lmbda, SETTINGS, seed, pad_id=0, eos_ids={3}, reuse=reuse)


def _args(tmp_path, **kw):
    base = dict(alpha_task=0.0, hidden_weight=0.0, kd_loss="reverse_kl", data_mode="on_policy", max_new_tokens=5)
    return args(tmp_path, **{**base, **kw})


def _count_generate(model):
    """Wrap model.generate: record each call's output ids."""
    calls, original = [], model.generate

    def generate(*a, **kw):
        out = original(*a, **kw)
        calls.append((kw["input_ids"].clone(), out.clone()))
        return out
    model.generate = generate
    return calls


def _record_batches(trainer):
    seen, original = [], trainer.training_step

    def step(model, inputs, num_items_in_batch=None):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return original(model, inputs, num_items_in_batch)
    trainer.training_step = step
    return seen


# ---- the choice of batches -------------------------------------------------------------------------------------
def test_lmbda_is_respected_and_reproducible():
    decisions = [_on_policy(0.3).generates(step, 0) for step in range(200)]
    mean, sd = 200 * 0.3, math.sqrt(200 * 0.3 * 0.7)
    assert abs(sum(decisions) - mean) < 4 * sd  # binomial tolerance
    assert decisions == [_on_policy(0.3).generates(step, 0) for step in range(200)]  # exactly reproducible
    assert decisions != [_on_policy(0.3, seed=1).generates(step, 0) for step in range(200)]
    assert not any(_on_policy(0.0).generates(s, i) for s in range(100) for i in range(3))
    assert all(_on_policy(1.0).generates(s, i) for s in range(100) for i in range(3))
    pooled = [_on_policy(0.7, seed=5).generates(s, i) for s in range(100) for i in range(2)]
    assert abs(sum(pooled) - 140) < 4 * math.sqrt(200 * 0.7 * 0.3)
    # reuse: one choice per group of steps
    grouped = [_on_policy(0.5, reuse=3).generates(step, 0) for step in range(30)]
    assert all(grouped[g * 3] == grouped[g * 3 + 1] == grouped[g * 3 + 2] for g in range(10))


def test_generation_restores_train_mode_and_cuts_after_eos():
    student = llama(hidden=16, layers=2, seed=1)
    student.train()
    prompts = [[5, 6, 7], [8, 9]]
    first = generate_completions(student, prompts, SETTINGS, pad_id=0, eos_ids={3}, seed=7)
    assert student.training
    assert first == generate_completions(student, prompts, SETTINGS, pad_id=0, eos_ids={3}, seed=7)  # seeded
    assert all(1 <= len(c) <= 5 and all(t != 3 for t in c[:-1]) for c in first)
    # the trainer's RNG stream is untouched by the seeded sampling
    torch.manual_seed(0)
    generate_completions(student, prompts, SETTINGS, pad_id=0, eos_ids={3}, seed=7)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))
    greedy = GenerationSettings(max_new_tokens=4, temperature=0.0)
    assert generate_completions(student, prompts, greedy, 0, {3}) == generate_completions(student, prompts, greedy, 0,
                                                                                          {3})


# ---- on-policy training ------------------------------------------------------------------------------------------
def test_on_policy_batches_are_the_students_generations(tmp_path):
    tok = chat_tokenizer()
    teacher, student = _pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=pairs(16),
                                  args=_args(tmp_path, max_steps=3))
    calls, seen = _count_generate(student), _record_batches(trainer)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    assert len(calls) == 3 and len(seen) == 3  # lmbda 1: every step generated
    for (prompt_ids, out), batch in zip(calls, seen):
        width = prompt_ids.shape[1]
        for row in range(out.shape[0]):
            prompt = prompt_ids[row][prompt_ids[row] != 0].tolist()  # left-padded prompt
            generated = out[row, width:].tolist()
            cut = next((i + 1 for i, t in enumerate(generated) if t in (2, 3)), len(generated))
            n = int(batch["attention_mask"][row].sum())
            trained = batch["input_ids"][row, :n].tolist()
            assert trained == prompt + generated[:cut]  # the student's own tokens are what is trained on
            labels = batch["labels"][row].tolist()
            assert labels[:len(prompt)] == [IGNORE] * len(prompt)  # prompt never distilled
            assert labels[len(prompt):n] == generated[:cut]  # completion (EOS included) distilled
            assert set(labels[n:]) <= {IGNORE}  # padding after EOS masked
    logs = [h for h in trainer.state.log_history if "on_policy_fraction" in h]
    assert [h["on_policy_fraction"] for h in logs] == [1.0, 1.0, 1.0]
    assert all(h["generation_seconds"] > 0 for h in logs)
    assert student.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_on_policy_loss_counts_completion_tokens_only(tmp_path):
    """The loss of a generated batch equals reverse KL over its completion tokens, computed here by hand."""
    import torch.nn.functional as F
    tok = chat_tokenizer()
    teacher, student = _pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=pairs(16),
                                  args=_args(tmp_path, max_steps=1, kd_impl="full", temperature=1.0))
    checked, original = [], trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(model, inputs, return_outputs, num_items_in_batch)
        x = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            t = F.log_softmax(teacher(**x).logits[:, :-1].double(), -1)
            s = F.log_softmax(model(**x).logits[:, :-1].double(), -1)
        keep = inputs["labels"][:, 1:] != IGNORE
        assert bool((~keep & inputs["attention_mask"][:, 1:].bool()).any())  # there are prompt positions to skip
        kl = (s.exp() * (s - t)).sum(-1)
        every = inputs["attention_mask"][:, 1:].bool()
        checked.append((float(loss.detach()), float(kl[keep].sum() / keep.sum()), float(kl[every].sum() / every.sum())))
        return loss
    trainer.compute_loss = compute_loss
    trainer.train()
    assert len(checked) == 1
    loss, completion_only, every_token = checked[0]
    assert abs(loss - completion_only) < 1e-4 * completion_only  # float32 loss vs float64 reference
    assert abs(every_token - completion_only) > 1e-2 * completion_only  # distilling the prompt would show


def test_mixed_lmbda_generates_exactly_the_chosen_batches(tmp_path):
    tok = chat_tokenizer()
    teacher, student = _pair()
    rows = tokenize_prompts(pairs(32), tok)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=rows,
                                  args=_args(tmp_path, max_steps=6, lmbda=0.5, gradient_accumulation_steps=2,
                                             per_device_train_batch_size=2))
    calls, seen = _count_generate(student), _record_batches(trainer)
    trainer.train()
    chosen = [trainer.on_policy.generates(step, i) for step in range(6) for i in range(2)]
    assert 0 < sum(chosen) < 12 and len(calls) == sum(chosen)
    logged = [h["on_policy_fraction"] for h in trainer.state.log_history if "on_policy_fraction" in h]
    assert logged == [sum(chosen[2 * s:2 * s + 2]) / 2 for s in range(6)]
    dataset_ids = {tuple(r["input_ids"]) for r in rows}
    for was_generated, batch in zip(chosen, seen):
        kept = [tuple(batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()) for r in range(2)]
        assert was_generated or all(k in dataset_ids for k in kept)  # a supervised batch is the dataset's rows


def test_lmbda_zero_is_supervised_and_runs_repeat(tmp_path):
    tok = chat_tokenizer()
    rows = tokenize_prompts(pairs(16), tok)

    def run(name, **kw):
        teacher, student = _pair()
        trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=rows,
                                      data_collator=PromptCollator(tok), args=_args(tmp_path / name, max_steps=3, **kw))
        calls = _count_generate(student)
        trainer.train()
        return losses(trainer), len(calls)
    never, calls = run("zero", lmbda=0.0)
    assert calls == 0
    assert never == run("supervised", data_mode="supervised")[0]
    mixed, calls = run("mixed_a", lmbda=0.5, seed=3)
    assert run("mixed_b", lmbda=0.5, seed=3) == (mixed, calls)  # seeded choices and sampling: the same run


def test_generations_reuse_trains_one_generation_for_several_steps(tmp_path):
    tok = chat_tokenizer()
    teacher, student = _pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=pairs(32),
                                  args=_args(tmp_path, max_steps=4, generations_reuse=2))
    calls, seen = _count_generate(student), _record_batches(trainer)
    trainer.train()
    assert len(calls) == 2
    assert torch.equal(seen[0]["input_ids"], seen[1]["input_ids"]) and torch.equal(seen[2]["input_ids"],
                                                                                    seen[3]["input_ids"])
    assert not torch.equal(seen[0]["input_ids"], seen[2]["input_ids"])


def test_on_policy_resume_repeats_the_uninterrupted_run(tmp_path):
    tok = chat_tokenizer()
    rows = tokenize_prompts(pairs(32), tok)

    def trainer(out, steps):
        teacher, student = _pair()
        return DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=rows,
                                   args=_args(out, max_steps=steps, lmbda=0.5, seed=1, save_strategy="steps",
                                              save_steps=2))
    full = trainer(tmp_path / "full", 4)
    full.train()
    resumed = trainer(tmp_path / "resumed", 4)  # a fresh process's view: nothing in memory but the checkpoint
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    fractions = [h["on_policy_fraction"] for h in full.state.log_history if "on_policy_fraction" in h]
    assert 0 < sum(fractions) < 4  # mixed: the resumed steps must repeat both kinds of choice
    assert losses(resumed)[-2:] == losses(full)[-2:]


def test_refusals(tmp_path):
    tok = chat_tokenizer()
    teacher, student = _pair()
    prompts_only = tokenize_prompts(Dataset.from_dict({"prompt": ["the king", "a wolf"] * 4}), tok)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok,
                                  train_dataset=prompts_only, args=_args(tmp_path / "a", max_steps=2, lmbda=0.0))
    with pytest.raises(ValueError, match="set lmbda=1"):
        trainer.train()
    with pytest.raises(ValueError, match="processing_class"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=prompts_only,
                            args=_args(tmp_path / "b"))
    for bad, match in ((dict(data_mode="offline"), "data_mode"), (dict(lmbda=1.5), "lmbda"),
                       (dict(generations_reuse=0), "generations_reuse"), (dict(top_p=0.0), "top_p"),
                       (dict(generation_temperature=-1.0), "generation_temperature"),
                       (dict(teacher_url="http://127.0.0.1:1"), "teacher in memory")):
        with pytest.raises(ValueError, match=match):
            DistillationConfig(output_dir=str(tmp_path), report_to=[], **{"data_mode": "on_policy", **bad})


def test_task_loss_on_the_students_own_samples_warns(tmp_path):
    with pytest.warns(UserWarning, match="its own sampled completions"):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], data_mode="on_policy", alpha_task=1.0)
    import warnings
    for quiet in (dict(alpha_task=0.0), dict(alpha_task=1.0, lmbda=0.0), dict(data_mode="sequence_level")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DistillationConfig(output_dir=str(tmp_path), report_to=[], **{"data_mode": "on_policy", **quiet})
        assert not [w for w in caught if "own sampled" in str(w.message)], quiet


VLLM_READY = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.skipif(VLLM_READY, reason="vLLM and a GPU are here: the refusal does not apply")
def test_use_vllm_is_refused_without_vllm_on_a_gpu(tmp_path):
    tok = chat_tokenizer()
    teacher, student = _pair()
    with pytest.raises(ValueError, match="use_vllm=True"):
        DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=pairs(8),
                            args=_args(tmp_path, use_vllm=True))


@pytest.mark.skipif(not VLLM_READY, reason="vLLM needs a GPU / is not installed")
def test_vllm_generates_the_completions(tmp_path):  # pragma: no cover - GPU machines with vLLM only
    from hf_kd.data.generation import VLLMGenerator
    student = llama(hidden=64, layers=2, seed=1).cuda()
    generator = VLLMGenerator(student)
    try:
        generator.sync(student)
        out = generator([[5, 6, 7], [8, 9]], GenerationSettings(max_new_tokens=4, temperature=0.0), {3}, seed=0)
        assert len(out) == 2 and all(1 <= len(c) <= 4 for c in out)
    finally:
        generator.close()


# ---- sequence-level KD ------------------------------------------------------------------------------------------
def test_teacher_generations_are_cached_and_reused(tmp_path):
    tok = chat_tokenizer()
    teacher = llama()
    calls = _count_generate(teacher)
    made = teacher_generations(teacher, tok, pairs(10), SETTINGS, str(tmp_path), batch_size=4, shard_size=4,
                               progress=False)
    assert len(made) == 10 and len(calls) == 3  # shards of 4, 4, 2 prompts; one batch each
    again = teacher_generations(teacher, tok, pairs(10), SETTINGS, str(tmp_path), batch_size=4, shard_size=4,
                                progress=False)
    assert len(calls) == 3 and again.to_list() == made.to_list()  # read from disk, no generation
    prompts = [r["input_ids"] for r in tokenize_prompts(pairs(10), tok)]
    for row in made:  # prompt (without the dataset's completion) + the teacher's completion, labelled
        n_prompt = sum(1 for lab in row["labels"] if lab == IGNORE)
        assert row["input_ids"][n_prompt:] == row["labels"][n_prompt:] and len(row["labels"]) > n_prompt
        assert any(p[:n_prompt] == row["input_ids"][:n_prompt] for p in prompts)
    # other settings or another teacher: another cache entry
    teacher_generations(teacher, tok, pairs(10), GenerationSettings(max_new_tokens=3), str(tmp_path), batch_size=4,
                        shard_size=4, progress=False)
    assert len(calls) == 6


def test_teacher_generations_resume_after_an_interruption(tmp_path):
    tok = chat_tokenizer()
    reference = teacher_generations(llama(), tok, pairs(10), SETTINGS, str(tmp_path / "ref"), batch_size=2,
                                    shard_size=4, progress=False)
    teacher = llama()
    original, calls = teacher.generate, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped inside the second shard
        return original(*a, **kw)
    teacher.generate = flaky
    with pytest.raises(KeyboardInterrupt):
        teacher_generations(teacher, tok, pairs(10), SETTINGS, str(tmp_path / "run"), batch_size=2, shard_size=4,
                            progress=False)
    calls.clear()
    teacher.generate = lambda *a, **kw: (calls.append(1), original(*a, **kw))[1]
    resumed = teacher_generations(teacher, tok, pairs(10), SETTINGS, str(tmp_path / "run"), batch_size=2,
                                  shard_size=4, progress=False)
    assert len(calls) == 3  # the first shard (2 batches) was kept; shards 2 and 3 made: 2 + 1 batches
    assert resumed.to_list() == reference.to_list()


def test_sequence_level_trainer_trains_on_the_teachers_text(tmp_path):
    tok = chat_tokenizer()
    teacher, student = _pair()
    calls = _count_generate(teacher)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=pairs(8),
                                  args=_args(tmp_path, max_steps=2, data_mode="sequence_level", kd_loss="forward_kl",
                                             generation_cache_dir=str(tmp_path / "generations")))
    assert len(calls) == 2  # 8 prompts in batches of 4, before training
    seen = _record_batches(trainer)
    trainer.train()
    # what teacher.generate returned, read from its own outputs (not from the dataset the trainer built)
    generated = {tuple(t for t in out[r, ids.shape[1]:].tolist() if t != tok.pad_token_id)
                 for ids, out in calls for r in range(out.shape[0])}
    own = {tuple(t for t, label in zip(r["input_ids"], r["labels"]) if label != -100)  # the dataset's completions
           for r in tokenize_prompts(pairs(8), tok)}
    trained = [tuple(b["input_ids"][r][b["labels"][r] != -100].tolist()) for b in seen for r in range(len(b["labels"]))]
    assert len(trained) == 8 and all(c in generated for c in trained), "a trained completion is not the teacher's text"
    assert not own & set(trained)
    assert len(list((tmp_path / "generations").iterdir())) == 1  # one cache entry
