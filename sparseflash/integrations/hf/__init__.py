"""transformers models with sparse prefill: :func:`patch` / :func:`unpatch` (see :mod:`.patching`).

* :mod:`.plan`: the patch options, their checks and the per-layer plans (:class:`PatchState`, :class:`LayerPlan`);
* :mod:`.forward`: the attention function a patched model calls and its routes (sparse, dense, decode, sdpa);
* :mod:`.masks`: the SDPA mask builder that keeps the 2-D padding mask, its parsing, the sliding-window mask;
* :mod:`.model`: the model checks that ``patch`` and calibration share;
* :mod:`.patching`: ``patch``, ``unpatch``, ``patched``, ``is_patched``, ``patch_state``.

transformers is imported only when a function needs it, so ``import sparseflash`` works without it.
"""

from sparseflash.integrations.hf.model import SUPPORTED_MODEL_TYPES
from sparseflash.integrations.hf.patching import is_patched, patch, patch_state, patched, unpatch
from sparseflash.integrations.hf.plan import (
    ATTN_NAME,
    BACKENDS,
    DECODE_CHOICES,
    DEFAULT_APPROXIMATE_DROPPED,
    DEFAULT_DENSE_LAST_QUERIES,
    DEFAULT_METHOD,
    DEFAULT_MIN_SPARSE_LEN,
    DENSE,
    SAFE_OPTIONS,
    LayerPlan,
    PatchState,
    check_patch_options,
    with_safe_options,
)

__all__ = [
    "ATTN_NAME",
    "BACKENDS",
    "DECODE_CHOICES",
    "DEFAULT_APPROXIMATE_DROPPED",
    "DEFAULT_DENSE_LAST_QUERIES",
    "DEFAULT_METHOD",
    "DEFAULT_MIN_SPARSE_LEN",
    "DENSE",
    "SAFE_OPTIONS",
    "SUPPORTED_MODEL_TYPES",
    "LayerPlan",
    "PatchState",
    "check_patch_options",
    "is_patched",
    "patch",
    "patch_state",
    "patched",
    "unpatch",
    "with_safe_options",
]
