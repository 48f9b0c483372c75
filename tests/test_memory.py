"""hf_kd.tools.memory (``hf-kd estimate-memory``): the arithmetic on cases checkable by hand or against real tensors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_kd.tools.memory import CHUNK_BUFFERS, FULL_BUFFERS, ModelShape, Setup, estimate, student_config
from hf_kd_recipes import cli, estimate_memory


def tiny(layers=2, tied=True, kv_heads=2):
    return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=kv_heads, vocab_size=300, tie_word_embeddings=tied)


def real_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_bytes_equal_the_instantiated_model(tied):
    cfg = tiny(tied=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    e = estimate(cfg, cfg, Setup(2, 8))
    assert e.components["student_weights"] == real_bytes(model)
    assert e.components["teacher_weights"] == real_bytes(model)
    half = estimate(cfg, cfg, Setup(2, 8, teacher_dtype="bfloat16"))
    assert half.components["teacher_weights"] == real_bytes(model.to(torch.bfloat16))
    shape = ModelShape.from_config(cfg)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.root_params + 2 * shape.block_params == shape.params
    assert shape.head_params == 300 * 64 and shape.gated


def test_student_layers_match_make_student():
    from hf_kd import make_student
    cfg = tiny(layers=4)
    torch.manual_seed(0)
    student = make_student(AutoModelForCausalLM.from_config(cfg), num_layers=2)
    assert ModelShape.from_config(student_config(cfg, 2)).params == sum(p.numel() for p in student.parameters())


def test_optimizer_state_is_two_float32_copies_and_matches_adamw():
    cfg = tiny()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.randint(0, 300, (2, 8)), labels=torch.randint(0, 300, (2, 8))).loss.backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    e = estimate(cfg, cfg, Setup(2, 8))
    assert e.components["optimizer_state"] == 2 * e.components["student_weights"] == state
    assert e.components["gradients"] == e.components["student_weights"]


def test_fsdp_divides_the_student_and_the_teacher_by_n():
    cfg = tiny()
    one, four = (estimate(cfg, cfg, Setup(2, 8, strategy=s, num_processes=n)) for s, n in (("single", 1), ("fsdp", 4)))
    for key in ("student_weights", "gradients", "optimizer_state", "teacher_weights"):
        assert four.components[key] == one.components[key] // 4, key
    assert four.components["activations"] == one.components["activations"]  # per-device batch: unchanged
    assert four.components["comm_buffers"] > 0
    ddp = estimate(cfg, cfg, Setup(2, 8, strategy="ddp", num_processes=4))
    assert ddp.components["teacher_weights"] == one.components["teacher_weights"]  # replicated
    assert ddp.components["comm_buffers"] == one.components["gradients"]  # DDP's gradient buckets
    shard = estimate(cfg, cfg, Setup(2, 8, strategy="ddp", num_processes=4, teacher_placement="shard"))
    assert shard.components["teacher_weights"] == one.components["teacher_weights"] // 4
    assert shard.components["student_weights"] == one.components["student_weights"]
    z3 = estimate(cfg, cfg, Setup(2, 8, precision="bf16", strategy="zero3", num_processes=4))
    params = ModelShape.from_config(cfg).params
    assert z3.components["student_weights"] == params * 2 // 4 and z3.components["optimizer_state"] == params * 12 // 4


def test_logit_loss_terms():
    cfg = tiny()
    b, t, v = 4, 32, 300
    n = b * t
    full = estimate(cfg, cfg, Setup(b, t, kd_impl="full")).components["logit_loss"]
    assert FULL_BUFFERS + 2 == 9.25 and full == n * v * 4 * 9.25  # k = 9.25: both logits + 7.25 float32 buffers
    no_task = estimate(cfg, cfg, Setup(b, t, kd_impl="full", task_loss=False)).components["logit_loss"]
    assert full - no_task == n * v * 4
    chunked = estimate(cfg, cfg, Setup(b, t, kd_impl="chunked", chunk_rows=16)).components["logit_loss"]
    assert chunked == n * v * 4 * 3 + CHUNK_BUFFERS * 16 * v * 4  # both logits + the one stored gradient
    fused = estimate(cfg, cfg, Setup(b, t, kd_impl="fused", chunk_rows=16)).components["logit_loss"]
    assert fused == n * 64 * 4 * 2 + 300 * 64 * 4 + CHUNK_BUFFERS * 16 * v * 4  # no [tokens, vocab] tensor
    cached = estimate(None, cfg, Setup(b, t, kd_impl="chunked", chunk_rows=16)).components  # teacher cache / served
    assert cached["teacher_weights"] == 0 and cached["logit_loss"] == n * v * 4 * 2 + CHUNK_BUFFERS * 16 * v * 4
    bf16_teacher = estimate(cfg, cfg, Setup(b, t, kd_impl="chunked", chunk_rows=16, teacher_dtype="bfloat16"))
    assert chunked - bf16_teacher.components["logit_loss"] == n * v * 2


@pytest.mark.parametrize("attention,kv_heads", [("sdpa", 2), ("sdpa", 4), ("eager", 2)])
def test_activations_match_the_tensors_saved_for_backward(attention, kv_heads):
    cfg = tiny(layers=3, kv_heads=kv_heads)
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(input_ids=torch.randint(0, 300, (2, 32)))
    est = estimate(cfg, cfg, Setup(2, 32, attention=attention)).components["activations"]
    assert est == pytest.approx(sum(saved.values()), rel=0.06)  # small per-token terms (rsqrt, lse, RoPE) left out


def test_peak_counts_what_coexists_and_accumulation_keeps_gradients():
    cfg = tiny()
    e = estimate(cfg, cfg, Setup(4, 64))
    static = sum(e.components[k] for k in ("teacher_weights", "student_weights", "optimizer_state", "comm_buffers"))
    assert e.peak == static + max(e.phases.values()) and e.peak <= e.total
    acc = estimate(cfg, cfg, Setup(4, 64, grad_accum=4))
    assert acc.peak > e.peak and acc.components == e.components


@pytest.mark.parametrize("kw,message", [
    (dict(strategy="pipeline"), "strategy must be one of"), (dict(batch=0), "batch must be a positive integer"),
    (dict(num_processes=2), "strategy 'single' runs one process"), (dict(kd_impl="naive"), "kd_impl must be one of"),
    (dict(strategy="zero3", num_processes=2, teacher_placement="shard"), "needs several processes and no DeepSpeed"),
    (dict(precision="int8"), "precision must be one of")])
def test_bad_setups_fail_with_the_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        Setup(**{"batch": 2, "seq_len": 8, **kw})


@pytest.fixture
def folders(tmp_path):
    tiny(layers=4).save_pretrained(tmp_path / "teacher")
    tiny(layers=2).save_pretrained(tmp_path / "student")
    return tmp_path


def test_cli_prints_a_table_and_json(folders, capsys):
    assert "estimate-memory" in cli.COMMANDS
    cli.main(["estimate-memory", "--teacher", str(folders / "teacher"), "--student_layers", "2", "--batch", "2",
              "--seq_len", "16"])
    out = capsys.readouterr().out
    for label in ("teacher weights", "student weights", "gradients", "optimizer state", "activations",
                  "logit loss", "total", "estimated peak"):
        assert label in out, label
    result = estimate_memory.main(["--teacher", str(folders / "teacher"), "--student", str(folders / "student"),
                                   "--batch", "2", "--seq_len", "16", "--strategy", "fsdp", "--num_processes", "2",
                                   "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == result.total == sum(data["components"].values())
    assert data["setup"]["strategy"] == "fsdp" and data["student"]["layers"] == 2


@pytest.mark.parametrize("argv,message", [
    (["--strategy", "pipeline"], "invalid choice: 'pipeline'"), (["--batch", "0"], "batch must be a positive integer"),
    (["--student_layers", "9"], "num_layers must be between 1 and the teacher's 4 layers"),
    (["--student_layers", "2", "--student", "x"], "not allowed with argument")])
def test_cli_bad_inputs_exit_with_a_message(folders, capsys, argv, message):
    base = ["--teacher", str(folders / "teacher")] + ([] if "--student_layers" in argv else ["--student_layers", "2"])
    with pytest.raises(SystemExit) as e:
        estimate_memory.main(base + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_unloadable_teacher(tmp_path, capsys):
    with pytest.raises(SystemExit):
        estimate_memory.main(["--teacher", str(tmp_path / "missing"), "--student_layers", "1"])
    assert "error" in capsys.readouterr().err
