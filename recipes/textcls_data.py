"""The 20 Newsgroups data and the MiniLM-L6 teacher of ``recipes/distill_textcls.py`` (``hf-kd distill-textcls``).

Splits: the packaged train file (11,293 posts, ``hf_kd.tools.assets.load_newsgroups``) is shuffled once with a fixed seed;
the first ``VALIDATION`` posts are the validation split (used to choose settings), the rest the training pool. The
test file (7,528 posts) is used only for the final report. ``labels_per_class`` keeps the first k posts of each
class of the (shuffled) pool labelled; the other pool posts become the unlabelled transfer set (label -100).

The teacher is the packaged all-MiniLM-L6-v2 encoder + a sequence-classification head, fine-tuned once on the whole
training pool (word embeddings frozen) and cached under ``cache_dir()/newsgroups-minilm-teacher`` (``-quick``: the
few-step smoke-test teacher).
"""

from __future__ import annotations

import os
import time

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_kd.modes.experiment import torch_threads
from hf_kd.tools.assets import cached_folder, load_newsgroups, minilm_path, prepared_info

VALIDATION, SPLIT_SEED = 1000, 0
TEACHER = dict(max_length=64, steps=600, batch_size=32, learning_rate=2e-4, warmup=30, seed=0, freeze_embeddings=True)
QUICK_TEACHER = dict(TEACHER, max_length=32, steps=4, batch_size=8, warmup=1, train_examples=64, validation_examples=64)


class Encoded(torch.utils.data.Dataset):
    """Tokenised posts as fixed-length tensors (almost every post is longer than max_length: no padding waste)."""

    def __init__(self, features: dict, labels: torch.Tensor):
        self.features, self.labels, self.pool_row = features, labels, None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.features.items()}, "labels": self.labels[i]}

    def subset(self, idx, pool_row=None) -> "Encoded":
        """Rows ``idx`` (a copy); ``pool_row``: where each row came from, kept as an attribute (not a feature)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = Encoded({k: v[idx] for k, v in self.features.items()}, self.labels[idx].clone())
        out.pool_row = pool_row
        return out

    def batches(self, size: int = 64) -> list[dict]:
        return [{**{k: v[i:i + size] for k, v in self.features.items()}, "labels": self.labels[i:i + size]}
                for i in range(0, len(self), size)]


def encode(texts: list[str], labels: list[int], tokenizer, max_length: int) -> Encoded:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return Encoded({k: enc[k] for k in ("input_ids", "attention_mask")}, torch.tensor(labels))


def splits(tokenizer, max_length: int) -> tuple[dict, list[str]]:
    """``({"pool", "validation", "test"}: Encoded, label names)``; pool and validation come from the train file."""
    train, test = load_newsgroups("train"), load_newsgroups("test")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    train = train.select(order)
    out = {"validation": train.select(range(VALIDATION)), "pool": train.select(range(VALIDATION, len(train))),
           "test": test}
    return ({k: encode(list(d["text"]), list(d["label"]), tokenizer, max_length) for k, d in out.items()},
            train.features["label"].names)


def labelled_rows(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the first ``per_class`` rows of each class (rows are already in a seeded shuffled order)."""
    keep = [torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique()]
    return torch.cat(keep).sort().values


def new_classifier(path: str, names: list[str]) -> BertForSequenceClassification:
    """The packaged encoder with a freshly initialised 20-way head (seeded by the caller)."""
    return BertForSequenceClassification.from_pretrained(
        path, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})


def freeze_word_embeddings(model) -> None:
    """Word embeddings hold half of MiniLM's parameters; frozen, a step costs about half (measured)."""
    model.get_input_embeddings().weight.requires_grad_(False)


@torch.inference_mode()
def accuracy(model, data: Encoded, batch_size: int = 64) -> float:
    model.eval()
    hits = sum((model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) == b["labels"]).sum().item()
               for b in data.batches(batch_size))
    return hits / len(data)


def train_teacher(recipe: dict, data: dict, names: list[str]):
    """Fine-tune encoder + head with AdamW (linear warmup and decay) on the pool; prints progress."""
    torch.manual_seed(recipe["seed"])
    model = new_classifier(minilm_path(), names)
    if recipe["freeze_embeddings"]:
        freeze_word_embeddings(model)
    pool = data["pool"] if "train_examples" not in recipe else data["pool"].subset(range(recipe["train_examples"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["learning_rate"], weight_decay=0.01)
    steps, warm = recipe["steps"], recipe["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (steps - s) / (steps - warm)))
    gen, start, bs = torch.Generator().manual_seed(recipe["seed"]), time.perf_counter(), recipe["batch_size"]
    order = torch.randperm(len(pool), generator=gen)
    model.train()
    for step in range(steps):
        idx = order[(step * bs) % len(pool):][:bs]
        batch = pool.subset(idx)
        loss = model(**batch.features, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0 or step + 1 == steps:
            print(f"[hf_kd] newsgroups teacher step {step + 1}/{steps}: loss {loss.item():.3f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    return model.eval(), time.perf_counter() - start


def prepare_teacher(quick: bool = False):
    """``(teacher, tokenizer, info)``: fine-tuned once, then read from cache_dir()/newsgroups-minilm-teacher[-quick]."""
    recipe = QUICK_TEACHER if quick else TEACHER
    name = "newsgroups-minilm-teacher" + ("-quick" if quick else "")

    def build(folder: str) -> dict:
        tok = AutoTokenizer.from_pretrained(minilm_path())
        data, names = splits(tok, recipe["max_length"])
        with torch_threads(os.cpu_count() or 1):  # a one-off build: every core (the jobs train on 1 thread)
            model, seconds = train_teacher(recipe, data, names)
        val = data["validation"]
        if "validation_examples" in recipe:
            val = val.subset(range(recipe["validation_examples"]))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return {"seconds": seconds, "validation_accuracy": accuracy(model, val), "validation_examples": len(val),
                "name": name, "parameters": sum(p.numel() for p in model.parameters())}

    folder = cached_folder(name, recipe, build)
    return (BertForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder),
            prepared_info(folder))
