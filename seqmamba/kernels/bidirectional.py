"""Fused bidirectional selective scan: one call computes a bidirectional layer's forward (left to right) and
reverse (right to left) scans and returns their sum, with no flipped copies of any activation.

    y = selective_scan(u_f, delta_f, A_f, B_f, C_f, D_f, z_f, bias_f)
      + selective_scan(u_r, delta_r, A_r, B_r, C_r, D_r, z_r, bias_r, reverse=True)

Each direction has its own inputs, as in Caduceus' BiMamba (per-direction conv, x_proj, dt_proj, A, D); an
input shared by both directions (the gate z of tied projections, say) is passed once and gets the sum of both
directions' gradients. On CUDA the reverse direction adds its output into the forward direction's y inside its
last kernel pass (see ``selective_scan/chunk.py``), so the call allocates one output.

Shape letters: b batch, d channels, l length, n state size, g groups.
"""
from __future__ import annotations

import torch

from seqmamba.kernels._dispatch import load_triton_impl, resolve_backend
from seqmamba.kernels.selective_scan import (carry_mask, check_scan_args,
                                             selective_scan_ref)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


_bidirectional_triton = load_triton_impl("seqmamba.kernels.selective_scan.chunk",
                                         "selective_scan_bidirectional_triton")


def split_directions(**inputs):
    """{name: tensor | (fwd, rev) | None} -> (fwd dict, rev dict); a lone tensor is used by both directions.
    A ValueError names an argument given as anything else."""
    fwd, rev = {}, {}
    for name, v in inputs.items():
        if isinstance(v, (tuple, list)):
            if len(v) != 2:
                raise ValueError(f"selective_scan_bidirectional: {name} must be a tensor or a (forward, reverse) "
                                 f"pair, got a sequence of {len(v)}")
            fwd[name], rev[name] = v
        else:
            fwd[name] = rev[name] = v
    return fwd, rev


def selective_scan_bidirectional(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                                 seq_idx=None, backend="auto"):
    """Sum of a forward and a reverse selective scan. Every input is a tensor shared by both directions or a
    ``(forward, reverse)`` pair, with :func:`seqmamba.kernels.selective_scan`'s shapes: u, delta, z (b, d, l);
    A (d, n); B, C (b, n, l) or (b, g, n, l); D, delta_bias (d,). ``seq_idx`` (b, l) packs sequences (the state
    resets where it changes, in both directions). Returns y (b, d, l) in u's dtype (the forward u's).

    ``backend``: "auto" (Triton for fp32/bf16/fp16 CUDA tensors, else the reference), "triton" or "ref". The
    reference is two :func:`selective_scan_ref` calls added. No initial or final states: a bidirectional layer
    sees its whole input at once.
    """
    fwd, rev = split_directions(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    shapes = []
    for direction in (fwd, rev):
        shapes.append(check_scan_args(*(direction[k] for k in NAMES), op="selective_scan_bidirectional"))
        for k in NAMES:
            if (fwd[k] is None) != (rev[k] is None):
                raise ValueError(f"selective_scan_bidirectional: {k} is given for one direction only")
    if shapes[0] != shapes[1] or any(fwd[k] is not None and fwd[k].shape != rev[k].shape for k in NAMES):
        raise ValueError("selective_scan_bidirectional: the two directions' inputs must have the same shapes, got "
                         + ", ".join(f"{k} {tuple(fwd[k].shape)} vs {tuple(rev[k].shape)}" for k in NAMES
                                     if fwd[k] is not None and fwd[k].shape != rev[k].shape))
    b, _, l, _ = shapes[0]
    carry_mask(seq_idx, b, l, False, fwd["u"].device)  # validates seq_idx
    which = resolve_backend("selective_scan_bidirectional", backend, fwd["u"],
                            has_triton_impl=_bidirectional_triton is not None,
                            inputs=tuple(t for d in (fwd, rev) for t in d.values()))
    if which == "triton":
        return _bidirectional_triton(fwd, rev, delta_softplus, seq_idx)
    return bidirectional_ref(fwd, rev, delta_softplus, seq_idx)


def bidirectional_ref(fwd: dict, rev: dict, delta_softplus=False, seq_idx=None):
    """The reference: two :func:`selective_scan_ref` calls (reverse=False / True) added, in u's dtype."""
    y_f = selective_scan_ref(**fwd, delta_softplus=delta_softplus, seq_idx=seq_idx)
    y_r = selective_scan_ref(**rev, delta_softplus=delta_softplus, reverse=True, seq_idx=seq_idx)
    return (y_f.float() + y_r.float()).to(fwd["u"].dtype) if y_f.dtype != torch.float64 else y_f + y_r


__all__ = ["selective_scan_bidirectional", "bidirectional_ref", "split_directions"]
