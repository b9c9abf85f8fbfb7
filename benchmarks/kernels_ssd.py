"""SSD (Mamba-2) scan on the GPU: seqmamba's Triton kernels against mamba_ssm's ``mamba_chunk_scan_combined``
side by side in one process, plus the PyTorch reference where it is quick enough.

    python benchmarks/kernels_ssd.py                 # the table (FIELD_NOTES section 1 shapes + 4M tokens)
    python benchmarks/kernels_ssd.py --sweep         # our launch parameters (chunk, block, warps) per shape
    python benchmarks/kernels_ssd.py --shapes 8x2048 # a subset (batch x length, heads 24 x 64, N 128)
    python benchmarks/kernels_ssd.py --resources     # registers / spills per kernel for sm_90, no GPU needed
    python benchmarks/kernels_ssd.py --dtype fp32 --sweep --grid '[{}, {"blk": 32}]' --shapes 2x8192
                                                     # fp32 inputs (IEEE products), two launch variants

mamba_ssm is imported if it is on PYTHONPATH (its pure-Triton SSD files need no build; they are never part of
this project). Inputs as in FIELD_NOTES: bf16 x, dt, B, C (``--dtype``: fp16 or fp32 instead); fp32 A, D (h,),
dt_bias; softplus on; one group; no z. Times are medians of ``triton.testing.do_bench``; fwd+bwd is one forward
under autograd plus the backward of <y, dy>. Extra memory: peak allocated above the inputs (outputs and gradients
included). Floors: bytes (read x, dt, B, C, write y, in the inputs' dtype; fwd+bwd also reads dy and writes dx,
ddt, dB, dC and reads the inputs again) over the measured copy bandwidth, and matrix flops (chunk 256: C B^T, its
product with x, the chunk-state and state-output products, b l h (Q n + Q p + 4 p n); 3x for fwd+bwd) over 700
TFLOP/s.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys

import torch
import triton
from triton.testing import do_bench

from seqmamba.kernels.ssd import ssd_scan_ref
from seqmamba.kernels.ssd import chunk as ours

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception as e:  # noqa: BLE001  (not installed / not on the path)
    mamba_chunk_scan_combined = None
    PEER_ERROR = repr(e)

# (batch, length, heads, headdim, d_state)
SHAPES = [(8, 2048, 24, 64, 128), (4, 16384, 24, 64, 128), (1, 65536, 24, 64, 128), (1, 1 << 20, 24, 64, 128),
          (1, 1 << 20, 8, 64, 16), (1, 1 << 22, 24, 64, 128)]
PEER_MAX_ELEMENTS = 2 ** 31  # mamba_ssm dies with an illegal memory access at 4M tokens (FIELD_NOTES section 1)
REF_MAX_TOKENS = 16384
FLOPS = 700e12


def parse_shape(text):
    v = [int(t) for t in text.split("x")]
    if len(v) not in (2, 5):
        raise SystemExit(f"--shapes: {text!r} is neither BxL nor BxLxHxPxN")
    return tuple(v) if len(v) == 5 else (v[0], v[1], 24, 64, 128)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make(b, l, h, p, n, g=1, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    x = r(b, l, h, p).to(dtype)
    dt = (r(b, l, h) - 2).to(dtype)
    A = -(0.5 + 4 * torch.rand(h, generator=gen, device="cuda"))
    B, C = r(b, l, g, n).to(dtype), r(b, l, g, n).to(dtype)
    D, dt_bias = r(h), 0.5 * r(h)
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias)


def run_ours(inp, tuning=None):
    return ours.ssd_scan_triton(**inp, dt_softplus=True, _tuning=tuning)


def run_peer(inp):
    return mamba_chunk_scan_combined(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 256, D=inp["D"],
                                     dt_bias=inp["dt_bias"], dt_softplus=True)


def run_ref(inp):
    return ssd_scan_ref(**inp, dt_softplus=True)


def fwd_bwd(fn, inp, dy):
    leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
    names = list(leaves)

    def step():
        y = fn(leaves)
        return torch.autograd.grad(y, [leaves[k] for k in names], dy)
    return step


def measure(fn, inp, mode, dy=None):
    """(median ms, extra GB) of fn's forward (no grad) or forward+backward."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(inp)
    else:
        step = fwd_bwd(fn, inp, dy)
    step()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 1e9
    del out
    ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    return ms, extra


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / ms / 1e9  # TB/s (read + write)


def floors(b, l, h, p, n, g, bw, elt=2):
    tokens = b * l
    fwd_bytes = tokens * (2 * h * p + h + 2 * g * n) * elt  # x, y, dt, B, C
    bwd_bytes = fwd_bytes + tokens * (2 * h * p + h + 2 * g * n) * elt  # dy in, dx ddt dB dC out
    flops = tokens * h * (256 * n + 256 * p + 4 * p * n)
    return (max(fwd_bytes / bw / 1e9, flops / FLOPS * 1e3), fwd_bytes,
            max((fwd_bytes + bwd_bytes) / bw / 1e9, 3 * flops / FLOPS * 1e3), fwd_bytes + bwd_bytes)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def oom_safe(f, *a, **k):
    try:
        return f(*a, **k)
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return None


def inputs(b, l, h, p, n, dtype):
    """make()'s inputs and a random dy, both in ``dtype``."""
    return make(b, l, h, p, n, dtype=dtype), torch.randn(b, l, h, p, device="cuda").to(dtype)


def table(shapes, bw, dtype=torch.bfloat16):
    rows = []
    for (b, l, h, p, n) in shapes:
        inp, dy = inputs(b, l, h, p, n, dtype)
        row = dict(shape=f"b{b} l{l} h{h}x{p} n{n}" + ("" if dtype == torch.bfloat16 else f" {dtype}"))
        f_floor, f_bytes, fb_floor, fb_bytes = floors(b, l, h, p, n, 1, bw, dtype.itemsize)
        row.update(floor_fwd=f_floor, floor_fb=fb_floor)
        peer_ok = mamba_chunk_scan_combined is not None and b * l * h * p < PEER_MAX_ELEMENTS
        if peer_ok:
            with torch.no_grad():
                row["err_vs_peer"] = rel(run_ours(inp), run_peer(inp))
        for name, fn, ok in (("ours", run_ours, True), ("peer", run_peer, peer_ok),
                             ("ref", run_ref, b * l <= REF_MAX_TOKENS)):
            if not ok:
                continue
            r = oom_safe(measure, fn, inp, "fwd")
            if r:
                row[f"{name}_fwd"], row[f"{name}_fwd_gb"] = r
            r = oom_safe(measure, fn, inp, "fb", dy)
            if r:
                row[f"{name}_fb"], row[f"{name}_fb_gb"] = r
        if "ours_fwd" in row:
            row["bw_fwd"] = f_bytes / row["ours_fwd"] / 1e9
        if "ours_fb" in row:
            row["bw_fb"] = fb_bytes / row["ours_fb"] / 1e9
        print(json.dumps(row), flush=True)
        rows.append(row)
        del inp, dy
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_table(rows, bw):
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | copy {bw:.2f} TB/s")
    print("| shape | ours fwd ms | mamba_ssm fwd | ratio | ours fwd+bwd ms | mamba_ssm fwd+bwd | ratio | ref fwd / "
          "fwd+bwd | floor fwd / fwd+bwd | TB/s fwd / fwd+bwd | extra GB fwd / fwd+bwd ours | mamba_ssm | "
          "max rel diff vs mamba_ssm |")
    print("|---" * 13 + "|")
    for r in rows:
        g = r.get
        ratio = lambda a, b: fmt(g(a) / g(b), ".2f") if g(a) and g(b) else "-"  # noqa: E731
        print(f"| {r['shape']} | {fmt(g('ours_fwd'))} | {fmt(g('peer_fwd'))} | {ratio('ours_fwd', 'peer_fwd')} | "
              f"{fmt(g('ours_fb'))} | {fmt(g('peer_fb'))} | {ratio('ours_fb', 'peer_fb')} | "
              f"{fmt(g('ref_fwd'), '.1f')} / {fmt(g('ref_fb'), '.1f')} | "
              f"{fmt(g('floor_fwd'))} / {fmt(g('floor_fb'))} | "
              f"{fmt(g('bw_fwd'), '.2f')} / {fmt(g('bw_fb'), '.2f')} | {fmt(g('ours_fwd_gb'), '.2f')} / "
              f"{fmt(g('ours_fb_gb'), '.2f')} | {fmt(g('peer_fwd_gb'), '.2f')} / {fmt(g('peer_fb_gb'), '.2f')} | "
              f"{fmt(g('err_vs_peer'), '.1e')} |")


# module switches of chunk.py (off: the session-2 paths) and launch parameters
LEGACY = dict(HEADS_FIRST=False, STATE_HALF=False, STAGES=2)
SWEEP = [dict(flags=LEGACY), dict(), dict(flags=dict(STAGES=2)), dict(warps_bwd=8), dict(chunk=128)]


def with_flags(flags, f, *a, **k):
    """f(*a, **k) with chunk.py's module switches set to ``flags``, restored afterwards."""
    saved = {name: getattr(ours, name) for name in flags}
    try:
        for name, v in flags.items():
            setattr(ours, name, v)
        return f(*a, **k)
    finally:
        for name, v in saved.items():
            setattr(ours, name, v)


def sweep(shapes, grid=None, dtype=torch.bfloat16):
    """fwd and fwd+bwd times (and fwd+bwd extra memory) of each variant: module switches (``flags``, see
    LEGACY) and launch parameters (chunk, blk, warps, blk_bwd, warps_bwd, splits)."""
    for (b, l, h, p, n) in shapes:
        inp, dy = inputs(b, l, h, p, n, dtype)
        for t in grid or SWEEP:
            t = dict(t)
            flags = t.pop("flags", {})
            fn = lambda i, t=t: run_ours(i, t)  # noqa: E731
            f = with_flags(flags, oom_safe, measure, fn, inp, "fwd")
            fb = with_flags(flags, oom_safe, measure, fn, inp, "fb", dy)
            print(json.dumps(dict(shape=f"b{b} l{l} h{h}x{p} n{n}", dtype=str(dtype),
                                  fp32_matmul=torch.backends.cuda.matmul.fp32_precision, **flags, **t, fwd=f and f[0],
                                  fwd_gb=f and f[1], fb=fb and fb[0], fb_gb=fb and fb[1])), flush=True)
        del inp, dy
        gc.collect()
        torch.cuda.empty_cache()


def profile(shapes, tuning=None, peer=True, dtype=torch.bfloat16):
    """Per-kernel device time of fwd+bwd (ours, then mamba_ssm's unless not ``peer``) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile as prof
    for (b, l, h, p, n) in shapes:
        inp, dy = inputs(b, l, h, p, n, dtype)
        runs = [("ours", lambda i: run_ours(i, tuning))]
        if peer and mamba_chunk_scan_combined is not None:
            runs.append(("mamba_ssm", run_peer))
        for name, fn in runs:
            step = fwd_bwd(fn, inp, dy)
            step()
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA]) as pr:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            print(f"\n== {name} b{b} l{l} h{h}x{p} n{n} (3 fwd+bwd)")
            print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def ab_factor(shapes, dtype=torch.bfloat16):
    """Off-diagonal decay tiles factorised (default) or one exp per pair, same process."""
    for (b, l, h, p, n) in shapes:
        inp, dy = inputs(b, l, h, p, n, dtype)
        for factor in (True, False):
            ours.FACTOR = factor
            f = measure(run_ours, inp, "fwd")[0]
            fb = measure(run_ours, inp, "fb", dy)[0]
            print(json.dumps(dict(shape=f"b{b} l{l} h{h}x{p} n{n}", factor=factor, fwd=f, fb=fb)), flush=True)
        ours.FACTOR = True


def resources(block=None, warps=None, dtype=torch.bfloat16, tf32=False):
    """Registers and spill stack of every kernel compiled for sm_90 (needs no GPU: Triton's ptxas and
    cuobjdump), for bf16 (or fp32: FP32_PREC products, or TF32 ones) inputs with every option on."""
    import triton.language as tl

    from sm90 import compile_sm90, resource_usage

    if dtype == torch.bfloat16:  # bf16 inputs keep the states and G_out in bf16; products on bf16 operands
        half = {"x_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "ypre_ptr", "dy_ptr", "g_ptr", "dx_ptr", "dz_ptr",
                "dt_ptr", "ddt_ptr", "st_ptr", "gst_ptr"}
        dot = dict(DT=tl.bfloat16, PREC="tf32")
    elif dtype == torch.float32:  # fp32 everywhere, FP32_PREC or TF32 products (chunk.py's _dot_dtype)
        half, dot = set(), dict(DT=tl.float32, PREC="tf32" if tf32 else ours.FP32_PREC)
    else:
        raise SystemExit("--resources: --dtype bf16 or fp32")
    blk = block or (ours.BLOCK_FP32[dot["PREC"]] if dtype == torch.float32 else ours.BLOCK)
    w = warps or ours.WARPS
    flags = dict(REVERSE=True, HAS_SEQ=True, Q=ours.CHUNK)
    dots = dict(BLK=blk, BP=64, BN=128, UP=False, **dot)
    run_out_blk = min(ours.RUN_OUT_BLOCK_FP32, blk) if dtype == torch.float32 else blk
    kernels = {
        "_dt_kernel": dict(HAS_BIAS=True, SOFTPLUS=True, REVERSE=True, Q=ours.CHUNK, BH=ours.DT_HEADS),
        "_chunk_state_kernel": dict(**flags, **dots, HEADS_FIRST=ours.HEADS_FIRST),
        "_state_pass_kernel": dict(HAS_H0=True, **flags, BS=ours.STATE_BLOCK, U=ours.STATE_UNROLL),
        "_chunk_state_run_kernel": dict(**flags, **dots, RUN=ours.STATE_RUN),
        "_run_pass_kernel": dict(HAS_H0=True, BS=ours.STATE_BLOCK),
        "_chunk_out_kernel": dict(HAS_D=True, D_HP=False, HAS_Z=True, STORE_PRE=True, **flags, **dots,
                                  FACTOR=ours.FACTOR, HEADS_FIRST=ours.HEADS_FIRST),
        "_chunk_out_pair_kernel": dict(HAS_D=True, D_HP=False, HAS_Z=True, STORE_PRE=True, **flags, **dots,
                                       PREFETCH=ours.OUT_PREFETCH),
        "_run_out_kernel": dict(HAS_D=True, D_HP=False, HAS_Z=True, STORE_PRE=True, **flags,
                                **dict(dots, BLK=run_out_blk), RUN=ours.STATE_RUN, STATES=True),
        "_bwd_gloc_kernel": dict(HAS_Z=True, **flags, **dots, HEADS_FIRST=ours.HEADS_FIRST),
        "_bwd_state_pass_kernel": dict(HAS_DHT=True, **flags, BS=ours.STATE_BLOCK, U=ours.STATE_UNROLL),
        "_bwd_dx_dB_kernel": dict(HAS_D=True, D_HP=False, HAS_Z=True, **flags, **dots, FACTOR=ours.FACTOR,
                                  HEADS_FIRST=ours.HEADS_FIRST),
        "_bwd_dC_kernel": dict(**flags, **dots, HEADS_FIRST=ours.HEADS_FIRST, HB=32),  # 24 heads a program
        "_bwd_ddt_kernel": dict(HAS_BIAS=True, SOFTPLUS=True, REVERSE=True, Q=ours.CHUNK, BH=ours.DT_HEADS),
    }

    def stages(name):
        if name == "_chunk_out_pair_kernel":
            return ours.OUT_STAGES
        if name == "_run_out_kernel":
            return ours.RUN_OUT_STAGES
        return (ours.STAGES_BWD or ours.STAGES) if name.startswith("_bwd") else ours.STAGES

    def warps_of(name):
        if name == "_run_pass_kernel":
            return 4
        return {"_chunk_out_pair_kernel": ours.OUT_WARPS, "_run_out_kernel": ours.RUN_OUT_WARPS}.get(name, w)

    print(f"sm_90, {dtype}, every option, block {blk}, {w} warps, {ours.STAGES} stages ({stages('_bwd')} in the "
          f"backward), triton {triton.__version__}")
    # as the launcher specialises them for contiguous (b, l, h, p) tensors: unit strides are constants, pointers
    # and the other strides and sizes are multiples of 16
    unit = {"sx_p", "sB_n", "sC_n", "sz_p", "ss_l"}
    aligned = {"sx_b", "sx_l", "sB_b", "sB_l", "sC_b", "sC_l", "sz_b", "sz_l", "so_b", "so_l", "hdim", "dstate",
               "Lp", "size", "sx_h", "sz_h", "so_h"}
    for name, consts in kernels.items():
        cubin = compile_sm90(getattr(ours, name), consts, half=half, i64={"seq_ptr"}, aligned=aligned, unit=unit,
                             num_warps=warps_of(name), num_stages=stages(name))
        usage = resource_usage(cubin)
        print(f"  {name:24s} {usage[0]:8s} {usage[1]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of fwd+bwd under torch.profiler")
    ap.add_argument("--no-peer", action="store_true", help="--profile: ours only")
    ap.add_argument("--ab-factor", action="store_true", help="factorised off-diagonal decays on / off")
    ap.add_argument("--resources", action="store_true",
                    help="registers and spills of each kernel compiled for sm_90 (no GPU needed)")
    ap.add_argument("--block", type=int, help="--resources: block of positions (default the kernels')")
    ap.add_argument("--warps", type=int, help="--resources: warps (default the kernels')")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="x, dt, B, C (and dy) dtype")
    ap.add_argument("--tf32", action="store_true", help="fp32 products in TF32 (torch's "
                    "torch.backends.cuda.matmul.fp32_precision = 'tf32'; default chunk.py's FP32_PREC)")
    ap.add_argument("--grid", help="--sweep: a JSON list of launch-parameter dicts (default: SWEEP)")
    ap.add_argument("--shapes", nargs="*", help="BxL (heads 24 x 64, N 128) or BxLxHxPxN items, e.g. 8x2048 "
                                               "1x1048576x8x64x16")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.tf32:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    if args.resources:
        resources(args.block, args.warps, dtype, args.tf32)
        return
    if not torch.cuda.is_available():
        sys.exit("kernels_ssd.py needs a CUDA device")
    shapes = SHAPES if not args.shapes else [parse_shape(s) for s in args.shapes]
    if mamba_chunk_scan_combined is None:
        print(f"mamba_ssm not importable ({PEER_ERROR}): its columns stay empty")
    bw = copy_bandwidth()
    if args.sweep:
        sweep(shapes, json.loads(args.grid) if args.grid else None, dtype)
        return
    if args.profile:
        profile(shapes, peer=not args.no_peer, dtype=dtype)
        return
    if args.ab_factor:
        ab_factor(shapes, dtype)
        return
    print_table(table(shapes, bw, dtype), bw)


if __name__ == "__main__":
    main()
