"""Train a student from teacher data: SFT (sequence-level KD), dense logit KD, top-k KD, or on-policy GKD.

    stillhouse train --data curated.jsonl --teacher bundled --student pruned:10 --loss sft --out runs/s1
    stillhouse train --data curated.jsonl --loss gkd --lmbda 0.5 --beta 0.5 --out runs/g1   # on-policy

What it does, in order:

1. loads the teacher (``stillhouse.teacher.bundled.load_model``) and builds the student
   (``stillhouse.distill.student``: ``pruned:N``, ``every:K``, ``fresh[:N]``, ``self``);
   optionally wraps it with LoRA (peft);
2. tokenizes the data (``stillhouse.distill.data``: assistant-only labels, harvested top-k);
3. trains with AdamW: loss = ``alpha * CE + (1 - alpha) * KD`` where KD is forward KL,
   reverse KL or generalized JSD against the live teacher's logits (``fkl|rkl|jsd``),
   or top-k KD against the harvested top-k logprobs (``topk``); ``sft`` is CE alone; ``gkd`` is
   on-policy distillation (:mod:`stillhouse.distill.onpolicy`: the student's own samples scored by the
   live teacher, white-box, or by a served one through ``POST /v1/score``, black-box).
   Both terms are logged at every step (``metrics.jsonl``) so a KD term too small
   beside CE to matter is visible, not hidden inside one number;
4. writes checkpoints atomically (a temp directory renamed into place, so ``kill -9`` at
   any moment leaves the last complete checkpoint) and resumes from the newest one;
5. exports the final student as an HF directory (``OUT/final``: weights, tokenizer and
   ``train_config.json``) that transformers loads and ``stillhouse serve --teacher hf:OUT/final``
   serves; ``snapshot_at`` also exports ``OUT/snapshots/n<N>`` after N examples, and
   ``export_epochs`` exports ``OUT/epochs/e<K>`` after each epoch K; ``select_on`` (a file of
   validation items) scores each epoch's export on them and makes the best one ``OUT/final``
   (:mod:`stillhouse.distill.select`), so the number of passes is never chosen on the test set.

Data order: the rows are shuffled once with ``seed`` and cut to ``max_examples``; epoch 1
walks that order and later epochs reshuffle. With one epoch and a constant learning
rate, the snapshot after N examples is exactly the model a separate run with
``max_examples=N`` would give (when N is a multiple of the batch size) - a nested grid
over N costs one run.

Layout of OUT::

    train_config.json  metrics.jsonl  checkpoints/step-000120/{state.pt,train_config.json,progress.json}
    snapshots/n1000/   epochs/e2/   final/   selection.json

Exception tree::

    ValueError
    ├── TrainConfigError     a config field is wrong (names the field and the fix)
    └── DataError            (stillhouse.distill.data) a row or file is unusable
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from stillhouse.config import atomic_write_text, config_to_dict, save_config

LossKind = Literal["sft", "fkl", "rkl", "jsd", "topk", "gkd"]


class TrainConfigError(ValueError):
    """A training config field is wrong; the message names the field and the fix."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as JSON beside each checkpoint and export."""

    data: str
    """A .jsonl of rows (curated file or harvest export); see stillhouse.distill.data."""
    out: str
    """Output directory (checkpoints, snapshots, final HF export)."""
    teacher: str = "bundled"
    """Teacher spec (local: bundled, hf:DIR, gguf:FILE). The student is built from it."""
    student: str = "pruned:10"
    """pruned:N (N of the teacher's layers, evenly spaced) | every:K | layers:I,J,... (exactly those) |
    fresh | fresh:N (random init) | self (a copy of the teacher) | model:SPEC (another local model as it is:
    model:bundled:gemma3-270m, another family, loss sft only; or model:hf:DIR, a student trained before, e.g. an
    SFT'd student continued on-policy with loss gkd: logit losses need the teacher's vocabulary)."""
    loss: LossKind = "sft"
    """sft (CE on the teacher's text) | fkl | rkl | jsd (live teacher logits) | topk (harvested) |
    gkd (on-policy: the student's own samples scored by the teacher; see stillhouse.distill.onpolicy)."""
    alpha: float = 0.0
    """Weight of CE in alpha*CE + (1-alpha)*KD for the KD losses; ignored for sft."""
    beta: float = 0.5
    """Generalized-JSD beta (0 = forward KL, 1 = reverse KL)."""
    temperature: float = 1.0
    """KD softening temperature (dense losses; topk softens the student only)."""
    teacher_temperature: float = 1.0
    """The live teacher's own temperature (fkl, rkl, jsd, white-box gkd): the target is
    softmax(teacher_logits / teacher_temperature), on top of ``temperature``. Below 1 sharpens it toward the
    teacher's greedy choice (the token-level counterpart of SFT on greedy answers); 1 = the teacher as it is."""
    lmbda: float = 0.5
    """gkd: probability that a step trains on the student's own samples instead of the data's completions
    (TRL GKDTrainer's lmbda)."""
    gen_temperature: float = 0.9
    """gkd: sampling temperature of the student's on-policy completions (TRL GKDConfig's temperature)."""
    max_new_tokens: int = 128
    """gkd: most tokens the student samples per on-policy completion."""
    score_teacher: str = ""
    """gkd black-box: the teacher's scores come from this spec's Teacher.score, e.g. an OpenAI-compatible
    base URL with POST /v1/score (http://127.0.0.1:8000/v1 from stillhouse serve), instead of the local
    teacher's logits; it must share the student's tokenizer. Empty = white-box."""
    score_top_k: int = 20
    """gkd black-box: top-k logprobs asked at each completion position (0..20). The loss is the generalized
    JSD on those ids, the scored token and a tail bucket; 0 = only the scored tokens' logprobs, with the
    sampled-token reverse KL as the loss."""
    score_concurrency: int = 8
    """gkd black-box: score requests in flight at once."""
    only_correct: bool = False
    """Skip rows whose 'correct' field is false (verified data)."""
    max_examples: int = 0
    """Use the first N rows (after the seeded shuffle when shuffle is on; 0 = all)."""
    shuffle: bool = True
    """Shuffle the rows once with seed before cutting to max_examples. Off: file order, so runs on
    growing prefixes of one file are nested (a larger run can resume from a smaller one)."""
    system_prompt: str | None = None
    """System turn added to rows that have none (None = the chat template's default). The
    student must be served/evaluated with the same one."""
    reasoning: Literal["keep", "drop"] = "keep"
    """The teacher's reasoning in the rows (reasoning_content / reasoning fields, <think> blocks): keep =
    train on it (in the field the student's template renders, else inline before the answer); drop =
    train on the bare answers."""
    epochs: int = 1
    """Passes over the (cut) rows."""
    batch_size: int = 8
    """Rows per optimizer step."""
    micro_batch: int = 0
    """Rows per forward pass (0 = batch_size): each step's gradient is accumulated over the batch's parts,
    each weighted by its share of the batch's loss positions, so the step is the whole batch's (the same
    loss, up to float rounding) in the memory of one part. The self student at batch 8, micro_batch 2: peak
    4,392 MiB against 7,450 (docs/benchmarks.md, Train)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after the warmup: constant, or cosine decay to 0 at the last step."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max gradient norm (0 = no clipping)."""
    max_len: int = 256
    """Tokens per row (prompt + answer); longer rows are cut at the end."""
    seed: int = 0
    """Seed of the row shuffle, the order of epochs after the first, and torch (a fresh student's init)."""
    lora_r: int = 0
    """LoRA rank (0 = full fine-tuning)."""
    freeze_embeddings: bool = False
    """Keep the token embeddings at the init's values (and the LM head when it is tied to them, as in
    SmolLM2). Their gradient is a dense vocab x hidden matrix each step: on the 10-layer student
    (28M of its 64M parameters) freezing them made a batch-10 step 1.24x faster on one CPU thread."""
    lora_alpha: int = 16
    """LoRA scaling (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end of each epoch)."""
    keep_checkpoints: int = 1
    """Newest checkpoints kept in OUT/checkpoints (older ones are deleted)."""
    snapshot_at: tuple[int, ...] = ()
    """Export an HF snapshot after this many examples (first epoch only)."""
    export_epochs: bool = False
    """Export an HF directory OUT/epochs/e<K> at the end of every epoch K (and keep them all)."""
    select_on: str = ""
    """Task items (.jsonl, e.g. from tasks.write_items) that choose the pass: after each epoch the student
    answers them greedily, the task's verifier scores the answers, and OUT/final holds the epoch with the
    most correct (the earliest on a tie), not the last. Scores go to metrics.jsonl and OUT/selection.json;
    an epoch's export is deleted once a better one is checkpointed. Empty = final is the last epoch."""
    select_batch_size: int = 64
    """Prompts per generation batch when scoring select_on."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default). On a shared, busy CPU, 1 is often fastest."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the student trains; auto = cuda when torch sees a GPU, else cpu."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Matmul precision. bf16 = mixed precision (fp32 weights and optimizer, bf16 autocast for
    the forward and backward, losses in fp32). auto = bf16 where the hardware runs it natively
    (a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX, where it measured 1.7-2.3x faster
    than fp32 on the pruned student), else fp32."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (transformers'
    gradient checkpointing, non-reentrant): less memory for more compute. The bundled model as a self student,
    batch 8, max-len 256, fp32 on 2 CPU cores: peak 4,044 MiB against 7,450 (0.54x), at 1.07-1.24x the time
    (docs/benchmarks.md, Train). Same losses and weights as without it."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel for training. auto = eager on the CPU (a batch-10 step of the 10-layer
    student, frozen embeddings, one thread: 0.614 s against 0.779 s with SDPA, 1.27x, interleaved
    in one process), SDPA on a GPU. Training only: the exported HF directory carries no choice, so
    whoever loads it gets transformers' default."""

    def __post_init__(self) -> None:
        if self.loss not in ("sft", "fkl", "rkl", "jsd", "topk", "gkd"):
            raise TrainConfigError(f"loss={self.loss!r}: use sft, fkl, rkl, jsd, topk or gkd")
        if not (0.0 <= self.lmbda <= 1.0):
            raise TrainConfigError(f"lmbda={self.lmbda}: the share of on-policy steps must be in [0, 1]")
        if not (0.0 < self.gen_temperature <= 2.0):
            raise TrainConfigError(f"gen_temperature={self.gen_temperature}: must be in (0, 2], e.g. 0.9")
        if not (0 <= self.score_top_k <= 20):
            raise TrainConfigError(f"score_top_k={self.score_top_k}: must be between 0 and 20")
        if self.score_teacher:
            from stillhouse.teacher.spec import parse_spec

            if self.loss != "gkd":
                raise TrainConfigError(f"score_teacher is for loss=gkd (black-box on-policy), not loss={self.loss}")
            try:
                parse_spec(self.score_teacher)
            except ValueError as exc:
                raise TrainConfigError(f"score_teacher: {exc}") from exc
        if not (0.0 <= self.alpha <= 1.0):
            raise TrainConfigError(f"alpha={self.alpha}: the CE weight must be in [0, 1]")
        if not (0.0 <= self.beta <= 1.0):
            raise TrainConfigError(f"beta={self.beta}: must be in [0, 1]")
        if not (self.temperature > 0):
            raise TrainConfigError(f"temperature={self.temperature}: must be positive")
        if not (self.teacher_temperature > 0):
            raise TrainConfigError(f"teacher_temperature={self.teacher_temperature}: must be positive (1 = as it is)")
        if self.teacher_temperature != 1.0 and (self.loss in ("sft", "topk") or self.score_teacher):
            raise TrainConfigError(f"teacher_temperature={self.teacher_temperature} needs the live teacher's logits "
                                   "(loss fkl, rkl, jsd or white-box gkd); leave it at 1 for sft, topk and "
                                   "score_teacher")
        if self.reasoning not in ("keep", "drop"):
            raise TrainConfigError(f"reasoning={self.reasoning!r}: use keep or drop")
        if self.attention not in ("auto", "sdpa", "eager"):
            raise TrainConfigError(f"attention={self.attention!r}: use auto, sdpa or eager")
        for name in ("epochs", "batch_size", "max_len", "keep_checkpoints", "select_batch_size", "max_new_tokens",
                     "score_concurrency"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.micro_batch > self.batch_size:
            raise TrainConfigError(f"micro_batch={self.micro_batch} is larger than batch_size={self.batch_size}: "
                                   "a micro-batch is a part of the batch (0 = the whole batch at once)")
        for name in ("max_examples", "warmup_steps", "lora_r", "save_every", "threads", "micro_batch"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name}={getattr(self, name)}: must not be negative")
        if not (self.lr > 0):
            raise TrainConfigError(f"lr={self.lr}: must be positive, e.g. 1e-4")
        if self.schedule not in ("constant", "cosine"):
            raise TrainConfigError(f"schedule={self.schedule!r}: use constant or cosine")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TrainConfigError(f"precision={self.precision!r}: use auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"device={self.device!r}: use auto, cpu or cuda")
        if any(n < 1 for n in self.snapshot_at):
            raise TrainConfigError(f"snapshot_at={self.snapshot_at}: example counts must be positive")
        from stillhouse.distill.student import parse_student

        try:
            parse_student(self.student)
        except ValueError as exc:
            raise TrainConfigError(f"student: {exc}") from exc


@dataclass
class TrainResult:
    """What a run produced."""

    out: Path
    final_dir: Path
    steps: int
    examples_seen: int
    tokens_seen: int
    wall_s: float
    last: dict[str, float]
    snapshots: dict[int, Path]
    selection: dict[str, Any] | None = None
    """With select_on: the validation score of every epoch and the chosen one (OUT/selection.json)."""
    peak_memory_mib: float = 0.0
    """The most memory the run held: the process's peak RSS on the CPU, torch's peak allocation on CUDA."""


def peak_memory_mib(device: str) -> float:
    """The process's peak resident memory (CPU) or torch's peak CUDA allocation, in MiB."""
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device='cuda' but torch sees no GPU: use device='auto' or 'cpu'")
    return cfg.device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` where the hardware has native bf16 matmuls, else ``fp32``."""
    import torch

    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def resolve_attention(attention: str, device: str) -> str:
    """``auto`` -> ``eager`` on the CPU (measured faster for short chat rows), ``sdpa`` on a GPU."""
    if attention != "auto":
        return attention
    return "sdpa" if device == "cuda" else "eager"


def autocast(device: str, precision: str) -> Any:
    """The autocast context for ``precision`` (a no-op context for fp32)."""
    import torch

    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_optimizer(params: list[Any], cfg: TrainConfig) -> Any:
    """AdamW, fused where torch has a fused kernel for the device (3.5x faster steps measured
    on the CPU for the 64M student: 0.15 s instead of 0.5 s), else the default foreach one."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.lr


def _order(n: int, seed: int, epoch: int) -> list[int]:
    idx = list(range(n))
    if epoch > 0:
        random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return idx


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "progress.json").exists())


def _save_checkpoint(out: Path, cfg: TrainConfig, model: Any, opt: Any, progress: dict[str, Any]) -> Path:
    import torch

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress['step']:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    trainable = {k: v for k, v in model.state_dict().items()} if not cfg.lora_r else _lora_state(model)
    torch.save({"model": trainable, "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    save_config(cfg, tmp / "train_config.json")
    # progress.json is written last: a directory without it is incomplete and ignored.
    atomic_write_text(tmp / "progress.json", json.dumps(progress, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _lora_state(model: Any) -> dict[str, Any]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def export_hf(model: Any, tok: Any, cfg: TrainConfig, dest: Path, extra: dict[str, Any] | None = None) -> Path:
    """Save the student (LoRA merged) as an HF directory with its tokenizer and config, atomically."""
    dest = Path(dest)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    to_save = model
    if cfg.lora_r:
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_config(cfg, tmp / "train_config.json")
    if extra:
        atomic_write_text(tmp / "train_result.json", json.dumps(extra, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def _apply_lora(model: Any, cfg: TrainConfig) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("LoRA needs peft: pip install 'stillhouse[train]' (or pip install peft)") from exc
    targets = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
               if any(name.endswith(n) for name, _ in model.named_modules())]
    if not targets:
        raise TrainConfigError("lora_r>0 but the student has no q/k/v/o/mlp projections peft can target")
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lc)


def answer_logits(model: Any, input_ids: Any, attention_mask: Any, sel: tuple[Any, Any]) -> Any:
    """Logits ``(1, N, V)`` at the ``N`` selected positions ``sel = (rows, cols)`` only.

    The LM head (49k x 576 in SmolLM2, as big as a third of its layers) then runs on the
    answer positions alone, not on the prompt - most of every sequence here. The logits come
    back in fp32 (also under bf16 autocast), so every loss is computed in fp32. No KV cache: nothing
    decodes after this pass.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[sel].unsqueeze(0).float()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head_logits(head, hidden[sel]).unsqueeze(0).float()


def head_logits(head: Any, hidden: Any) -> Any:
    """``head(hidden)``, with a frozen head's autocast copy made once, not at every call.

    Autocast casts a weight to bf16 at every call unless it requires grad, so a frozen head
    (``freeze_embeddings`` with SmolLM2's tied embeddings: 49,152 x 576) was recast at every
    step: a batch-10 step of the 10-layer student took 0.746 s with the recast and 0.719 s
    without (1.04x, one CPU thread, interleaved); with two such processes side by side, as the
    experiment runs its jobs, 0.60 s against 0.54 s (1.11x). The copy is remade when the weight changes
    (its version counter: an in-place load or update) or moves.
    """
    import torch
    import torch.nn.functional as F

    w = head.weight
    kind = hidden.device.type
    if w.requires_grad or not torch.is_autocast_enabled(kind):
        return head(hidden)
    dtype = torch.get_autocast_dtype(kind)
    key = (w._version, w.data_ptr(), dtype)
    cached = getattr(head, "_stillhouse_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, w.detach().to(dtype))
        head._stillhouse_cast = cached
    bias = head.bias.to(dtype) if getattr(head, "bias", None) is not None else None
    return F.linear(hidden.to(dtype), cached[1], bias)


def loss_positions(labels: Any) -> tuple[Any, Any]:
    """``(rows, cols)`` of the logits that predict a labelled token (col t predicts label t+1)."""
    from stillhouse.distill.losses import IGNORE_INDEX

    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols


def compute_losses(cfg: TrainConfig, logits: Any, batch: dict[str, Any],
                   teacher_logits: Any | None = None) -> tuple[Any, dict[str, float]]:
    """The training loss and its parts (``ce``, ``kd``, as floats for logging).

    ``logits`` (and ``teacher_logits``) are ``(1, N, V)`` at the positions
    :func:`loss_positions` selects from ``batch["labels"]``.
    """
    from stillhouse.distill import losses as L

    rows, cols = loss_positions(batch["labels"])
    targets = batch["labels"][rows, cols + 1].unsqueeze(0)
    mask = targets != L.IGNORE_INDEX
    pure_kd = cfg.loss != "sft" and cfg.alpha == 0.0  # CE is then only logged: keep it out of the backward pass
    ce = L.sft_loss(logits.detach() if pure_kd else logits, targets)
    if cfg.loss == "sft":
        return ce, {"ce": ce.item(), "kd": float("nan")}
    if teacher_logits is not None and cfg.teacher_temperature != 1.0:
        teacher_logits = teacher_logits / cfg.teacher_temperature
    if cfg.loss == "gkd":
        from stillhouse.distill.onpolicy import gkd_loss

        if teacher_logits is None and "top_logprobs" not in batch:
            raise TrainConfigError("loss=gkd needs the live teacher's logits or the scores of score_teacher")
        kd = gkd_loss(cfg, logits, batch, (rows, cols), mask, teacher_logits)
    elif cfg.loss == "topk":
        kd = L.topk_kd(logits, batch["top_ids"][rows, cols + 1].unsqueeze(0),
                       batch["top_logprobs"][rows, cols + 1].unsqueeze(0), mask, cfg.temperature)
    else:
        if teacher_logits is None:
            raise TrainConfigError(f"loss={cfg.loss} needs the live teacher's logits")
        if cfg.loss == "fkl":
            kd = L.forward_kl(logits, teacher_logits, mask, cfg.temperature)
        elif cfg.loss == "rkl":
            kd = L.reverse_kl(logits, teacher_logits, mask, cfg.temperature)
        else:
            kd = L.generalized_jsd(logits, teacher_logits, mask, cfg.beta, cfg.temperature)
    total = L.mix_losses(ce, kd, cfg.alpha)
    return total, {"ce": ce.item(), "kd": kd.item()}


def train(cfg: TrainConfig, *, teacher: tuple[Any, Any, str] | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
          stop_after_steps: int = 0) -> TrainResult:
    """Run (or resume) training as ``cfg`` says. ``teacher`` = a loaded ``(model, tokenizer, revision)``
    (to skip loading); ``stop_after_steps`` ends early without exporting (tests of resume)."""
    import torch

    from stillhouse.distill import select
    from stillhouse.distill.data import DataError, collate, encode_rows
    from stillhouse.distill.modelio import load_causal_lm
    from stillhouse.distill.student import count_parameters, parse_student

    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg)

    lines, rows = _training_rows(cfg)
    sel_items: list[Any] = []
    if cfg.select_on:
        try:
            sel_items = select.load_items(cfg.select_on)
        except (FileNotFoundError, ValueError) as exc:
            raise TrainConfigError(f"select_on: {exc}") from exc
    s_spec = parse_student(cfg.student)
    s_model: Any = None
    t_model: Any = None
    if s_spec.kind == "model":
        s_model, s_tok, _ = load_causal_lm(s_spec.target)
    if s_model is not None and cfg.loss == "sft":  # another model as it is: its own tokenizer reads the text
        t_rev, tok = teacher[2] if teacher is not None else f"text of {cfg.teacher}", s_tok
        rows = [{k: v for k, v in r.items() if k not in ("token_ids", "top_ids", "top_logprobs", "logprobs")}
                for r in rows]  # the teacher's token ids may belong to another vocabulary
    else:
        t_model, tok, t_rev = teacher if teacher is not None else load_causal_lm(cfg.teacher)
        if s_model is not None and s_tok.get_vocab() != tok.get_vocab():
            raise TrainConfigError(f"student={cfg.student} has another vocabulary than the teacher {cfg.teacher}, "
                                   f"so the teacher's logits do not line up with its tokens: use loss=sft "
                                   f"(sequence-level), not loss={cfg.loss}")
    examples = encode_rows(rows, tok, cfg.max_len, source=cfg.data, system_prompt=cfg.system_prompt,
                           reasoning=cfg.reasoning, lines=lines)
    k = 0
    if cfg.loss == "topk":
        k = max((len(p) for e in examples if e.top_ids for p in e.top_ids), default=0)
        if k == 0:
            raise DataError(f"loss=topk but no row of {cfg.data} has top-k logprobs: harvest with "
                            "top_logprobs (e.g. 20) or train with --loss sft")

    student, attention = _student(cfg, s_model, t_model, device)
    need_teacher = cfg.loss in ("fkl", "rkl", "jsd") or (cfg.loss == "gkd" and not cfg.score_teacher)
    scorer = None
    if cfg.loss == "gkd" and cfg.score_teacher:
        from stillhouse.distill.onpolicy import Scorer

        scorer = Scorer(cfg.score_teacher, cfg.score_top_k, cfg.score_concurrency)
    if need_teacher:
        _freeze(t_model.to(device).eval())
    else:
        t_model = None  # not needed on the training path; free it if the caller holds no reference
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    precision = resolve_precision(cfg.precision, device)

    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    state: dict[str, Any] = {"step": 0, "examples_seen": 0, "tokens_seen": 0, "train_s": 0.0, "selection": [],
                             "on_policy_steps": 0, "teacher_scored_tokens": 0}
    if _resume(out, cfg, student, opt, state, device) and sel_items and state["selection"] and not cfg.export_epochs:
        select.prune_epochs(out, keep=select.best_epoch(state["selection"]))  # exports after the checkpoint
    save_config(cfg, out / "train_config.json")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    snapshots: dict[int, Path] = {}
    meta = {"teacher_revision": t_rev, "student_parameters": count_parameters(student),
            "trainable_parameters": count_parameters(student, trainable_only=True), "device": device,
            "precision": precision, "attention": attention}
    atomic_write_text(out / "run_info.json", json.dumps(meta, indent=2))

    bar, task = _progress_bar(total_steps, state["step"]) if progress else (None, None)
    last = _trim_metrics(out / "metrics.jsonl", state["step"])
    try:
        with open(out / "metrics.jsonl", "a") as mf:
            while state["step"] < total_steps:
                step = state["step"]
                epoch, i = divmod(step, steps_per_epoch)
                order = _order(len(examples), cfg.seed, epoch)
                idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                t0 = time.time()
                rows_now = [examples[j] for j in idx]
                on_policy = False
                if cfg.loss == "gkd":
                    rows_now, on_policy = _gkd_rows(cfg, student, tok, rows_now, step, scorer, state)
                micro = cfg.micro_batch or cfg.batch_size
                batches = [{name: t.to(device) for name, t in
                            collate(rows_now[c:c + micro], pad, scorer.k if scorer is not None else k).items()}
                           for c in range(0, len(rows_now), micro)]
                lr = _lr_at(cfg, step, total_steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                loss, parts = _accumulate_gradient(cfg, student, t_model if need_teacher else None, batches,
                                                   device, precision)
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf")))
                opt.step()
                ntok = sum(int(b["attention_mask"].sum()) for b in batches)
                dt = time.time() - t0
                state["step"] += 1
                state["examples_seen"] += len(idx)
                state["tokens_seen"] += ntok
                state["train_s"] += dt
                last = {"step": state["step"], "epoch": epoch, "examples_seen": state["examples_seen"],
                        "loss": loss, **parts, "lr": lr, "grad_norm": gnorm, "tok_per_s": ntok / dt}
                if cfg.loss == "gkd":
                    last.update(on_policy=on_policy, teacher_scored_tokens=state["teacher_scored_tokens"],
                                step_s=dt)
                mf.write(json.dumps(last) + "\n")
                mf.flush()
                if on_step:
                    on_step(last)
                if bar is not None:
                    bar.update(task, completed=state["step"],
                               info=f"loss {last['loss']:.3f} ce {parts['ce']:.3f} kd {parts['kd']:.4f}")
                if epoch == 0 and state["examples_seen"] in cfg.snapshot_at:
                    n = state["examples_seen"]
                    snapshots[n] = export_hf(student, tok, cfg, out / "snapshots" / f"n{n}",
                                             {**meta, **state, "last": last})
                end_of_epoch = state["step"] % steps_per_epoch == 0
                if end_of_epoch and (cfg.export_epochs or sel_items):
                    export_hf(student, tok, cfg, select.epoch_dir(out, epoch + 1), {**meta, **state, "last": last})
                if end_of_epoch and sel_items:
                    _score_pass(out, cfg, tok, sel_items, epoch, state, device, mf)
                if (cfg.save_every and state["step"] % cfg.save_every == 0) or end_of_epoch:
                    _save_checkpoint(out, cfg, student, opt, state)
                if end_of_epoch and sel_items and not cfg.export_epochs:
                    select.prune_epochs(out, keep=select.best_epoch(state["selection"]))
                if stop_after_steps and state["step"] >= stop_after_steps:
                    if not ((cfg.save_every and state["step"] % cfg.save_every == 0) or end_of_epoch):
                        _save_checkpoint(out, cfg, student, opt, state)
                    return TrainResult(out, out / "final", state["step"], state["examples_seen"],
                                       state["tokens_seen"], time.time() - t_start, last, snapshots)
    finally:
        if bar is not None:
            bar.stop()
        if scorer is not None:
            scorer.close()
    selection = None
    peak = peak_memory_mib(device)
    if sel_items:
        final = select.finish(out, state["selection"], cfg.select_on, keep_epochs=cfg.export_epochs)
        selection = {"chosen_epoch": select.best_epoch(state["selection"]), "epochs": state["selection"]}
    else:
        final = export_hf(student, tok, cfg, out / "final",
                          {**meta, **state, "last": last, "peak_memory_mib": round(peak)})
    return TrainResult(out, final, state["step"], state["examples_seen"], state["tokens_seen"],
                       time.time() - t_start, last, snapshots, selection, peak)


def _accumulate_gradient(cfg: TrainConfig, student: Any, t_model: Any, batches: list[dict[str, Any]], device: str,
                         precision: str) -> tuple[float, dict[str, float]]:
    """Backward over the parts of one step's batch, each part's loss weighted by its share of the batch's
    loss positions: every loss is a mean over positions, so the summed gradient is the whole batch's. Returns
    the batch's loss and parts (``ce``, ``kd``) as the same weighted sums."""
    import torch

    sels = [loss_positions(b["labels"]) for b in batches]
    total = sum(len(rows) for rows, _ in sels)
    loss_sum, parts_sum = 0.0, {"ce": 0.0, "kd": 0.0}
    for batch, sel in zip(batches, sels):
        weight = len(sel[0]) / total if total else 1 / len(batches)
        with autocast(device, precision):
            logits = answer_logits(student, batch["input_ids"], batch["attention_mask"], sel)
            t_logits = None
            if t_model is not None:
                with torch.no_grad():
                    t_logits = answer_logits(t_model, batch["input_ids"], batch["attention_mask"], sel)
        loss, parts = compute_losses(cfg, logits, batch, t_logits)
        (loss * weight).backward()
        loss_sum += loss.item() * weight
        parts_sum = {name: parts_sum[name] + parts[name] * weight for name in parts_sum}
    return loss_sum, parts_sum


def _student(cfg: TrainConfig, s_model: Any, t_model: Any, device: str) -> tuple[Any, str]:
    """The student ``cfg`` names (a cut of the teacher, or another model already loaded as ``s_model``),
    embeddings frozen and LoRA applied as asked, on ``device`` in training mode; and its attention kernel."""
    import torch

    from stillhouse.distill.student import make_student

    torch.manual_seed(cfg.seed)
    student = s_model if s_model is not None else make_student(t_model, cfg.student, seed=cfg.seed)
    if cfg.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    attention = resolve_attention(cfg.attention, device)
    student.set_attn_implementation(attention)
    if cfg.gradient_checkpointing:  # transformers >= 5.x names it activation checkpointing; older ones gradient
        enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if cfg.lora_r:
        student = _apply_lora(student, cfg)
    student.to(device).train()
    return student, attention


def _freeze(model: Any) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _score_pass(out: Path, cfg: TrainConfig, tok: Any, sel_items: list[Any], epoch: int, state: dict[str, Any],
                device: str, mf: Any) -> None:
    """Score pass ``epoch + 1``'s export on the validation items; kept in ``state`` and the metrics file."""
    from stillhouse.distill import select

    correct, _ = select.score_pass(select.epoch_dir(out, epoch + 1), tok, sel_items, cfg.system_prompt,
                                   cfg.select_batch_size, device)
    n_sel = len(sel_items)
    state["selection"] = [*state["selection"], {"epoch": epoch + 1, "correct": correct, "n": n_sel,
                                                "acc": round(correct / n_sel, 6)}]
    mf.write(json.dumps({"step": state["step"], "epoch": epoch, "select_correct": correct, "select_n": n_sel}) + "\n")
    mf.flush()


def _training_rows(cfg: TrainConfig) -> tuple[list[int], list[dict[str, Any]]]:
    """The rows ``cfg`` trains on, with their lines in the file: read, only the correct ones if asked,
    shuffled if asked, the first ``max_examples``."""
    from stillhouse.distill.data import read_numbered_rows

    numbered = read_numbered_rows(cfg.data)
    if cfg.only_correct:
        numbered = [(n, r) for n, r in numbered if r.get("correct", True)]
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(numbered)
    if cfg.max_examples:
        if cfg.max_examples > len(numbered):
            raise TrainConfigError(f"max_examples={cfg.max_examples} but {cfg.data} has only {len(numbered)} "
                                   "usable rows")
        numbered = numbered[: cfg.max_examples]
    return [n for n, _ in numbered], [r for _, r in numbered]


def _resume(out: Path, cfg: TrainConfig, student: Any, opt: Any, state: dict[str, Any], device: str) -> bool:
    """Load the latest checkpoint under ``out`` into the student, the optimizer, torch's RNG and ``state``;
    False when there is none."""
    import torch

    ckpts = _checkpoints(out)
    if not ckpts:
        return False
    _check_same_recipe(ckpts[-1], cfg)
    saved = torch.load(ckpts[-1] / "state.pt", map_location=device, weights_only=False)
    _missing, unexpected = student.load_state_dict(saved["model"], strict=not cfg.lora_r)
    if unexpected:
        raise RuntimeError(f"checkpoint {ckpts[-1]} does not fit this student: unexpected {unexpected[:3]}")
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    state.update(json.loads((ckpts[-1] / "progress.json").read_text()))
    return True


# What a resumed run may change: where and how it runs, what it writes, how far it goes (more epochs, more rows
# of a file in its order), and where the data file lies now. Anything else changes what the steps already taken
# would have learnt, so resuming with it would mix two recipes in one student.
_RESUMABLE_CHANGES = frozenset({"data", "out", "epochs", "max_examples", "threads", "device", "save_every",
                                "keep_checkpoints", "snapshot_at", "export_epochs", "select_on",
                                "select_batch_size", "score_concurrency", "gradient_checkpointing", "micro_batch",
                                "attention"})


def _check_same_recipe(ckpt: Path, cfg: TrainConfig) -> None:
    """Refuse to resume ``ckpt`` under a config that trains differently from the one that wrote it."""
    path = ckpt / "train_config.json"
    if not path.exists():  # a checkpoint from before configs were saved beside it
        return
    saved = json.loads(path.read_text())
    now = config_to_dict(cfg)  # as save_config wrote it
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(now)
               if k not in _RESUMABLE_CHANGES and k in saved and now[k] != saved[k]]
    if changed:
        raise TrainConfigError(
            f"{cfg.out} holds a run that trained with other settings ({'; '.join(changed)}): resuming would mix "
            f"two recipes in one student. Rerun with the settings in {path}, or give a new --out to start over")


def _progress_bar(total: int, done: int) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"))
    bar.start()
    return bar, bar.add_task("train", total=total, completed=done, info="")


def _trim_metrics(path: Path, step: int) -> dict[str, Any]:
    """Steps logged after the checkpoint a run resumes from are done again: drop their rows (and a line a kill
    cut short) so the curve has each step once. Returns the last step's row (a resumed run with no steps left
    reports it), or {}."""
    if not path.exists():
        return {}
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return next((row for row in map(json.loads, reversed(kept)) if "loss" in row), {})  # a step, not a score


def _gkd_rows(cfg: TrainConfig, student: Any, tok: Any, rows: list[Any], step: int, scorer: Any,
              state: dict[str, Any]) -> tuple[list[Any], bool]:
    """GKD's batch for ``step``: the student's own samples on an on-policy step (the seed decides which),
    else the data's answers; scored by the black-box teacher when there is one. Counts both in ``state``."""
    from stillhouse.distill import onpolicy

    on_policy = onpolicy.is_on_policy(cfg.seed, step, cfg.lmbda)
    if on_policy:
        rows = onpolicy.sample_completions(student, tok, rows, cfg.max_new_tokens, cfg.gen_temperature,
                                           cfg.seed * 1_000_003 + step, cfg.max_len)
    if scorer is not None:
        rows = scorer.annotate(rows)
    state["on_policy_steps"] += int(on_policy)
    state["teacher_scored_tokens"] += sum(len(onpolicy.completion_ids(e)[1]) for e in rows)
    return rows, on_policy


def config_with(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``cfg`` with fields changed (validated again)."""
    return replace(cfg, **changes)


def describe(cfg: TrainConfig) -> str:
    """One line naming the run."""
    d = asdict(cfg)
    return f"{d['student']} {d['loss']} alpha={d['alpha']} lr={d['lr']} bs={d['batch_size']} epochs={d['epochs']}"
