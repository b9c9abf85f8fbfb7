"""Test helpers shared by the test modules."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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


def assert_all_close(pairs: dict, rtol: float, atol: float = 0.0) -> None:
    """Compare named ``(actual, expected)`` pairs; the failure lists max-abs and relative error of every tensor.

    A tensor fails when it is non-finite, or when both its max-abs error exceeds ``atol`` and its relative
    error (max-abs / max |expected|, floored at 1e-30) exceeds ``rtol``.
    """
    report, bad = [], []
    for name, (actual, expected) in pairs.items():
        actual, expected = actual.detach().double(), expected.detach().double()
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        err = (actual - expected).abs().max().item() if expected.numel() else 0.0
        scale = expected.abs().max().item() if expected.numel() else 0.0
        rel = err / max(scale, 1e-30)
        finite = bool(torch.isfinite(actual).all())
        report.append(f"{name}: max-abs {err:.3e} rel {rel:.3e}{'' if finite else ' NON-FINITE'}")
        if not finite or (err > atol and rel > rtol):
            bad.append(name)
    assert not bad, f"mismatch in {bad} (rtol {rtol:g}, atol {atol:g}): " + "; ".join(report)


def module_outputs_and_grads(module: torch.nn.Module, x: torch.Tensor) -> dict:
    """Run ``module`` on a fresh leaf copy of ``x`` and backpropagate ``sum(y^2)``: {"y", "dx", param name: grad}."""
    xi = x.clone().requires_grad_()
    y = module(xi)
    y.square().sum().backward()
    return {"y": y.detach(), "dx": xi.grad, **{n: p.grad for n, p in module.named_parameters()}}


def outputs_and_grads(fn, x: dict, seed: int = 1) -> dict:
    """``y, h = fn(**x)``; random cotangents for both, drawn on y's device (seeded); backprop
    <y, dy> + <h, dh> to every tensor of ``x``: {"y", "final_state", "d<name>": grad}."""
    y, h = fn(**x)
    g = torch.Generator(device=y.device).manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, device=y.device, dtype=torch.float32).to(y.dtype)
    dh = torch.randn(h.shape, generator=g, device=y.device, dtype=torch.float32).to(h.dtype)
    names = [k for k, v in x.items() if v is not None]
    grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [x[k] for k in names])
    return {"y": y.detach(), "final_state": h.detach(), **{f"d{k}": gr for k, gr in zip(names, grads)}}


class OpRecorder(TorchDispatchMode):
    """Records every aten op that runs under it: ``names`` (their schema names, in order), ``largest`` (the most
    elements of any tensor an op returned) and ``total`` (the elements all ops returned)."""

    def __init__(self):
        super().__init__()
        self.names = []
        self.largest = self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(func._schema.name)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.total += t.numel()
        return out
