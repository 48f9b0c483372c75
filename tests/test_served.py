"""A teacher served from another process (hf_kd.teachers.served, `hf-kd serve-teacher`): the served top-k equals the
in-process one, a trainer against the server equals a trainer on the offline cache, a dead server gives an error
naming its URL (and a restarted one works again), a server with another vocabulary or tokenizer is refused; the
re-tempering of T = 1 targets (hf_kd.teachers.cache.retemper) is exact at T = 1 and close otherwise."""

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import default_data_collator

from hf_kd import DistillationTrainer
from hf_kd.teachers.served import TeacherClient, TeacherServerDown, TopkServer, tokenizer_fingerprint
from hf_kd.teachers.cache import build_teacher_cache, retemper, topk_kl, topk_targets
from .scripts.tiny import args, llama, losses, one_thread, rows  # noqa: F401  (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
K = 8


def _command() -> list[str]:
    """`python -m hf_kd_recipes serve-teacher` where the package is installed, else the recipe file itself."""
    if importlib.util.find_spec("hf_kd_recipes") is not None:
        return [sys.executable, "-m", "hf_kd_recipes", "serve-teacher"]
    return [sys.executable, str(ROOT / "recipes" / "serve_teacher.py")]


def _start(folder, port=0) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(_command() + [str(folder), "--port", str(port), "--top_k", str(K), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    seen = []
    for line in proc.stdout:  # the first line that names the URL: bound and serving
        seen.append(line)
        if "serving at " in line:
            url = line.split("serving at ")[1].split()[0]
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining the pipe
            TeacherClient(url, retries=20, backoff=0.1).health()
            return proc, url
    raise RuntimeError("serve-teacher exited before serving:\n" + "".join(seen[-30:]))


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("teacher")
    llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(teacher_dir):
    """{'proc', 'url'} of a real `serve-teacher` process (a test may replace the process: the last one is stopped)."""
    proc, url = _start(teacher_dir)
    state = {"proc": proc, "url": url}
    yield state
    _stop(state["proc"])


def _batch(n=4, seed=1):
    ds = rows(n=n, seed=seed)
    return torch.tensor(ds["input_ids"]), torch.tensor(ds["attention_mask"])


def test_served_topk_equals_in_process(server, teacher_dir, tiny_tokenizer):
    client = TeacherClient(server["url"])  # float32 log-probabilities on the wire (the default)
    info = client.info()
    assert info["vocab_size"] == 40 and info["k"] == K and info["temperature"] == 1.0 and info["dtype"] == "float32"
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_tokenizer)
    ids, mask = _batch()
    with torch.no_grad():
        want = topk_targets(llama()(input_ids=ids, attention_mask=mask).logits, K)
    got = client.topk(ids, mask)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)
    half = TeacherClient(server["url"], dtype="float16").topk(ids, mask)
    assert half[1].dtype == torch.float16 and torch.equal(half[0], want[0])
    torch.testing.assert_close(half[1].float(), want[1], atol=1e-2, rtol=1e-3)
    plain = TeacherClient(server["url"], dtype="float16", encoding="json").topk(ids, mask)
    assert all(torch.equal(a, b) for a, b in zip(plain, half))


def test_concurrent_requests_are_batched_and_padding_changes_nothing():
    teacher = llama()
    server = TopkServer(teacher, k=K, batch_wait_ms=300, max_batch_tokens=10_000)
    url = server.start()
    try:
        jobs = [_batch(n=2 + i, seed=i) for i in range(4)]
        jobs = [(ids[:, :6 + 2 * i], mask[:, :6 + 2 * i]) for i, (ids, mask) in enumerate(jobs)]  # lengths differ
        results = [None] * len(jobs)

        def ask(i):
            results[i] = TeacherClient(url, dtype="float32").topk(*jobs[i])
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = TeacherClient(url).health()
        assert health["requests"] == 4 and health["max_requests_per_batch"] >= 2, health
        for (ids, mask), got in zip(jobs, results):  # each alone, unpadded, in process
            with torch.no_grad():
                want = topk_targets(teacher(input_ids=ids, attention_mask=mask).logits, K)
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):
            TeacherClient(url).topk(torch.full((1, 4), 45))
    finally:
        server.close()


def _train(output_dir, config: dict, **kw):
    trainer = DistillationTrainer(model=llama(hidden=16, layers=2, seed=1),
                                  args=args(output_dir, hidden_weight=0.0, temperature=2.0, **config), **kw)
    trainer.train()
    return trainer, losses(trainer)


def test_trainer_against_server_equals_offline_cache(server, teacher_dir, tiny_tokenizer, tmp_path):
    """Both from T = 1 targets re-tempered to T = 2 by the same function: the same loss step by step."""
    data = rows(n=12)
    served, got = _train(tmp_path / "served", train_dataset=data, processing_class=tiny_tokenizer,
                         data_collator=default_data_collator, config={"teacher_url": server["url"]})
    assert served.teacher is None
    build_teacher_cache(llama(), data, str(tmp_path / "cache"), k=K, temperature=1.0, storage_dtype="float32")
    _, want = _train(tmp_path / "cached", config={"teacher_cache": str(tmp_path / "cache")})
    assert len(got) == 3 and got[0][2] > 0
    for a, b in zip(got, want):
        assert a[:3] == pytest.approx(b[:3], rel=1e-5)  # step, loss, kd_loss


def test_different_vocab_or_tokenizer_is_refused(tiny_tokenizer, tmp_path):
    for teacher, tok, match in ((llama(vocab=48), tiny_tokenizer, "vocabulary has 48 ids"),
                                (llama(), _shuffled(tiny_tokenizer), "tokenizer fingerprint")):
        server = TopkServer(teacher, k=K, tokenizer=tok)
        url = server.start()
        try:
            with pytest.raises(ValueError, match="serves a different tokenizer/vocab than the student") as e:
                DistillationTrainer(model=llama(hidden=16, layers=2, seed=1), train_dataset=rows(n=4),
                                    processing_class=tiny_tokenizer,
                                    args=args(tmp_path, hidden_weight=0.0, teacher_url=url))
            assert match in str(e.value) and url in str(e.value)
        finally:
            server.close()


def _shuffled(tokenizer):
    """The tiny tokenizer with two words' ids swapped: the same size, a different vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = dict(tokenizer.get_vocab())
    vocab["king"], vocab["queen"] = vocab["queen"], vocab["king"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_retemper_is_exact_at_t1_and_close_otherwise():
    """Measured here (tiny Llama, logits x 4, k = 8 of 40): mean |log head-mass ratio| 0.09 / 0.08 / 0.13, tail
    mass off by 0.04 / 0.02 / 0.03 and gradient cosine 0.999 / 0.997 / 0.987 at T = 0.5 / 2 / 4."""
    ids_in = _batch(8)[0]
    with torch.no_grad():
        logits = llama()(input_ids=ids_in).logits * 4  # a sharper teacher than the random one
        student = llama(seed=3)(input_ids=ids_in).logits
    ids, lp, tail = topk_targets(logits, K)
    same = retemper(lp, tail, 40, 1.0)
    assert same[0] is lp and same[1] is tail  # T = 1: the targets themselves
    for t in (0.5, 2.0, 4.0):
        r_lp, r_tail = retemper(lp, tail, 40, t)
        x_ids, x_lp, x_tail = topk_targets(logits, K, t)
        assert torch.equal(x_ids, ids)  # the top-k set does not depend on T
        torch.testing.assert_close(torch.logsumexp(torch.cat([r_lp, r_tail[..., None]], -1), -1),
                                   torch.zeros_like(r_tail), atol=1e-5, rtol=0)  # a distribution
        inside = r_lp - r_lp[..., :1] - (x_lp - x_lp[..., :1])  # ratios inside the top-k: exact
        assert inside.abs().max() < 1e-4
        head_error = (torch.log(-torch.expm1(r_tail)) - torch.log(-torch.expm1(x_tail))).abs().mean()
        assert head_error < 0.15, (t, head_error)  # the head/tail split: estimated (module doc of teacher_cache)
        assert (r_tail.exp() - x_tail.exp()).abs().mean() < 0.05
        grads = []
        for target in ((x_lp, x_tail), (r_lp, r_tail)):
            s = student.clone().requires_grad_(True)
            topk_kl(s, ids, *target, temperature=t).backward()
            grads.append(s.grad.flatten())
        assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.98, t
    full = topk_targets(logits, 40)  # k = V: no tail to estimate, exact at every T
    r_lp, _ = retemper(full[1], full[2], 40, 2.0)
    torch.testing.assert_close(r_lp, topk_targets(logits, 40, 2.0)[1], atol=1e-5, rtol=1e-5)


def test_server_down_names_the_url_and_a_restart_recovers(server, teacher_dir, tmp_path):
    """Runs last in this file: it kills the shared server and leaves a restarted one on the same port."""
    url = server["url"]
    client = TeacherClient(url, retries=2, backoff=0.05)
    client.health()  # a kept-alive connection that the restart will break
    _stop(server["proc"])
    with pytest.raises(TeacherServerDown, match=f"teacher server at {url} is down.*hf-kd serve-teacher"):
        client.health()
    with pytest.raises(TeacherServerDown, match=url):
        DistillationTrainer(model=llama(hidden=16, layers=2, seed=1), train_dataset=rows(n=4),
                            args=args(tmp_path, hidden_weight=0.0, teacher_url=url))
    server["proc"], again = _start(teacher_dir, port=int(url.rsplit(":", 1)[1]))
    assert again == url
    assert client.topk(*_batch(2))[0].shape == (2, 12, K)  # the same client reconnects
