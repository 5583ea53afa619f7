"""Make Triton 3.6's interpreter compute ``tl.dot`` on bfloat16 operands correctly.

The interpreter (``TRITON_INTERPRET=1``) keeps bf16 tensors as raw 16-bit integers and multiplies those
integers in ``tl.dot``, so every bf16 dot is garbage on the CPU (fp16 and fp32 are right). This widens bf16
operands to float32 first, which is what the GPU's tensor cores compute (bf16 products, fp32 sums).
Installed by the test suite; it changes nothing when kernels run on a GPU.
"""

from __future__ import annotations


def patch_interpreter_bf16_dot() -> bool:
    """Patch the interpreter's dot once; return True if the patch is in place."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton always ships the interpreter
        return False
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_sparseflash_bf16", False):
        return True
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a_data = interpreter._convert_float(a.data, a.dtype, tl.float32, None).view(np.float32)
            b_data = interpreter._convert_float(b.data, b.dtype, tl.float32, None).view(np.float32)
            out = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._sparseflash_bf16 = True
    builder.create_dot = create_dot
    return True
