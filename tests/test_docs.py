"""The documentation is tested: the site builds with `mkdocs build --strict`, and every code block of README.md and
docs/**/*.md runs.

- ```python blocks run in order, page by page, in one namespace per page (a page's later blocks continue its earlier
  ones), in a temporary working folder. They run as written except for what `tiny_world` substitutes, so the file
  stays fast on 2 CPU cores: `from_pretrained` of the Auto classes with a Hub id (anything that is not an existing
  folder) builds a tiny random model of the same kind (Llama for causal LMs, BERT for encoders, masked LMs and
  text classifiers, ViT for images; seeded by the id, so teacher and tokenizer of one id match), `AutoTokenizer` gives a
  tiny word-level tokenizer, `datasets.load_dataset` a few dozen generated sentences, and every
  `DistillationConfig` is capped at 2 steps of at most 4 rows, with no reporting and no checkpoints.
- ```bash blocks run with `bash -e` from the repository root, unless an HTML comment `<!-- not-run: reason -->`
  stands right before the block (long jobs, launches, GPU commands), or the block is in a generated page listed in
  GENERATED below. A not-run marker without a reason fails.
- ```yaml blocks must parse; ```text blocks (output, formulas) are not run; any other language fails.
"""

import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python", "bash", "yaml", "text", ""}
# pages written by a script (a marker added by hand would be lost at the next render): their bash blocks are the
# multi-hour measurement commands that produced the tables
GENERATED = {"docs/methods.md": "rendered by scripts/methods.py from results/methods.json: the measurement runs "
                                "behind the tables (80 min and more on 2 cores)",
             "docs/clm_modes.md": "rendered by scripts/clm_modes.py"}
FENCE = re.compile(r"(?P<marker><!--\s*not-run:(?P<reason>[^>]*)-->\s*\n)?^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```",
                   re.M | re.S)


def blocks(page: Path):
    """[(index, language, code, not-run reason or None)] of a markdown file's fenced code blocks."""
    out = []
    for i, m in enumerate(FENCE.finditer(page.read_text())):
        reason = m["reason"].strip() if m["marker"] else None
        out.append((i, m["lang"], m["code"], reason))
    return out


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


ALL = [(rel(p), *b) for p in PAGES for b in blocks(p)]


def test_every_block_has_a_known_language_and_every_skip_a_reason():
    for page, i, lang, code, reason in ALL:
        assert lang in LANGUAGES, f"{page} block {i}: language {lang!r}; use one of {sorted(LANGUAGES)}"
        assert reason != "", f"{page} block {i}: `<!-- not-run: -->` needs a reason"
        assert reason is None or lang == "bash", f"{page} block {i}: only bash blocks may be not-run"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[dev]' installs it)")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not installed")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    site = (tmp_path / "site").rglob("*.html")
    assert not [p for p in site if "fonts.googleapis" in p.read_text()], "the site links web fonts: theme.font false"
    assert (tmp_path / "site" / "api" / "signals" / "index.html").read_text().count("doc-heading") > 10


def test_yaml_blocks_parse():
    import yaml
    for page, i, lang, code, _ in ALL:
        if lang == "yaml":
            yaml.safe_load(code)


BASH = [(page, i, code, reason) for page, i, lang, code, reason in ALL if lang == "bash"]


@pytest.mark.parametrize("page,i,code,reason", BASH, ids=[f"{b[0]}:{b[1]}" for b in BASH])
def test_bash_block(page, i, code, reason):
    if page in GENERATED:
        pytest.skip(GENERATED[page])
    if reason:
        pytest.skip(reason)
    result = subprocess.run(["bash", "-e", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, f"{page} block {i}:\n{code}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


# ---- python blocks on tiny models ----------------------------------------------------------------------------------
WORDS = ("the a king queen said went to forest castle and old young wolf girl boy house gold ran saw was there once "
         "upon time little red day night water bird tree capital of france is paris").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]", bos_token="[CLS]")


def sentences(n: int = 48, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (int(torch.randint(4, 14, (1,), generator=g)),),
                                                          generator=g)) for _ in range(n)]


def tiny_model(kind: str, name: str, **kw):
    """A tiny random model of the kind an Auto class names; the same id gives the same weights."""
    import transformers as tf
    torch.manual_seed(zlib.crc32(name.encode()))
    vocab = len(WORDS) + 5
    if kind == "causal_lm":
        layers = 30 if "SmolLM2" in name else 4  # make_student(num_layers=15) in the examples
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=layers, num_attention_heads=2,
                                                  num_key_value_heads=1, max_position_embeddings=512,
                                                  pad_token_id=0, bos_token_id=2, eos_token_id=3))
    if kind == "image":
        cfg = tf.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=4,
                           num_attention_heads=2, intermediate_size=64, num_labels=kw.get("num_labels", 10))
        return tf.ViTForImageClassification(cfg)
    cfg = tf.BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=2, max_position_embeddings=128, num_labels=kw.get("num_labels", 2))
    return {"masked_lm": tf.BertForMaskedLM, "encoder": tf.BertModel}.get(kind, tf.BertForSequenceClassification)(cfg)


@pytest.fixture
def tiny_world(monkeypatch, tmp_path):
    import datasets
    import transformers as tf

    import hf_kd.config

    def patched(auto, kind):
        original = auto.from_pretrained.__func__

        def from_pretrained(cls, name, *args, **kw):
            if os.path.isdir(str(name)):
                return original(cls, name, *args, **kw)
            return tiny_model(kind, str(name), **kw)
        monkeypatch.setattr(auto, "from_pretrained", classmethod(from_pretrained))
    patched(tf.AutoModelForCausalLM, "causal_lm")
    patched(tf.AutoModelForMaskedLM, "masked_lm")
    patched(tf.AutoModel, "encoder")
    patched(tf.AutoModelForSequenceClassification, "classifier")
    patched(tf.AutoModelForImageClassification, "image")
    original_tok = tf.AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", classmethod(
        lambda cls, name, *a, **kw: original_tok(cls, name, *a, **kw) if os.path.isdir(str(name)) else tiny_tokenizer()))

    def load_dataset(name, *args, split=None, **kw):
        text = sentences(48)
        data = datasets.Dataset.from_dict({"text": text, "label": [i % 2 for i in range(len(text))]})
        return data if split else datasets.DatasetDict(train=data, test=data.select(range(8)))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)

    post_init = hf_kd.config.DistillationConfig.__post_init__

    def small(self):
        self.max_steps = min(self.max_steps, 2) if self.max_steps > 0 else 2
        self.per_device_train_batch_size = min(self.per_device_train_batch_size, 4)
        self.report_to, self.disable_tqdm, self.use_cpu, self.save_strategy = "none", True, True, "no"
        post_init(self)
    monkeypatch.setattr(hf_kd.config.DistillationConfig, "__post_init__", small)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
    yield tmp_path
    torch.set_num_threads(threads)


PY_PAGES = sorted({page for page, i, lang, *_ in ALL if lang == "python"})


@pytest.mark.parametrize("page", PY_PAGES)
def test_python_blocks(page, tiny_world):
    namespace = {"__name__": "__docs__"}
    for p, i, lang, code, _ in ALL:
        if p == page and lang == "python":
            try:
                exec(compile(code, f"{page} (block {i})", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{page} block {i} failed: {type(e).__name__}: {e}\n{code}") from e
    shutil.rmtree(tiny_world, ignore_errors=True)


def test_block_counts():
    """The counts in one place (printed with -s): every block of the docs is run or skipped with a reason."""
    run = sum(lang == "python" or (lang == "bash" and not reason and page not in GENERATED)
              for page, i, lang, code, reason in ALL)
    skipped = sum(lang == "bash" and (bool(reason) or page in GENERATED) for page, i, lang, code, reason in ALL)
    other = sum(lang in ("yaml", "text", "") for page, i, lang, code, reason in ALL)
    print(f"docs code blocks: {run} run, {skipped} bash not run (with reasons), {other} yaml/text/output")
    assert run + skipped + other == len(ALL)
