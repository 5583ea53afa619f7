"""Block-sparse selection patterns: each returns a :class:`~sparseflash.layouts.BlockLayout` for a layer's q, k.

Use by name through the registry::

    from sparseflash import patterns
    patterns.available()                       # ['dense', 'oracle', 'streaming', 'xattention', ...]
    layout = patterns.select("xattention", q, k, threshold=0.9)
    out = sparseflash.block_sparse_attention(q, k, v, layout)

or call a method's function directly (``patterns.xattention(q, k, ...)``). Each method's docstring says whether
its layout is per query head or per KV head; the registry's ``get(name).heads`` says it too.
"""

# isort: off
from sparseflash.patterns.registry import PatternInfo, available, check_options, get, options_of, register, select

# pattern modules register themselves on import (one line per module)
from sparseflash.patterns import block_max, oracle, power, static, xattention  # noqa: F401
from sparseflash.patterns import minference  # noqa: F401  vertical_slash
from sparseflash.patterns import flexprefill  # noqa: F401  flexprefill
from sparseflash.patterns import pbs  # noqa: F401  permuted
# isort: on

__all__ = ["PatternInfo", "available", "check_options", "get", "options_of", "register", "select"]
