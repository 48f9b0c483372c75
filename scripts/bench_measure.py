"""Process measurements for scripts/benchmark.py (and the other benchmark scripts): resident-set size and its
peak, CPU time of this process and of the whole machine, memory limits, machine facts, and running one benchmark
job in a fresh interpreter (``python scripts/benchmark.py --child SPEC_JSON``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

# The child jobs are run by re-invoking the entry point (its --child option dispatches to the job functions).
BENCHMARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """Peak resident set of this process since start or the last reset_peak() (== ru_maxrss on Linux)."""
    return _status_mb("VmHWM")


def reset_peak() -> bool:
    """Reset the peak resident set (Linux >= 4.0: also resets getrusage's ru_maxrss). False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all processes) from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Window:
    """Wall time, own CPU time and the other processes' CPU use (in cores) over a measured phase."""

    def __enter__(self):
        self.t0, self.busy0, self.self0 = time.perf_counter(), cpu_busy_s(), self_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy, own = cpu_busy_s() - self.busy0, self_cpu_s() - self.self0
        self.other_cores = max(busy - own, 0.0) / max(self.wall, 1e-9)
        return False


def limit_memory(gb: float | None) -> None:
    if not gb:
        return
    import resource
    limit = int(gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def available_gb() -> float:
    try:
        import psutil
        return psutil.virtual_memory().available / (1 << 30)
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return info.get("MemAvailable", 0) / (1 << 20)


def setup_torch(threads: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    torch.set_num_threads(threads)
    return torch


def machine_info() -> dict:
    import torch
    import transformers
    from hf_kd.tools.report import cpu_name
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "ram_gb": round(available_gb(), 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl
        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


# ---- running a job in its own process ---------------------------------------------------------------------

def child(kind: str, spec: dict, mem_gb: float | None, timeout: int = 7200, script: str = BENCHMARK) -> dict:
    """Run ``kind`` (prepare / case / loss) in a fresh interpreter; its JSON result or an error record."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 2)), MKL_NUM_THREADS=str(spec.get("threads", 2)),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONWARNINGS="ignore")
    payload = json.dumps({"kind": kind, "spec": spec, "mem_gb": mem_gb})
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, script, "--child", payload], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-900:], "wall_s": time.time() - t0}
    result = json.loads(marker[-1][len("@@RESULT@@"):])
    result["wall_s"] = time.time() - t0
    return result


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 60) -> dict:
    """Poll the 1-minute load average until it is below ``max_load`` (or give up after ``max_wait_s``)."""
    t0 = time.time()
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.time() - t0 >= max_wait_s:
            return {"load_1min": load, "waited_s": round(time.time() - t0), "quiet": load < max_load}
        print(f"load average {load:.2f} >= {max_load}: waiting {poll_s:.0f} s", flush=True)
        time.sleep(poll_s)


def save_json(path: str, results: dict) -> None:
    """Write ``results`` to ``path`` atomically (a temporary file, then a rename), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)
