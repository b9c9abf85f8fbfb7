"""Test helpers shared by the test modules."""
from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Relative error (against the largest reference magnitude) below ``rtol``, with both errors reported."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    max_abs = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e} (max abs {max_abs:.3e})"


def rtol_for(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
