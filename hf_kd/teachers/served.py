"""A teacher served from another process: ``hf-kd serve-teacher MODEL`` loads a causal LM once and answers, over
HTTP, per token the teacher's top-k log-probabilities at T = 1, their ids and the log tail mass: the offline
cache's columns (:mod:`hf_kd.teachers.cache`), computed on demand. Trainers (``teacher_url=``) then need no teacher
in memory; several of them can share one server (a GPU teacher for CPU students, or one teacher for many runs).

    GET  /health  {"status": "ok", "requests": n, "batches": m, "max_requests_per_batch": b}
    GET  /info    {"model", "vocab_size", "tokenizer_fingerprint", "k", "temperature": 1.0, "dtype", ...}
    POST /topk    {"input_ids": [[...]], "attention_mask": [[...]] (optional), "dtype": "float32" | "float16",
                   "encoding": "b64" | "json"}
              ->  {"teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logmass"}: each an array
                  {"dtype", "shape", "b64": little-endian bytes in base64} (or "data": nested lists with "json")

Requests that arrive while the teacher is busy are queued and run together, rows right-padded to one length,
up to ``max_batch_tokens`` padded tokens per forward pass (a causal LM's outputs at a row's own positions do
not depend on padding appended after them). The client retries with exponential backoff and names the URL
when the server stays down; :func:`connect` refuses a server whose vocabulary or tokenizer differs from the
student's. :class:`TopkCollator` adds the columns to each training batch, re-tempered to the training
temperature (:func:`hf_kd.teachers.cache.retemper`), so the trainer's loss is the cache's top-k KL unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import queue
import threading
import time
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from .cache import CACHE_COLUMNS, retemper, topk_targets

WIRE_DTYPES = ("float16", "float32")
MAX_BODY = 256 << 20  # bytes of one POST /topk request


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A short hash of the token -> id map (None for a processor without one): equal maps, equal fingerprints."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if tok is None or not hasattr(tok, "get_vocab"):
        return None
    items = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def encode_array(a: np.ndarray, encoding: str = "b64") -> dict:
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    if encoding == "json":
        return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tolist()}
    return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
    if "b64" in d:
        return np.frombuffer(base64.b64decode(d["b64"]), dtype=d["dtype"]).reshape(d["shape"])
    return np.asarray(d["data"], dtype=d["dtype"]).reshape(d["shape"])


# ---- server ----------------------------------------------------------------------------------------------------
class _Job:
    """One POST /topk: its rows, and their results once the batching thread has run them."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, k: int, dtype: str):
        self.ids, self.mask, self.done, self.error = ids, mask, threading.Event(), None
        b, n = ids.shape
        self.out = (np.empty((b, n, k), np.int32), np.empty((b, n, k), dtype), np.empty((b, n), dtype))


class TopkServer:
    """The teacher's top-k at T = 1 over HTTP. ``bind`` then ``serve_forever`` (blocking), or ``start`` (a
    background thread, e.g. in tests); ``close`` stops both the HTTP server and the batching thread."""

    def __init__(self, model, *, k: int = 32, max_batch_tokens: int = 4096, batch_wait_ms: float = 0.0,
                 name: str = "", tokenizer=None):
        vocab = model.config.vocab_size
        if not 0 < k <= vocab:
            raise ValueError(f"top_k must be in 1..{vocab}, got {k}")
        if max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be > 0, got {max_batch_tokens}")
        self.model, self.k, self.max_batch_tokens = model.eval().requires_grad_(False), k, max_batch_tokens
        self.batch_wait = batch_wait_ms / 1000.0
        param = next(model.parameters())
        self.device = param.device
        self.info = {"model": name, "vocab_size": vocab, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                     "k": k, "temperature": 1.0, "dtype": str(param.dtype).removeprefix("torch."),
                     "device": str(self.device), "max_batch_tokens": max_batch_tokens}
        self.stats = {"requests": 0, "batches": 0, "max_requests_per_batch": 0}
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="hf_kd-teacher-batches", daemon=True)
        self.httpd: ThreadingHTTPServer | None = None
        self.url = None

    # -- batching: one thread runs the model; HTTP threads only parse, queue, wait and encode --
    def submit(self, ids: torch.Tensor, mask: torch.Tensor, dtype: str = "float32") -> tuple:
        """(ids int32 [B, L, k], log-probs [B, L, k], log tail [B, L]) as numpy arrays, run with queued others."""
        job = _Job(ids, mask, self.k, dtype)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.out

    def _loop(self) -> None:
        while True:
            jobs = [self._queue.get()]
            if jobs[0] is None:
                return
            tokens = jobs[0].ids.numel()
            deadline = time.monotonic() + self.batch_wait
            while tokens < self.max_batch_tokens:
                try:
                    job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0)) if self.batch_wait \
                        else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
                tokens += job.ids.numel()
            try:
                self._run(jobs)
            except Exception as e:  # noqa: BLE001 - reported to every waiting request, the server keeps serving
                for job in jobs:
                    job.error = e
            for job in jobs:
                job.done.set()

    def _run(self, jobs: list) -> None:
        rows = [(job, i) for job in jobs for i in range(job.ids.shape[0])]
        self.stats["requests"] += len(jobs)
        self.stats["max_requests_per_batch"] = max(self.stats["max_requests_per_batch"], len(jobs))
        start = 0
        while start < len(rows):  # greedy chunks of at most max_batch_tokens padded tokens (one long row alone)
            end, width = start + 1, rows[start][0].ids.shape[1]
            while end < len(rows) and self._fits(end - start + 1, max(width, rows[end][0].ids.shape[1])):
                width, end = max(width, rows[end][0].ids.shape[1]), end + 1
            self._forward(rows[start:end], width)
            start = end

    def _fits(self, n_rows: int, width: int) -> bool:
        return n_rows * width <= self.max_batch_tokens

    @torch.inference_mode()
    def _forward(self, rows: list, width: int) -> None:
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (job, i) in enumerate(rows):
            n = job.ids.shape[1]
            ids[r, :n], mask[r, :n] = job.ids[i], job.mask[i]
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False).logits
        self.stats["batches"] += 1
        for r, (job, i) in enumerate(rows):  # one row at a time: float32 [L, V], not [B, L, V]
            n = job.ids.shape[1]
            top_ids, top_lp, tail = topk_targets(logits[r, :n], self.k, 1.0)
            job.out[0][i], job.out[1][i], job.out[2][i] = (x.cpu().numpy() for x in (top_ids, top_lp, tail))

    # -- HTTP --
    def bind(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = a free port) and start the batching thread; returns the URL."""
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._worker.start()
        return self.url

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        url = self.bind(host, port)
        threading.Thread(target=self.serve_forever, name="hf_kd-teacher-http", daemon=True).start()
        return url

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        self._queue.put(None)

    def parse(self, body: dict) -> tuple:
        """(ids [B, L], mask [B, L], dtype, encoding) of a POST /topk body; ValueError says what is wrong."""
        ids = torch.as_tensor(body["input_ids"])
        mask = torch.as_tensor(body["attention_mask"]) if body.get("attention_mask") is not None else \
            torch.ones_like(ids)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.shape[1] == 0 or mask.shape != ids.shape:
            raise ValueError(f"input_ids must be equal-length rows of token ids with an attention_mask of the same "
                             f"shape; got {tuple(ids.shape)} and {tuple(mask.shape)}")
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.info["vocab_size"]:
            raise ValueError(f"token ids must be in [0, {self.info['vocab_size']}); got [{int(ids.min())}, "
                             f"{int(ids.max())}]: the client's tokenizer is not this teacher's")
        dtype, encoding = body.get("dtype", "float32"), body.get("encoding", "b64")
        if dtype not in WIRE_DTYPES or encoding not in ("b64", "json"):
            raise ValueError(f"dtype must be one of {WIRE_DTYPES} and encoding 'b64' or 'json'; got {dtype!r}, "
                             f"{encoding!r}")
        return ids.long(), mask.long(), dtype, encoding


def _handler(core: TopkServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a trainer reuses one connection
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall between them

        def log_message(self, *args):  # one line per batch would flood the console
            pass

        def _send(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"status": "ok", **core.stats})
            elif self.path == "/info":
                self._send(200, core.info)
            else:
                self._send(404, {"error": f"no GET {self.path}: /health, /info"})

        def do_POST(self):
            size = int(self.headers.get("Content-Length") or 0)
            if self.path != "/topk" or size > MAX_BODY:
                self.close_connection = True
                return self._send(404 if self.path != "/topk" else 413,
                                  {"error": f"POST /topk only, bodies up to {MAX_BODY} bytes"})
            try:
                ids, mask, dtype, encoding = core.parse(json.loads(self.rfile.read(size)))
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                return self._send(400, {"error": f"{type(e).__name__}: {e}"})
            try:
                out = core.submit(ids, mask, dtype)
            except Exception as e:  # noqa: BLE001 - the model failed on this batch
                return self._send(500, {"error": f"{type(e).__name__}: {e}"})
            self._send(200, {c: encode_array(a, encoding) for c, a in zip(CACHE_COLUMNS, out)})

    return Handler


# ---- client ----------------------------------------------------------------------------------------------------
class TeacherServerDown(ConnectionError):
    """The teacher server could not be reached (after the retries)."""


class TeacherClient:
    """Talks to a TopkServer: ``timeout`` seconds per try, ``retries`` more tries after the first, waiting
    ``backoff`` * 2^i seconds before try i + 1; connection errors, timeouts and 5xx answers are retried, 4xx are not.
    ``dtype``: of the log-probabilities on the wire (float32: exactly the server's values; float16: 25% fewer bytes
    at k = 32, log-probabilities rounded to 3 significant digits, as the offline cache's default storage)."""

    def __init__(self, url: str, *, timeout: float = 120.0, retries: int = 3, backoff: float = 0.5,
                 dtype: str = "float32", encoding: str = "b64"):
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"teacher_url must look like http://HOST:PORT, got {url!r}")
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {WIRE_DTYPES}, got {dtype!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.url = f"http://{self.host}:{self.port}"
        self.timeout, self.retries, self.backoff, self.dtype, self.encoding = timeout, retries, backoff, dtype, encoding
        self._local = threading.local()

    def __getstate__(self):  # picklable (dataloader workers): connections are per process and thread
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return conn

    def _drop(self) -> None:
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            conn.close()

    def call(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        last, waited = None, 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
                waited += self.backoff * 2 ** (attempt - 1)
            try:
                conn = self._connection()
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, closed keep-alive
                self._drop()
                last = f"{type(e).__name__}: {e}"
                continue
            if response.status == 200:
                return json.loads(data)
            message = _error_of(data)
            if response.status < 500:
                raise ValueError(f"teacher server at {self.url} refused {method} {path} (HTTP {response.status}): "
                                 f"{message}")
            last = f"HTTP {response.status}: {message}"
        raise TeacherServerDown(
            f"teacher server at {self.url} is down or failing ({last}; {self.retries + 1} tries over {waited:.1f} s): "
            f"start it with `hf-kd serve-teacher MODEL --host {self.host} --port {self.port}`")

    def health(self) -> dict:
        return self.call("GET", "/health")

    def info(self) -> dict:
        return self.call("GET", "/info")

    def topk(self, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cache columns of a batch [B, L]: (ids int64 [B, L, k], log-probs [B, L, k], log tail [B, L])."""
        ids = torch.as_tensor(input_ids)
        payload = {"input_ids": ids.tolist(), "dtype": self.dtype, "encoding": self.encoding}
        if attention_mask is not None:
            payload["attention_mask"] = torch.as_tensor(attention_mask).tolist()
        out = self.call("POST", "/topk", payload)
        top_ids, lp, tail = (torch.from_numpy(decode_array(out[c]).copy()) for c in CACHE_COLUMNS)
        return top_ids.long(), lp, tail


def _error_of(data: bytes) -> str:
    try:
        return json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return data[:200].decode(errors="replace")


def connect(url: str, student, tokenizer=None, **client_kw) -> tuple[TeacherClient, dict]:
    """(client, cache metadata for :func:`hf_kd.teachers.cache.check_cache`) of the teacher served at ``url``,
    after checking that it serves the student's vocabulary and (when both sides have one) tokenizer."""
    client = TeacherClient(url, **client_kw)
    info = client.info()
    problems = []
    if info["vocab_size"] != student.config.vocab_size:
        problems.append(f"its vocabulary has {info['vocab_size']} ids, the student's {student.config.vocab_size}")
    mine, theirs = tokenizer_fingerprint(tokenizer), info.get("tokenizer_fingerprint")
    if mine and theirs and mine != theirs:
        problems.append(f"its tokenizer fingerprint is {theirs}, the student's tokenizer (processing_class) {mine}")
    if problems:
        raise ValueError(f"the teacher server at {client.url} ({info.get('model') or 'unnamed'}) serves a different "
                         f"tokenizer/vocab than the student: {'; '.join(problems)}. hf_kd compares distributions id "
                         "by id: serve a teacher of the student's family (a make_student student shares it)")
    if not (mine and theirs):
        warnings.warn(f"teacher server at {client.url}: no tokenizer fingerprint on "
                      f"{'the server' if mine else 'the student side (pass processing_class=)'}; only the vocabulary "
                      "sizes were compared", stacklevel=2)
    meta = {"source": "teacher_url", "k": info["k"], "temperature": info["temperature"],
            "vocab_size": info["vocab_size"], "teacher": info.get("model", "")}
    return client, meta


class TopkCollator:
    """Wraps a data collator: each batch gets the cache columns (CACHE_COLUMNS), from ``client`` (a served teacher)
    or already in the batch (a cache made at ``from_temperature``), re-tempered to ``temperature``."""

    def __init__(self, collator, client: TeacherClient | None, vocab_size: int, temperature: float,
                 from_temperature: float = 1.0):
        self.collator, self.client, self.vocab_size = collator, client, vocab_size
        self.temperature, self.from_temperature = temperature, from_temperature

    def __call__(self, features):
        batch = self.collator(features)
        if self.client is not None:
            ids, lp, tail = self.client.topk(batch["input_ids"], batch.get("attention_mask"))
        else:
            ids, lp, tail = (batch[c] for c in CACHE_COLUMNS)
        lp, tail = retemper(lp, tail, self.vocab_size, self.temperature, self.from_temperature)
        for name, value in zip(CACHE_COLUMNS, (ids, lp, tail)):
            batch[name] = value
        return batch
