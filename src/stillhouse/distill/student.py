"""Student initialisation: a layer-pruned copy of the teacher, a fresh random model, or the teacher itself.

Student specs (``stillhouse train --student ...``)::

    pruned:N        keep N of the teacher's layers, evenly spaced, first and last included
                    (SmolLM2-135M has 30 layers; pruned:10 is a third of them, 64M parameters)
    every:K         keep every K-th layer (0, K, 2K, ...)
    layers:I,J,...  keep exactly these layers (0-based, e.g. layers:0,1,2,3,14,15,26,27,28,29)
    fresh           the teacher's architecture, randomly initialised
    fresh:N         the same with N layers
    self            the teacher itself (self-distillation)
    model:SPEC      another local model as it is (bundled:gemma3-270m, hf:DIR, gguf:FILE): of another
                    family it keeps its own tokenizer, so only sequence-level distillation (loss sft on
                    the teacher's text) applies; a student trained before (model:hf:RUN/final) can go on
                    with any loss when its vocabulary is the teacher's (SFT first, then on-policy GKD)

The pruned copy takes the embeddings, final norm and head of the teacher and, for each
kept layer, that layer's weights; it is built with ``from_config`` (so it has no GGUF
quantisation config and ``save_pretrained`` works) and filled with ``load_state_dict``.
Works for decoder-only HF models whose layers are ``model.layers.<i>.*`` (Llama, Qwen,
Mistral, SmolLM ...).

Run ``python -m stillhouse.distill.student bundled pruned:10`` to print the student's size.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal, get_args

StudentKind = Literal["pruned", "every", "layers", "fresh", "self", "model"]
_KINDS = get_args(StudentKind)

_LAYER_KEY = re.compile(r"^(.*\blayers\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class StudentSpec:
    """A parsed ``--student`` value."""

    kind: StudentKind
    value: int = 0
    """pruned: layers kept; every: the stride K; fresh: layers (0 = as many as the teacher)."""
    layers: tuple[int, ...] = ()
    """layers: the teacher layer indices kept, ascending."""
    target: str = ""
    """model: the local model spec (bundled, bundled:NAME, hf:DIR, gguf:FILE)."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"student kind {self.kind!r}: use pruned:N, every:K, layers:I,J,..., fresh, fresh:N, "
                             "self or model:SPEC")
        if self.kind == "layers" and (not self.layers or list(self.layers) != sorted(set(self.layers))
                                      or self.layers[0] < 0):
            raise ValueError(f"student layers:{','.join(map(str, self.layers))}: give distinct layer indices "
                             "in ascending order, e.g. layers:0,1,2,27,28,29")
        if self.kind in ("pruned", "every") and self.value < 1:
            raise ValueError(f"student {self.kind}:{self.value}: the number must be at least 1")
        if self.value < 0:
            raise ValueError(f"student {self.kind}:{self.value}: the number must not be negative")

    def __str__(self) -> str:
        if self.kind == "model":
            return f"model:{self.target}"
        if self.kind == "self" or (self.kind == "fresh" and not self.value):
            return self.kind
        if self.kind == "layers":
            return "layers:" + ",".join(map(str, self.layers))
        return f"{self.kind}:{self.value}"


def parse_student(spec: str) -> StudentSpec:
    """Parse ``pruned:N | every:K | layers:I,J,... | fresh[:N] | self | model:SPEC`` with an error that lists
    the forms."""
    s = spec.strip()
    kind, _, num = s.partition(":")
    if kind not in _KINDS:
        raise ValueError(f"unknown student {spec!r}: use pruned:N (keep N layers), every:K, layers:I,J,... "
                         "(keep those layers), fresh, fresh:N, self or model:SPEC (another local model)")
    if kind == "model":
        from stillhouse.teacher.spec import parse_spec

        try:
            ts = parse_spec(num)
        except ValueError as exc:
            raise ValueError(f"student {spec!r}: {exc}") from exc
        if not ts.is_local:
            raise ValueError(f"student {spec!r}: give a local model, e.g. 'model:bundled:gemma3-270m' or 'model:hf:DIR'")
        return StudentSpec("model", target=str(ts))
    if kind == "layers":
        parts = [x.strip() for x in num.split(",")]
        if not num or not all(x.isdigit() for x in parts):
            raise ValueError(f"student {spec!r}: give comma-separated layer indices, e.g. 'layers:0,1,2,27,28,29'")
        return StudentSpec("layers", layers=tuple(int(x) for x in parts))
    if kind == "self":
        if num:
            raise ValueError(f"student {spec!r}: 'self' takes no number")
        return StudentSpec("self")
    if kind in ("pruned", "every") and not num:
        raise ValueError(f"student {spec!r}: give a number, e.g. '{kind}:10'")
    if num and not num.isdigit():
        raise ValueError(f"student {spec!r}: {num!r} is not a whole number")
    return StudentSpec(kind, int(num or 0))  # type: ignore[arg-type]


def kept_layers(n_layers: int, spec: StudentSpec) -> list[int]:
    """The teacher layer indices a pruned/every student keeps, in order."""
    if spec.kind == "pruned":
        if spec.value > n_layers:
            raise ValueError(f"student pruned:{spec.value}: the teacher has only {n_layers} layers")
        if spec.value == 1:
            return [0]
        return sorted({round(i * (n_layers - 1) / (spec.value - 1)) for i in range(spec.value)})
    if spec.kind == "every":
        return list(range(0, n_layers, spec.value))
    if spec.kind == "layers":
        if spec.layers[-1] >= n_layers:
            raise ValueError(f"student {spec}: the teacher has layers 0..{n_layers - 1}")
        return list(spec.layers)
    raise ValueError(f"student {spec} keeps no subset of layers")


def prune_layers(model: Any, keep: list[int]) -> Any:
    """A fresh model of the same architecture with only the ``keep`` layers of ``model``."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    n = cfg.num_hidden_layers
    if not keep or any(not (0 <= i < n) for i in keep):
        raise ValueError(f"layers to keep {keep} must be a non-empty subset of 0..{n - 1}")
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    _drop_quantization(cfg)
    student = AutoModelForCausalLM.from_config(cfg)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m:
            old = int(m.group(2))
            if old not in new_index:
                continue
            key = f"{m.group(1)}{new_index[old]}{m.group(3)}"
        state[key] = value.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"pruning did not map weights cleanly: missing={missing[:5]} unexpected={unexpected[:5]}")
    if cfg.tie_word_embeddings:
        student.tie_weights()
    return student


def _drop_quantization(cfg: Any) -> None:
    # A GGUF-loaded config may carry a quantization config that blocks save_pretrained.
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")


def make_student(teacher: Any, spec: str | StudentSpec, seed: int = 0) -> Any:
    """Build the student a spec names from a loaded teacher model (the teacher is not modified)."""
    import torch
    from transformers import AutoModelForCausalLM

    st = parse_student(spec) if isinstance(spec, str) else spec
    if st.kind == "model":  # another model as it is; the teacher only teaches through its text
        from stillhouse.distill.modelio import load_causal_lm

        return load_causal_lm(st.target)[0]
    n = teacher.config.num_hidden_layers
    if st.kind in ("pruned", "every", "layers"):
        return prune_layers(teacher, kept_layers(n, st))
    if st.kind == "self":
        return prune_layers(teacher, list(range(n)))  # a clean, saveable copy of every weight
    cfg = copy.deepcopy(teacher.config)
    if st.value:
        cfg.num_hidden_layers = st.value
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [cfg.layer_types[0]] * st.value
    _drop_quantization(cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def count_parameters(model: Any, trainable_only: bool = False) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m stillhouse.distill.student TEACHER_SPEC STUDENT_SPEC")
    from stillhouse.distill.modelio import load_causal_lm

    teacher, _, _ = load_causal_lm(args[0])
    student = make_student(teacher, args[1])
    print(f"teacher {count_parameters(teacher):,} parameters, {teacher.config.num_hidden_layers} layers; "
          f"student {args[1]}: {count_parameters(student):,} parameters, {student.config.num_hidden_layers} layers")


if __name__ == "__main__":
    main()
