"""Generation for the data modes of causal-LM distillation: the model's own ``generate`` (CPU and GPU) or vLLM (GPU),
and sequence-level KD's teacher generations, made once and cached on disk.

Two temperatures are in play and they are different things: ``GenerationSettings.temperature`` (the config's
``generation_temperature``) is the *sampling* temperature of the generated text (0 = greedy); the config's
``temperature`` is the *loss* temperature T of the KL between teacher and student (with T^2), applied after the
text exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets, load_from_disk

from .prompts import cut_after_eos, make_row, pad_id_of, pad_rows, prompt_only, tokenize_prompts


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are sampled: ``temperature`` is the sampling temperature (0 = greedy), not the loss's T."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    use_vllm: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"generation_temperature must be a finite number >= 0 (0 = greedy), got "
                             f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @classmethod
    def from_config(cls, args) -> "GenerationSettings":
        return cls(args.max_new_tokens, args.generation_temperature, args.top_p, args.top_k, args.use_vllm)

    def generate_kwargs(self) -> dict:
        """Keyword arguments of ``model.generate`` (every sampling field explicit: a model's own
        generation_config, e.g. top_k=50, must not leak in)."""
        if self.temperature == 0:
            return dict(max_new_tokens=self.max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None)
        return dict(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (the run's seed, a step, a batch index): reproducible across runs and resumes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def unwrap(model):
    """The model under accelerate / DDP wrappers (their forward is for training, generate is the model's own)."""
    from accelerate.utils import extract_model_from_parallel
    return extract_model_from_parallel(model)


def eos_ids_of(model, tokenizer=None) -> set[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(unwrap(model), "generation_config", None), "eos_token_id", None)
    ids.update([config_eos] if isinstance(config_eos, int) else list(config_eos or []))
    if not ids:
        raise ValueError("no EOS token: neither the tokenizer nor the model's generation_config has one")
    return ids


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Sampling under its own seed without moving the training RNG streams (dropout, data order)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate_completions(model, prompts: list[list[int]], settings: GenerationSettings, pad_id: int,
                         eos_ids: set[int], seed: int | None = None) -> list[list[int]]:
    """Completions of ``prompts`` (lists of ids) with the model's own ``generate``: prompts left-padded, eval mode,
    no_grad and the KV cache during generation, the model's train/eval mode restored after. Each completion is cut
    after its first EOS."""
    model = unwrap(model)
    device = next(model.parameters()).device
    batch = pad_rows([make_row(p, None) for p in prompts], pad_id, "left", device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _seeded(seed, device):
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 pad_token_id=pad_id, eos_token_id=sorted(eos_ids), use_cache=True,
                                 **settings.generate_kwargs())
    finally:
        model.train(was_training)
    return [cut_after_eos(row, eos_ids) for row in out[:, batch["input_ids"].shape[1]:].tolist()]


# ---- vLLM (GPU) -------------------------------------------------------------------------------------------------
def check_vllm() -> None:
    """use_vllm needs vLLM importable and a CUDA GPU; say what to change otherwise."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("use_vllm=True but vLLM is not installed: `pip install vllm` on a CUDA GPU machine, or set "
                         "use_vllm=False to generate with the model's own generate")
    if not torch.cuda.is_available():
        raise ValueError("use_vllm=True needs a CUDA GPU (vLLM does not run here): set use_vllm=False to generate with "
                         "the model's own generate")


class VLLMGenerator:
    """vLLM in this process on the GPU: the model is saved once to a temporary folder for the engine; ``sync`` copies
    the current weights in (on-policy: the student changes every step). Not exercised by the CPU tests."""

    def __init__(self, model, gpu_memory_utilization: float = 0.3):
        check_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in-process: weights can be copied
        from vllm import LLM
        model = unwrap(model)
        self.folder = tempfile.mkdtemp(prefix="hf_kd_vllm_")
        model.save_pretrained(self.folder)
        dtype = next(model.parameters()).dtype
        self.llm = LLM(model=self.folder, skip_tokenizer_init=True, dtype=str(dtype).replace("torch.", ""),
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)

    def _engine_model(self):
        worker = self.llm.llm_engine.model_executor.driver_worker
        runner = getattr(worker, "model_runner", None) or getattr(getattr(worker, "worker", None), "model_runner", None)
        if runner is None:
            raise RuntimeError("this vLLM version hides its model runner: run the engine in-process "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING=0) or set use_vllm=False")
        return runner.model

    def sync(self, model) -> None:
        self._engine_model().load_weights(unwrap(model).state_dict().items())

    def __call__(self, prompts: list[list[int]], settings: GenerationSettings, eos_ids: set[int],
                 seed: int | None = None) -> list[list[int]]:
        from vllm import SamplingParams
        params = SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, top_k=settings.top_k or -1, seed=seed,
                                stop_token_ids=sorted(eos_ids), detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [cut_after_eos(list(o.outputs[0].token_ids), eos_ids) for o in outputs]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---- sequence-level KD: the teacher's generations, cached ------------------------------------------------------
def prompt_ids(dataset: Dataset, tokenizer) -> list[list[int]]:
    """The prompts of a dataset: tokenised rows (input_ids[, labels]: the unlabelled prefix) or raw prompt-completion /
    conversational rows (hf_kd.data.prompts)."""
    if "input_ids" not in dataset.column_names:
        dataset = tokenize_prompts(dataset, tokenizer)
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    return [prompt_only(row) for row in dataset.select_columns(columns)]


def _weights_fingerprint(model) -> str:
    """The config and a strided sample of every tensor (4096 values each): cheap, and changes with training."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 4096)].float().cpu().numpy()
            h.update(name.encode() + str(tuple(p.shape)).encode() + sample.tobytes())
    return h.hexdigest()


def cache_key(teacher, prompts: list[list[int]], settings: GenerationSettings, eos_ids: set[int], seed: int,
              shard_size: int) -> str:
    """Teacher (config + weights sample), prompts, generation settings, EOS ids, seed, shard size -> a folder name."""
    parts = {"teacher": _weights_fingerprint(unwrap(teacher)), "settings": asdict(settings),
             "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "eos": sorted(eos_ids),
             "seed": seed, "shard_size": shard_size}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def teacher_generations(teacher, tokenizer, prompts_dataset: Dataset, settings: GenerationSettings, cache_dir: str,
                        batch_size: int = 8, shard_size: int = 64, seed: int = 0, progress: bool = True) -> Dataset:
    """Sequence-level KD (Kim & Rush 2016): the teacher's completions of every prompt, as training rows (input_ids =
    prompt + teacher completion, labels -100 on the prompt).

    Made once and cached under ``cache_dir/<key>``, the key a hash of the teacher (config and a weights sample), the
    prompts, the generation settings and the seed. Written shard by shard (``shard_size`` prompts, each saved
    atomically as a ``datasets`` folder), so an interrupted run resumes at the first missing shard; each batch's
    sampling seed derives from (seed, shard, batch), so a resumed cache equals an uninterrupted one.
    """
    from tqdm.auto import tqdm
    prompts = prompt_ids(prompts_dataset, tokenizer)
    pad, eos = pad_id_of(tokenizer), eos_ids_of(teacher, tokenizer)
    folder = os.path.join(cache_dir, cache_key(teacher, prompts, settings, eos, seed, shard_size))
    os.makedirs(folder, exist_ok=True)
    meta = {"teacher": getattr(unwrap(teacher).config, "_name_or_path", ""), "settings": asdict(settings),
            "prompts": len(prompts), "shard_size": shard_size, "seed": seed}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shards = [os.path.join(folder, f"shard_{i:05d}") for i in range(math.ceil(len(prompts) / shard_size))]
    todo = [i for i, path in enumerate(shards) if not os.path.isdir(path)]
    done = len(prompts) - sum(len(prompts[i * shard_size:(i + 1) * shard_size]) for i in todo)
    vllm = VLLMGenerator(teacher) if settings.use_vllm and todo else None
    try:
        with tqdm(total=len(prompts), initial=done, desc="teacher generations", unit="prompt",
                  disable=not progress) as bar:
            for i in todo:
                part, rows = prompts[i * shard_size:(i + 1) * shard_size], []
                for b in range(0, len(part), batch_size):
                    chunk, batch_seed = part[b:b + batch_size], derive_seed(seed, i, b)
                    completions = (vllm(chunk, settings, eos, batch_seed) if vllm is not None else
                                   generate_completions(teacher, chunk, settings, pad, eos, batch_seed))
                    rows += [make_row(p, c) for p, c in zip(chunk, completions)]
                    bar.update(len(chunk))
                tmp = shards[i] + ".partial"
                shutil.rmtree(tmp, ignore_errors=True)
                Dataset.from_list(rows).save_to_disk(tmp)
                os.replace(tmp, shards[i])  # a shard exists only once complete
    finally:
        if vllm is not None:
            vllm.close()
    return concatenate_datasets([load_from_disk(path) for path in shards])
