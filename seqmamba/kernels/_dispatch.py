"""One place decides which backend runs a kernel op.

``backend="auto"`` picks Triton for CUDA tensors when the op has a Triton implementation and Triton
imports, and the PyTorch reference otherwise. The environment variable ``SEQMAMBA_BACKEND``
(``auto``, ``triton`` or ``ref``) overrides ``"auto"``; an explicit per-call backend wins over it.
Asking for Triton where it cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Literal

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

Backend = Literal["auto", "triton", "ref"]
BACKENDS = ("auto", "triton", "ref")
ENV_VAR = "SEQMAMBA_BACKEND"


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels take; float64 -> reference
# Rows of a (..., l) tensor start 16-byte aligned, and Triton knows it, only where the row stride is a multiple
# of ROW_ALIGN elements (it specialises integer arguments divisible by 16). Otherwise every row load and store
# of the length-major kernels is scalar: the Mamba-1 scan ran ~6x slower at l = 1,000,003 than at 2^20 (H100,
# session 13). The scan pads such rows (_triton_common.aligned_rows); the modules avoid such lengths.
ROW_ALIGN = 16


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def load_triton_impl(module: str, name: str):
    """``module.name``, the Triton implementation of an op, or None where Triton is missing or fails to import
    (a broken install): the reference still works."""
    if not triton_available():
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # pragma: no cover
        return None


def kernel_module(name: str, importer: str):
    """The Triton kernel module ``name`` (dotted) as seen from the kernel module named ``importer`` (its
    ``__name__``): the package's own module, or, when the importer is a copy run under the Triton interpreter
    (tests/kernels/interpret.py: its name ends in ``__interpreted``), a copy of ``name`` loaded the same way, from
    its file, so that its kernels are interpreted too. That copy is the importer's own: each interpreted load
    brings a fresh interpreted triton, and a jit function called inside a kernel must come from the same one."""
    if not importer.endswith("__interpreted"):
        return importlib.import_module(name)
    key = f"{name}__{importer.replace('.', '_')}"  # ends in __interpreted like the importer
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, importlib.util.find_spec(name).origin)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@torch.compiler.assume_constant_result
def _env_backend() -> str:
    """The SEQMAMBA_BACKEND override (read per call; a constant to torch.compile, so no graph break)."""
    return os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"


def resolve_backend(op: str, backend: str, tensor: torch.Tensor, has_triton_impl: bool,
                    inputs: tuple = ()) -> str:
    """Return ``"triton"`` or ``"ref"`` for one call of ``op`` on ``tensor``'s device.

    ``inputs``: the call's tensors (None allowed). A dtype the kernels do not take (float64) sends "auto" to the
    reference, which is exact in float64, and is an error for an explicit ``backend="triton"``.
    """
    requested = backend
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _env_backend()
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r} is not one of {BACKENDS}")
    if backend == "ref":
        return "ref"
    usable = has_triton_impl and tensor.is_cuda and triton_available()
    if backend == "triton" and not usable:
        why = ("no Triton kernel exists for it yet" if not has_triton_impl
               else "its inputs are not CUDA tensors" if not tensor.is_cuda
               else "triton is not installed")
        raise RuntimeError(f"{op}: the Triton backend was requested but cannot run: {why}")
    if usable and any(t is not None and t.dtype not in TRITON_DTYPES for t in inputs):
        if requested == "triton":
            raise RuntimeError(f"{op}: the Triton backend takes fp32/bf16/fp16 inputs; use backend='ref' for float64")
        return "ref"
    return "triton" if usable else "ref"


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (exactness tests), float32 otherwise (state math in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class EagerCustomOp:
    """A ``torch.library`` custom op that skips the custom-op dispatcher in plain eager calls.

    ``op`` was registered from ``impl`` (and, for a forward op, ``op.register_autograd(backward,
    setup_context=setup_context)``). In plain eager mode ``impl`` runs directly, through an ``autograd.Function``
    built from the same ``setup_context`` and ``backward`` when an input requires grad: the same functions, so the
    same results. Anything that traces (torch.compile, export, AOT autograd's trace of the backward, fake
    tensors, a dispatch mode, torch.func) gets ``op``, one opaque node with its fake implementation.
    Why: on the H100 host a Mamba-1 scan call at a tiny shape took 150 us through the op, 67 of them in the
    dispatcher, and long-sequence inference, which runs the kernels once per segment, left the GPU waiting on
    the host. ``returns_list``: ``op`` returns a list (its backward then takes the output gradients as one
    list)."""

    def __init__(self, op, impl, setup_context=None, backward=None, returns_list=False):
        self.op, self.impl, self.returns_list = op, impl, returns_list
        self.fn = None
        if backward is not None:
            self.fn = type("Eager_" + impl.__name__.lstrip("_"), (torch.autograd.Function,), {
                "forward": staticmethod(lambda *args: _as_tuple(impl(*args))),
                "setup_context": staticmethod(
                    lambda ctx, inputs, output: setup_context(ctx, inputs, list(output) if returns_list else output)),
                "backward": staticmethod(
                    lambda ctx, *grads: backward(ctx, list(grads)) if returns_list else backward(ctx, *grads)),
            })

    def __call__(self, *args):
        if not _plain_eager(args):
            return self.op(*args)
        if self.fn is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            out = self.fn.apply(*args)
            return list(out) if self.returns_list else out
        return self.impl(*args)


def _plain_eager(args) -> bool:
    """Not traced: no torch.compile/export, no dispatch mode (fake tensors, make_fx: AOT autograd traces the
    registered backward outside dynamo; test recorders), no torch.func transform, and only plain tensors."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(a) is torch.Tensor or type(a) is torch.nn.Parameter for a in args if isinstance(a, torch.Tensor))


def _as_tuple(out):
    return tuple(out) if isinstance(out, list) else out
