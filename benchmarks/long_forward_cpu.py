"""Forward pass of two Mamba(d_model=64) layers over 2^20 tokens on the CPU: peak RSS and time.

Without autograd each layer runs the long input in segments carrying its conv and SSM state, and the
reference scans are chunked, so memory stays linear in the length with a small constant.

    python benchmarks/long_forward_cpu.py [--log2-length 20] [--segment-len 65536]
"""
from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from seqmamba import Mamba


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log2-length", type=int, default=20)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--segment-len", type=int, default=65536)
    args = parser.parse_args()

    torch.manual_seed(0)
    length = 2**args.log2_length
    layers = [Mamba(args.d_model, segment_len=args.segment_len).eval() for _ in range(2)]
    x = torch.randn(1, length, args.d_model)
    baseline = peak_rss_gb()
    start = time.perf_counter()
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
    seconds = time.perf_counter() - start
    assert torch.isfinite(x).all()
    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"| layers | d_model | length | segment | time s | tokens/s | peak RSS GB | RSS before forward GB |")
    print(f"|---|---|---|---|---|---|---|---|")
    print(f"| 2 x Mamba | {args.d_model} | {length:,} | {args.segment_len:,} | {seconds:.1f} | "
          f"{length / seconds:,.0f} | {peak_rss_gb():.2f} | {baseline:.2f} |")


if __name__ == "__main__":
    main()
