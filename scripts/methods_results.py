"""The results file of scripts/methods.py: rows keyed by (split, student, method, seed, steps), merged atomically
under a lock so interrupted or parallel runs never lose a row, and the machine each run was measured on."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import tempfile

import torch


def row_key(split, student, spec, seed, steps) -> str:
    return f"{split}|{student}|{spec}|{seed}|{steps}"


@contextlib.contextmanager
def locked(path: str):
    name = "hf_kd_methods_" + os.path.abspath(path).replace(os.sep, "_") + ".lock"  # beside nothing in the repo
    with open(os.path.join(tempfile.gettempdir(), name), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"meta": {}, "rows": {}}


def merge(path: str, rows: dict | None = None, meta: dict | None = None) -> dict:
    """Re-read ``path``, add ``rows`` and ``meta`` entries (lists in meta are extended), write it atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with locked(path):
        doc = load(path)
        doc["rows"].update(rows or {})
        for k, v in (meta or {}).items():
            doc["meta"][k] = doc["meta"].get(k, []) + v if isinstance(v, list) else v
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".methods-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    return doc


def machine_info() -> dict:
    from hf_kd.tools.report import cpu_name
    cpu = cpu_name()
    import subprocess
    import transformers
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"git_head": git("rev-parse", "--short", "HEAD"),
            "uncommitted_hf_kd": git("status", "--porcelain", "--", "hf_kd").splitlines(), "cpu": cpu,
            "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
