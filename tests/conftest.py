"""Test set-up: Triton's interpreter on machines without a GPU, NaN-poisoned allocations, helpers."""

from __future__ import annotations

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # must be set before triton.jit decorates the kernels (first import of sparseflash's kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sparseflash.ops._interpreter_fix import patch_interpreter_bf16_dot  # noqa: E402

if not HAS_GPU:
    patch_interpreter_bf16_dot()

# relative-error bounds for outputs vs a float64 reference (the device tool's METHOD.md):
# fp32 math lands far under 1e-3, fp16 operands near 1e-3, bf16 operands between 1e-3 and 1e-2
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
LSE_TOL = 1e-3  # absolute, natural log; the lse is accumulated in fp32


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in ``out`` gives inf."""
    if torch.isnan(out).any():
        return float("inf")
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_attention_close(out, lse, ref_out, ref_lse, dtype) -> None:
    """Output within the dtype's relative bound, lse finite exactly where the reference is, and close."""
    err = rel_err(out, ref_out)
    assert err <= REL_TOL[dtype], f"relative error {err:.3e} > {REL_TOL[dtype]:.1e} for {dtype}"
    if lse is not None:
        assert not torch.isnan(lse).any(), "lse has NaN"
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), "lse is -inf on different rows than the reference"
        assert torch.all(lse[~finite] == float("-inf"))
        if finite.any():
            lse_err = (lse.double()[finite] - ref_lse.double()[finite]).abs().max().item()
            assert lse_err <= LSE_TOL, f"lse error {lse_err:.3e} > {LSE_TOL}"
        # rows with nothing to attend are exactly zero
        assert torch.all(out[~finite] == 0)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id, so each case draws its own fresh random inputs.

    The id is taken as ``tests/<file>::<test>[...]`` whatever subfolder the file sits in, so moving a test file
    (the tests mirror the package) does not change its inputs.
    """
    import zlib

    path, _, rest = request.node.nodeid.partition("::")
    g = torch.Generator().manual_seed(zlib.crc32(f"tests/{path.rsplit('/', 1)[-1]}::{rest}".encode()))
    return g


def randn(gen: torch.Generator, *shape: int, dtype=torch.float16, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)


@pytest.fixture
def poison_empty(monkeypatch):
    """Every torch.empty made during the test starts as NaN (or -1 for ints): unwritten outputs fail."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_GPU else "cpu"


@pytest.fixture(scope="session")
def tiny_random():
    """The CLI's ``tiny-random`` model as ``sparseflash.eval.model.load_model`` gives it, on the CPU, built once.

    A ``LoadedModel``: ``.model`` (2-layer random Llama, float32, eval mode; see ``sparseflash.eval.tiny``),
    ``.tokenizer`` (bytes), ``.name`` ``"tiny-random"``. Shared by every test module: a test that patches it uses
    ``patched(...)`` (or unpatches), so it comes back unchanged.
    """
    from sparseflash.eval.model import load_model

    return load_model("tiny-random", device="cpu")


def pytest_collection_modifyitems(config, items):
    """On a GPU machine the interpreter tests (CPU tensors, TRITON_INTERPRET) cannot run: the gpu files cover it."""
    if not HAS_GPU:
        return
    skip = pytest.mark.skip(reason="interpreter test (CPU tensors); on a GPU the tests marked gpu run instead")
    for item in items:
        if "interpret" in item.keywords:
            item.add_marker(skip)
