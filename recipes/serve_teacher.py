"""Serve a causal-LM teacher's top-k over HTTP (``hf-kd serve-teacher``); train against it with
``--teacher_url http://HOST:PORT`` and no teacher in the training process.

    python recipes/serve_teacher.py MODEL [--port 8765] [--host 127.0.0.1] [--top_k 32] [--max_batch_tokens 4096]
                                          [--dtype auto] [--device auto] [--batch_wait_ms 0]

MODEL: 'smollm2' (packaged), a folder or a Hub id (``from_pretrained``). Per token the server answers the teacher's
top-k log-probabilities at T = 1, their ids and the log tail mass (the offline cache's columns,
:mod:`hf_kd.teachers.cache`); trainers re-temper them to their temperature. Endpoints and wire format:
:mod:`hf_kd.teachers.served`. ``--port 0`` picks a free port; the first line printed names the URL.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd.teachers.served import TopkServer

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-kd serve-teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="'smollm2' (packaged), a folder or a Hub id of a causal LM.")
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0: every interface).")
    p.add_argument("--port", type=int, default=8765, help="Port (0 = a free one, printed at start).")
    p.add_argument("--top_k", type=int, default=32, help="Log-probabilities served per token.")
    p.add_argument("--max_batch_tokens", type=int, default=4096,
                   help="Padded tokens per teacher forward pass; queued requests are run together up to this.")
    p.add_argument("--batch_wait_ms", type=float, default=0.0,
                   help="How long the first queued request waits for others to join its batch.")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="Teacher weights dtype (auto = as saved).")
    p.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default).")
    return p


def load(name: str, dtype: str, device: str):
    """(causal LM on its device in eval mode, tokenizer or None) from 'smollm2', a folder or a Hub id."""
    path = name
    if name == "smollm2":
        from hf_kd.tools.assets import smollm2_path
        path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):  # a bare model folder: trainers can then compare vocab sizes only
        tokenizer = None
    return model.to(device).eval(), tokenizer


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, args.dtype, args.device)
    server = TopkServer(model, k=args.top_k, max_batch_tokens=args.max_batch_tokens,
                        batch_wait_ms=args.batch_wait_ms, name=args.model, tokenizer=tokenizer)
    url = server.bind(args.host, args.port)
    print(f"hf-kd serve-teacher: serving at {url} {json.dumps(server.info)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
