"""The masked-LM teacher of ``recipes/distill_mlm.py`` (``hf-kd distill-mlm``): the packaged all-MiniLM-L6-v2 is a
plain BertModel (no MLM head), so a BertForMaskedLM is built from it and fitted on the training tales once, cached
under ``cache_dir()/minilm-mlm-teacher`` (``-quick`` for the tiny smoke-test fit).

What makes the fit affordable on a CPU (measured on the held-out tales, see the README): the output bias starts at
the log unigram frequencies of the training tokens; the transformer layers train too (the encoder at a lower
learning rate than the new head) while the word embeddings, which are also the tied decoder, stay frozen; 30% of
the tokens are masked in training (more supervision per forward pass; evaluation masks 15%); 64-token chunks; and
the vocabulary projection is computed only at the masked positions.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from datasets import Dataset
from transformers import AutoTokenizer, BertForMaskedLM, BertModel, DataCollatorForLanguageModeling

from hf_kd.tools.assets import cached_folder, load_tales, minilm_path, prepared_info

EMBEDDED = "minilm"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
RECIPE = dict(steps=800, batch_size=16, max_length=64, lr_encoder=8e-4, lr_head=2e-3, warmup=10,
              weight_decay=0.01, mlm_probability=0.3, unigram_bias=True, freeze_embeddings=True, seed=0)
QUICK_RECIPE = dict(RECIPE, steps=4, batch_size=8, eval_chunks=64)


def chunk_text(dataset, tokenizer, max_length: int, text_column: str = "text", max_chunks: int | None = None):
    """Every row cut into consecutive ``max_length``-token chunks ([CLS] ... [SEP]); chunks under 8 tokens dropped."""
    enc = tokenizer(list(dataset[text_column]), truncation=True, max_length=max_length,
                    return_overflowing_tokens=True)
    rows = [ids for ids in enc["input_ids"] if len(ids) >= 8][:max_chunks]
    if not rows:
        raise ValueError("no text chunk of at least 8 tokens: nothing to distil on")
    return Dataset.from_dict({"input_ids": rows})


def masked_batches(chunks, tokenizer, batch_size: int, seed: int = 1234, mlm_probability: float = 0.15) -> list:
    """Fixed, seeded masking of ``chunks`` (the same masked positions for every model evaluated)."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    rows = [{"input_ids": ids} for ids in chunks["input_ids"]]
    return [collator(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def mlm_from_encoder(path: str):
    """BertForMaskedLM holding the encoder at ``path`` (pooler dropped), decoder tied to the word embeddings."""
    encoder = BertModel.from_pretrained(path, dtype=torch.float32)
    config = copy.deepcopy(encoder.config)
    config.tie_word_embeddings, config.architectures = True, ["BertForMaskedLM"]
    model = BertForMaskedLM(config)
    missing, _ = model.bert.load_state_dict(encoder.state_dict(), strict=False)  # the pooler is unexpected
    if missing:
        raise RuntimeError(f"encoder weights missing from the MLM model: {missing}")
    model.tie_weights()
    if model.cls.predictions.decoder.weight.data_ptr() != model.bert.embeddings.word_embeddings.weight.data_ptr():
        raise RuntimeError("the MLM decoder is not tied to the word embeddings")
    return model


@torch.no_grad()
def masked_accuracy(model, batches: list) -> float:
    """Masked-token accuracy, the head applied at the masked positions only."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for b in batches:
        hidden = model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        valid = b["labels"] != -100
        correct += (model.cls(hidden[valid]).argmax(-1) == b["labels"][valid]).sum().item()
        total += valid.sum().item()
    model.train(was_training)
    return correct / max(total, 1)


def unigram_bias_(model, train_chunks, tokenizer) -> None:
    """Output bias := log frequency of each token in the training chunks (special tokens never predicted)."""
    counts = torch.bincount(torch.tensor([t for ids in train_chunks["input_ids"] for t in ids]),
                            minlength=model.config.vocab_size)[:model.config.vocab_size].float()
    counts[tokenizer.all_special_ids] = 0
    with torch.no_grad():
        model.cls.predictions.bias.copy_(torch.log((counts + 0.1) / (counts.sum() + 0.1 * len(counts))))


def fit_mlm(model, train_chunks, tokenizer, recipe: dict, log_every: int = 25) -> dict:
    """AdamW on the MLM loss: warm-up then linear decay, gradient clipping at 1; prints progress."""
    gen = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    if recipe.get("unigram_bias"):
        unigram_bias_(model, train_chunks, tokenizer)
    if recipe.get("freeze_embeddings"):  # also the tied decoder
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=recipe["mlm_probability"],
                                               seed=recipe["seed"])
    head = [p for n, p in model.named_parameters() if n.startswith("cls.") and p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    lrs = (recipe["lr_encoder"], recipe["lr_head"])
    opt = torch.optim.AdamW([{"params": body, "lr": lrs[0]}, {"params": head, "lr": lrs[1]}],
                            weight_decay=recipe["weight_decay"])
    rows, steps, bs = train_chunks["input_ids"], recipe["steps"], recipe["batch_size"]
    model.train()
    start, step, order = time.perf_counter(), 0, []
    while step < steps:
        if len(order) < bs:
            order = torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:bs], order[bs:]
        batch = collator([{"input_ids": rows[i]} for i in idx])
        warm = max(recipe["warmup"], 1)
        scale = (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(steps - warm, 1))
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr * scale
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        valid = batch["labels"] != -100
        loss = torch.nn.functional.cross_entropy(model.cls(hidden[valid]), batch["labels"][valid])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body + head, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - start
            print(f"[hf_kd] fitting the MLM teacher: step {step}/{steps}, loss {loss.item():.3f}, {elapsed:.0f} s "
                  f"(~{elapsed / step * (steps - step):.0f} s left)", flush=True)
    model.requires_grad_(True).eval()
    return {"seconds": time.perf_counter() - start, "final_loss": loss.item() if math.isfinite(loss.item()) else None}


def prepare_mlm_teacher(quick: bool = False, steps: int = 0):
    """``(BertForMaskedLM, tokenizer, info)``: the packaged MiniLM with its fitted MLM head (built once, cached)."""
    recipe = dict(QUICK_RECIPE if quick else RECIPE)
    if steps:
        recipe["steps"] = steps
    name = "minilm-mlm-teacher" + ("-quick" if quick else "")

    def build(folder: str) -> dict:
        print(f"[hf_kd] preparing the MLM teacher once (cached as {name}): {recipe}", flush=True)
        tok = AutoTokenizer.from_pretrained(minilm_path())
        model = mlm_from_encoder(minilm_path())
        train = chunk_text(load_tales("train"), tok, recipe["max_length"])
        held = masked_batches(chunk_text(load_tales("heldout"), tok, recipe["max_length"],
                                         max_chunks=recipe.get("eval_chunks") or None), tok, 64)
        before = masked_accuracy(model, held)
        info = fit_mlm(model, train, tok, recipe)
        info.update(accuracy_before=before, heldout_accuracy=masked_accuracy(model, held), name=name,
                    train=f"{len(train)} chunks of the training tales",
                    heldout=f"{sum(int((b['labels'] != -100).sum()) for b in held)} masked tokens of held-out tales")
        print(f"[hf_kd] MLM teacher ready: held-out masked-token accuracy {info['heldout_accuracy']:.3f} "
              f"(head untrained: {before:.3f}), {info['seconds']:.0f} s", flush=True)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return info

    folder = cached_folder(name, recipe, build)
    model = BertForMaskedLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder), prepared_info(folder)
