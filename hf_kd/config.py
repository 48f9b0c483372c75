"""DistillationConfig: TrainingArguments plus the distillation fields (CLI flags, YAML and Python alike)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from transformers import TrainingArguments

from .flow.align import KD_POSITIONS
from .losses import HIDDEN_LOSSES, LOGIT_LOSSES
from .flow.schedules import SCHEDULED, SCHEDULES
from .signals.maps import parse_layer_map, parse_module_pairs
KD_IMPLS = ("auto", "full", "chunked", "fused")
TEACHER_PLACEMENTS = ("auto", "shard", "offload")  # hf_kd.teachers.placement
TEACHER_DTYPES = ("auto", "model", "float32", "bfloat16", "float16")
NAN_POLICIES = ("stop", "skip")
DATA_MODES = ("supervised", "sequence_level", "on_policy")  # hf_kd.data.on_policy


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments for :class:`hf_kd.DistillationTrainer`.

    The loss is ``alpha_task * L_task + kd_weight * L_kd + hidden_weight * L_hidden``.
    """

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of the logit loss; "
                               "temperature-scaled losses are multiplied by T^2 (Hinton et al. 2015)."})
    alpha_task: float = field(default=1.0, metadata={"help": "Weight of the student's own task loss "
                              "(causal-LM, masked-LM or classification cross-entropy). 0 = pure distillation."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the teacher-student logit loss."})
    kd_loss: str = field(default="forward_kl", metadata={"help": "Logit loss: " + ", ".join(LOGIT_LOSSES)
                         + " (forward_kl = KL(teacher||student); jsd uses jsd_beta, skew_* skew_alpha)."})
    jsd_beta: float = field(default=0.5, metadata={"help": "beta of the generalised JSD: 0 = forward KL, "
                            "1 = reverse KL."})
    skew_alpha: float = field(default=0.1, metadata={"help": "alpha of the skew KLs (DistiLLM, Ko et al. 2024), "
                              "in [0, 1): skew_forward_kl = KL(p_T || a p_T + (1-a) p_S), skew_reverse_kl = "
                              "KL(p_S || (1-a) p_T + a p_S); 0 = the plain KL."})
    kd_positions: str = field(default="auto", metadata={"help": "Positions the teacher's outputs are matched on: "
                              "'all' = every non-padding token / every example, labelled or not (so unlabelled "
                              "examples, label -100, are distilled: a transfer set), 'labels' = only positions "
                              "whose label is not -100, 'auto' = 'labels' for causal LMs (prompt tokens masked "
                              "with -100 are not distilled), 'all' otherwise."})
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight of the hidden-state loss over the "
                                 "layer map (averaged over mapped pairs)."})
    hidden_loss: str = field(default="cosine", metadata={"help": "Hidden-state loss: " + ", ".join(HIDDEN_LOSSES)})
    relation_weight: float = field(default=0.0, metadata={"help": "Weight of similarity-preserving KD (Tung & Mori "
                                   "2019) over the layer_map pairs: the b x b similarities of the examples' pooled "
                                   "hidden states, student vs teacher (any widths, no projection; batches of 2+)."})
    layer_map: str | None = field(default=None, metadata={"help": "teacher:student hidden-state pairs, e.g. "
                                  "'0:0,6:1,12:2' (0 = embeddings). Default: from make_student's record of "
                                  "kept layers, else spread uniformly."})
    use_projection: bool = field(default=True, metadata={"help": "Learn a Linear(student_dim, teacher_dim) "
                                 "per mapped pair where widths differ (trained, not saved into the student)."})
    teacher_dtype: str = field(default="auto", metadata={"help": "Teacher weights dtype: " + ", ".join(TEACHER_DTYPES)
                               + ". 'auto': a teacher hf_kd loads (a folder or Hub id) is loaded in bfloat16 where the "
                               "device computes it natively (CUDA with bf16, CPUs with AMX or AVX512-BF16), else as "
                               "saved; a model object is used as given, never changed. 'model': as given. A dtype "
                               "('bfloat16', ...) casts a model object in place, with a warning (it stays so)."})
    teacher_placement: str = field(default="auto", metadata={"help": "Several processes: 'auto' (as the "
                                   "accelerator places models: replicated under DDP, sharded under FSDP / ZeRO-3) or "
                                   "'shard' (FSDP2-shard the teacher over all processes whatever the student's "
                                   "strategy, CPU included) or 'offload' (GPU: those shards kept in CPU memory, "
                                   "brought to the GPU block by block); see hf_kd.teachers.placement."})
    kd_impl: str = field(default="auto", metadata={"help": "Logit-loss implementation: 'full' (reference), "
                         "'chunked' (token chunks, never the full [tokens, vocab] probabilities), 'fused' "
                         "(logits from hidden states chunk by chunk), 'auto' = chunked for LMs."})
    kd_chunk_size: int = field(default=0, metadata={"help": "Tokens per chunk for chunked/fused logit losses; 0 = "
                               "automatic: chunked = as many as keep one float32 [tokens, vocab] chunk under 8 MiB (13 at "
                               "a 152k vocabulary, 42 at 49k; larger chunks are slower on CPU, page faults), "
                               "fused = 256 (each chunk updates the head's weight gradient)."})
    teacher_cache: str | None = field(default=None, metadata={"help": "Folder made by `hf-kd cache-teacher`: "
                                      "train from the teacher's cached top-k with no teacher in memory (forward_kl "
                                      "only, same temperature; train_dataset defaults to the cache)."})
    teacher_url: str | None = field(default=None, metadata={"help": "URL of a teacher served by `hf-kd serve-teacher` "
                                    "(e.g. http://127.0.0.1:8765): each batch's top-k targets come from that process "
                                    "instead of a teacher_model in memory (forward_kl only, as with teacher_cache)."})
    teacher_weights: str = field(default="uniform", metadata={"help": "Several teachers (teacher_model= a list or a "
                                 "mapping): how their softened outputs are mixed into one target: 'uniform', fixed "
                                 "weights '0.7,0.3', 'learned' (softmax of trainable logits, logged; kd_impl='full'), "
                                 "'confidence' (per example: each teacher's probability of the true label) or "
                                 "'entropy' (per example: sharper teachers count more)."})
    teacher_temperatures: str | None = field(default=None, metadata={"help": "Several teachers: one temperature per "
                                             "teacher, e.g. '2,4' (default: temperature for all)."})
    teacher_checkpoints: str | None = field(default=None, metadata={"help": "Route-constrained optimisation (Jin et "
                                            "al. 2019): the teacher's own checkpoints, early to final, "
                                            "'ckpt-a,ckpt-b,final' (save_pretrained folders), used as successive "
                                            "teachers; loaded into teacher_model in place, one at a time."})
    teacher_switch_at: str | None = field(default=None, metadata={"help": "Fractions of training where the next "
                                          "teacher checkpoint takes over, e.g. '0.3,0.6' (default: evenly)."})
    progressive: bool = field(default=False, metadata={"help": "Progressive layer-wise distillation: training is cut "
                              "into len(layer map) + 1 equal stages; stage i adds hidden-state pair i (each pair its own "
                              "signal, hidden_<i>, with its projection), the last stage adds the logit terms (KD and "
                              "task). Needs hidden_weight > 0; resumable mid-stage (the stage follows the step)."})
    hint_weight: float = field(default=0.0, metadata={"help": "Weight of FitNets hints (Romero et al. 2015) on "
                               "hint_layers, through learned adapters (Linear for token states, 1x1 conv + BatchNorm "
                               "for feature maps)."})
    hint_layers: str | None = field(default=None, metadata={"help": "Hint module pairs 'teacher.module:student.module"
                                    ",...' (names as in model.named_modules(), e.g. 'vit.layers.2:resnet.encoder."
                                    "stages.1')."})
    hint_normalize: bool = field(default=False, metadata={"help": "Compare L2-normalised features (the 'feature "
                                 "similarity' form) instead of plain MSE."})
    hint_first_stage: float = field(default=0.0, metadata={"help": "FitNets stage 1: for this fraction of training "
                                    "only the hints train (the student up to its hint modules); the other terms "
                                    "start after it. 0 = one stage."})
    attention_weight: float = field(default=0.0, metadata={"help": "Weight of attention-probability transfer "
                                    "(TinyBERT/MiniLM style) over attention_layers; switches both models to eager "
                                    "attention."})
    attention_layers: str | None = field(default=None, metadata={"help": "teacher:student transformer layer pairs, "
                                         "0-based, e.g. '3:0,7:1,11:2'. Default: the layers the layer map pairs."})
    attention_loss: str = field(default="kl", metadata={"help": "'kl' = KL(teacher || student) per query, or 'mse'."})
    at_weight: float = field(default=0.0, metadata={"help": "Weight of spatial attention transfer (Zagoruyko & "
                             "Komodakis 2017) on at_layers (CNN feature maps, or ViT tokens on their patch grid)."})
    at_layers: str | None = field(default=None, metadata={"help": "Attention-transfer module pairs "
                                  "'teacher.module:student.module,...'."})
    input_grad_weight: float = field(default=0.0, metadata={"help": "Weight of input-gradient matching (Sobolev "
                                     "training, Czarnecki et al. 2017): ||d L_T/dx - d L_S/dx||^2 w.r.t. pixels or "
                                     "token embeddings; needs labels and a backward through the teacher."})
    feature_grad_weight: float = field(default=0.0, metadata={"help": "Weight of gradient matching at intermediate "
                                       "features: d(task loss)/d(module output), teacher vs student, on "
                                       "feature_grad_layers (adapters where widths differ)."})
    feature_grad_layers: str | None = field(default=None, metadata={"help": "Feature-gradient module pairs "
                                            "'teacher.module:student.module,...'."})
    great_weight: float = field(default=0.0, metadata={"help": "Weight of adversarial input-gradient matching "
                                "(GREAT, Sinha et al. 2018): a discriminator on input gradients, the student trained "
                                "to fool it."})
    mutual_weight: float = field(default=0.0, metadata={"help": "Deep mutual learning (Zhang et al. 2018, no "
                                 "teacher needed): weight of T^2 KL between the student and `mutual_peers` peers "
                                 "at `temperature`, and of the peers' own objective. Config-built peers are fresh "
                                 "models of the student's architecture (for pretrained peers pass "
                                 "signals=[MutualLearning(peers=...)])."})
    mutual_peers: int = field(default=1, metadata={"help": "Number of peers trained with the student "
                              "(mutual_weight > 0)."})
    peer_learning_rate: str | None = field(default=None, metadata={"help": "Mutual learning: the peers' learning "
                                           "rates, one or one per peer, comma-separated (default learning_rate)."})
    peer_lr_scheduler_type: str | None = field(default=None, metadata={"help": "Mutual learning: the peers' "
                                               "learning-rate schedule, one or one per peer (default "
                                               "lr_scheduler_type)."})
    self_distill_weight: float = field(default=0.0, metadata={"help": "Self-distillation (Be Your Own Teacher, "
                                       "Zhang et al. 2019): weight of the auxiliary exits on `self_distill_exits`, "
                                       "each learning the task and T^2 KL to the model's own final output (a "
                                       "classifier student; no teacher needed)."})
    self_distill_exits: str | None = field(default=None, metadata={"help": "Hidden-state indices of the "
                                           "self-distillation exits, e.g. '1,2' (0 = embeddings)."})
    ddp_find_unused_parameters: bool | None = field(default=None, metadata={"help": "DDP's find_unused_parameters. "
                                                    "None: True only if a step leaves student parameters unused (a "
                                                    "hint-only stage, progressive stages, no logit term), else False "
                                                    "(a plain Trainer says True)."})
    nan_policy: str = field(default="stop", metadata={"help": "Non-finite teacher/student outputs or loss: "
                            "'stop' raises with step and batch, 'skip' drops that batch's loss (logged)."})
    weight_schedule: str = field(default="constant", metadata={"help": "How alpha_task, kd_weight, hidden_weight "
                                 "and temperature move to their *_end values over training: " + ", ".join(SCHEDULES)
                                 + " (e.g. 'progressive alpha': alpha_task 0 -> 1, kd_weight 1 -> 0; 'step' jumps "
                                 "at schedule_at, 'warmup' ramps over the first schedule_at of training)."})
    schedule_at: float = field(default=0.5, metadata={"help": "Fraction of training where a 'step' schedule jumps, or "
                               "over which a 'warmup' schedule ramps to its end value."})
    alpha_task_end: float | None = field(default=None, metadata={"help": "alpha_task at the last step (scheduled)."})
    kd_weight_end: float | None = field(default=None, metadata={"help": "kd_weight at the last step (scheduled)."})
    hidden_weight_end: float | None = field(default=None, metadata={"help": "hidden_weight at the last step "
                                            "(scheduled)."})
    temperature_end: float | None = field(default=None, metadata={"help": "Temperature at the last step (scheduled; "
                                          "not with teacher_cache, made at one temperature)."})
    # data modes for causal LMs (hf_kd.data.on_policy); the generation fields sample text, `temperature` is the loss's T
    data_mode: str = field(default="supervised", metadata={"help": "What a causal-LM student trains on: 'supervised' "
                           "(the dataset's tokens), 'sequence_level' (the teacher's completions of the dataset's "
                           "prompts, generated once and cached in generation_cache_dir), 'on_policy' (GKD: with "
                           "probability lmbda a micro-batch's completions are sampled from the current student, "
                           "else the dataset's; the teacher scores every token). Prompt tokens (label -100) are not "
                           "distilled (hf_kd.data.prompts makes such rows)."})
    lmbda: float = field(default=1.0, metadata={"help": "on_policy: probability that a micro-batch is the student's "
                         "own generations (1 = fully on-policy, 0 = supervised, between = mixed; seeded per step)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation (sequence_level, on_policy): most tokens "
                                "per completion."})
    generation_temperature: float = field(default=1.0, metadata={"help": "Generation: the SAMPLING temperature of the "
                                          "generated text (0 = greedy); not the loss temperature `temperature`."})
    top_p: float = field(default=1.0, metadata={"help": "Generation: nucleus sampling mass (1 = off)."})
    top_k: int = field(default=0, metadata={"help": "Generation: sample among the k likeliest tokens (0 = off)."})
    generations_reuse: int = field(default=1, metadata={"help": "on_policy: train on one generated micro-batch for "
                                   "this many consecutive optimizer steps (the dataset's batches of the later steps "
                                   "are skipped); 1 = fresh generations every step."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (needs vllm installed and a CUDA GPU; "
                           "refused otherwise)."})
    generation_cache_dir: str | None = field(default=None, metadata={"help": "sequence_level: folder of the cached "
                                             "teacher generations, keyed by teacher, prompts and settings (default: "
                                             "$HF_KD_CACHE, $HF_HOME/hf_kd or ~/.cache/hf_kd, + /teacher_generations)."})
    # cross-tokenizer distillation (hf_kd.data.cross_tokenizer, hf_kd.signals.cross_tokenizer)
    cross_tokenizer: str | None = field(default=None, metadata={"help": "Teacher and student with different "
                                        "tokenizers (causal LMs): 'exact' (KL over the tokens both vocabularies "
                                        "share plus one 'other' bucket) or 'uld' (Universal Logit Distillation: "
                                        "L1 between sorted probability vectors). The text is tokenised by both "
                                        "(hf_kd.data.cross_tokenizer.CrossTokenizerCollator, raw text rows), compared at "
                                        "character-aligned positions. None = one tokenizer (different ones are "
                                        "refused)."})
    cross_tokenizer_weight: float | None = field(default=None, metadata={"help": "Weight of the cross-tokenizer term "
                                                 "(default: kd_weight, with its schedule; the id-by-id logit KD is "
                                                 "not built with cross_tokenizer: it needs one vocabulary)."})

    def __post_init__(self):
        super().__post_init__()
        if not (hasattr(torch, "accelerator") and torch.accelerator.is_available()):
            self.dataloader_pin_memory = False  # nothing to pin for; torch would warn on every dataloader
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}; 1 is plain softmax, "
                             "2-4 is usual")
        for name in ("alpha_task", "kd_weight", "hidden_weight", "relation_weight", "hint_weight",
                     "attention_weight", "at_weight", "input_grad_weight", "great_weight", "feature_grad_weight",
                     "mutual_weight", "self_distill_weight"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        others = ("relation_weight", "hint_weight", "attention_weight", "at_weight", "input_grad_weight",
                  "great_weight", "feature_grad_weight", "mutual_weight", "self_distill_weight")
        if all(getattr(self, n) == 0 for n in others) and all(max(getattr(self, n), getattr(self, f"{n}_end") or 0.0) == 0
                                             for n in ("alpha_task", "kd_weight", "hidden_weight")):  # 0 throughout, schedules included
            raise ValueError("alpha_task, kd_weight and hidden_weight are all 0: nothing to train; set one > 0")
        if self.kd_loss not in LOGIT_LOSSES:
            raise ValueError(f"kd_loss {self.kd_loss!r} unknown; choose one of {sorted(LOGIT_LOSSES)}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss {self.hidden_loss!r} unknown; choose one of {sorted(HIDDEN_LOSSES)}")
        if not 0 <= self.jsd_beta <= 1:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if not 0 <= self.skew_alpha < 1:
            raise ValueError(f"skew_alpha must be in [0, 1), got {self.skew_alpha} (0 = the plain KL; at 1 the skew "
                             "KLs are 0 for every student)")
        for name, allowed in (("kd_positions", KD_POSITIONS), ("kd_impl", KD_IMPLS), ("teacher_placement", TEACHER_PLACEMENTS),
                              ("teacher_dtype", TEACHER_DTYPES), ("nan_policy", NAN_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} unknown; choose one of {list(allowed)}")
        if self.kd_chunk_size < 0:
            raise ValueError(f"kd_chunk_size must be >= 0 (0 = automatic), got {self.kd_chunk_size}")
        parse_layer_map(self.layer_map)  # fail fast on a malformed map
        parse_layer_map(self.attention_layers, unique=False)
        for weight, layers in (("hint_weight", "hint_layers"), ("at_weight", "at_layers"),
                               ("feature_grad_weight", "feature_grad_layers")):
            parse_module_pairs(getattr(self, layers), layers)
            if getattr(self, weight) > 0 and not getattr(self, layers):
                raise ValueError(f"{weight} > 0 needs {layers} ('teacher.module:student.module,...')")
        if self.teacher_weights not in ("uniform", "learned", "confidence", "entropy"):
            try:
                [float(w) for w in self.teacher_weights.split(",")]
            except ValueError:
                raise ValueError(f"teacher_weights {self.teacher_weights!r}: 'uniform', 'learned', 'confidence', "
                                 "'entropy' or comma-separated numbers such as '0.7,0.3'") from None
        if self.mutual_peers < 1:
            raise ValueError(f"mutual_peers must be >= 1, got {self.mutual_peers}")
        if self.self_distill_weight > 0 and not self.self_distill_exits:
            raise ValueError("self_distill_weight > 0 needs self_distill_exits (hidden-state indices, e.g. '1,2')")
        if self.attention_loss not in ("kl", "mse"):
            raise ValueError(f"attention_loss must be 'kl' or 'mse', got {self.attention_loss!r}")
        if not 0.0 <= self.hint_first_stage < 1.0:
            raise ValueError(f"hint_first_stage is a fraction of training in [0, 1), got {self.hint_first_stage}")
        self._check_schedule()
        self._check_data_mode()

    def _check_data_mode(self) -> None:
        from .data.generation import GenerationSettings
        if self.data_mode not in DATA_MODES:
            raise ValueError(f"data_mode {self.data_mode!r} unknown; choose one of {list(DATA_MODES)}")
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda is a probability in [0, 1] (1 = fully on-policy), got {self.lmbda}")
        if self.generations_reuse < 1:
            raise ValueError(f"generations_reuse must be >= 1 (1 = fresh generations every step), got "
                             f"{self.generations_reuse}")
        GenerationSettings.from_config(self)  # max_new_tokens, generation_temperature, top_p, top_k
        if self.data_mode == "supervised":
            return
        if self.teacher_cache is not None or self.teacher_url is not None:
            raise ValueError(f"data_mode={self.data_mode!r} needs the teacher in memory (teacher_model=) to write or "
                             "score new completions; teacher_cache / teacher_url hold targets for fixed tokens only "
                             "(for sequence_level, make the generations with hf_kd.data.generation.teacher_generations "
                             "and train on them with data_mode='supervised')")
        if self.kd_positions == "all":
            raise ValueError(f"data_mode={self.data_mode!r} with kd_positions='all' would distil prompt tokens: use "
                             "'auto' or 'labels' (completion tokens only)")
        if self.data_mode == "on_policy" and self.lmbda > 0 and self.alpha_task > 0:
            warnings.warn("data_mode='on_policy' with alpha_task > 0: the task loss trains the student on its own "
                          "sampled completions as if they were data; GKD uses alpha_task=0 (the teacher's scores "
                          "alone)", stacklevel=3)

    def _check_schedule(self) -> None:
        ends = {name: getattr(self, f"{name}_end") for name in SCHEDULED}
        if self.weight_schedule not in SCHEDULES:
            raise ValueError(f"weight_schedule {self.weight_schedule!r} unknown; choose one of {list(SCHEDULES)}")
        set_ends = [f"{n}_end" for n, v in ends.items() if v is not None]
        if self.weight_schedule == "constant" and set_ends:
            raise ValueError(f"{', '.join(set_ends)} given but weight_schedule='constant': set weight_schedule to "
                             "'linear', 'cosine', 'step' or 'warmup' (or drop the *_end values)")
        if not 0.0 <= self.schedule_at <= 1.0:
            raise ValueError(f"schedule_at must be a fraction of training in [0, 1], got {self.schedule_at}")
        for name, value in ends.items():
            if value is not None and not (math.isfinite(value) and (value > 0 if name == "temperature" else value >= 0)):
                raise ValueError(f"{name}_end must be a finite number {'> 0' if name == 'temperature' else '>= 0'}, "
                                 f"got {value}")
        if ends["temperature"] is not None and (self.teacher_cache is not None or self.teacher_url is not None):
            raise ValueError("temperature_end with teacher_cache / teacher_url: their top-k targets are re-tempered to "
                             "one temperature; drop temperature_end or train online")

    @property
    def layer_pairs(self) -> list[tuple[int, int]] | None:
        return parse_layer_map(self.layer_map)
