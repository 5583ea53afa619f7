"""Integrations with other libraries: :mod:`~sparseflash.integrations.hf` (transformers models) and
:mod:`~sparseflash.integrations.models` (the offline catalogue of PyPI-packaged GGUF models).

transformers is imported only when a function needs it, so ``import sparseflash`` works without it.
"""

from sparseflash.integrations.hf import (
    ATTN_NAME,
    DEFAULT_MIN_SPARSE_LEN,
    SUPPORTED_MODEL_TYPES,
    is_patched,
    patch,
    patch_state,
    patched,
    unpatch,
)

__all__ = [
    "ATTN_NAME",
    "DEFAULT_MIN_SPARSE_LEN",
    "SUPPORTED_MODEL_TYPES",
    "is_patched",
    "patch",
    "patch_state",
    "patched",
    "unpatch",
]
