"""The kernel API: every op has a PyTorch reference (``*_ref``, exact, runs anywhere) and a public entry point
that dispatches to Triton for CUDA tensors once a kernel exists (``backend="auto" | "triton" | "ref"``,
default overridable by the ``SEQMAMBA_BACKEND`` environment variable)."""
from seqmamba.kernels._dispatch import ROW_ALIGN
from seqmamba.kernels.bidirectional import selective_scan_bidirectional
from seqmamba.kernels.causal_conv1d import (causal_conv1d, causal_conv1d_ref, causal_conv1d_update,
                                            causal_conv1d_update_ref)
from seqmamba.kernels.layernorm_gated import rms_norm_gated, rms_norm_gated_ref
from seqmamba.kernels.selective_scan import selective_scan, selective_scan_ref
from seqmamba.kernels.ssd import ssd_scan, ssd_scan_ref
from seqmamba.kernels.state_update import selective_state_update, selective_state_update_ref

__all__ = [
    "ROW_ALIGN", "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref",
    "rms_norm_gated", "rms_norm_gated_ref", "selective_scan", "selective_scan_bidirectional", "selective_scan_ref",
    "selective_state_update", "selective_state_update_ref", "ssd_scan", "ssd_scan_ref",
]
