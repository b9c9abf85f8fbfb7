"""Kernel benchmarks on one GPU: seqmamba's Triton selective scan against the PyTorch reference and, when it
is importable in the same process, mamba_ssm's CUDA kernel; plus the floors from FIELD_NOTES section 1.

    python benchmarks/kernels.py                    # every shape, table printed last
    python benchmarks/kernels.py --quick            # the small shapes only
    python benchmarks/kernels.py --check            # also compare with the reference at every shape
    python benchmarks/kernels.py --e2e              # Caduceus-size backbone: tokens/s and peak memory
    python benchmarks/kernels.py --bidirectional    # fused bidirectional scan and layer vs two calls + flips
    python benchmarks/kernels.py --ssd [ARGS]       # the SSD (Mamba-2) table: benchmarks/kernels_ssd.py ARGS
    python benchmarks/kernels.py --resources        # registers, spills, loop sizes for sm_90; no GPU needed

Times are medians of ``triton.testing.do_bench`` (CUDA events); inputs are random (never zeros), bf16 u, delta,
B, C, z and fp32 A, D, delta_bias, softplus on, z gating on, one group of B/C (the FIELD_NOTES setting).
Bandwidth counts the bytes a perfect kernel must move (inputs read once, outputs written once); the exp rate
counts one exp per (channel, position, state). Memory: fwd_extra_GB is the no-grad forward's peak above the
inputs, fwdbwd_extra_GB the peak of a forward + backward; fwd_graph_GB (the forward under autograd, saved tensors
included) and bwd_extra_GB (the backward's peak above what the forward left) are FIELD_NOTES' split.
``--deterministic`` times the scan's deterministic (tile-state) kernels instead of the default blocked pair.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import sys

import torch

SHAPES = [  # (batch, d_inner, d_state, length); FIELD_NOTES section 1, plus 4M tokens
    (8, 1536, 16, 2048),
    (4, 1536, 16, 16384),
    (1, 1536, 16, 65536),
    (1, 1536, 16, 1 << 20),
    (1, 512, 16, 1 << 20),
    (1, 1536, 16, 1 << 22),
]
# mamba_ssm 2.3.2 on an H100 80GB HBM3 (FIELD_NOTES section 1): fwd ms, bwd ms
MAMBA_SSM_H100 = {
    (8, 1536, 16, 2048): (0.451, 1.847), (4, 1536, 16, 16384): (2.097, 7.525),
    (1, 1536, 16, 65536): (2.216, 7.828), (1, 1536, 16, 1 << 20): (36.26, 125.4),
    (1, 512, 16, 1 << 20): (11.77, 60.07),
}
COPY_TBPS = 3.0e12      # measured device-to-device copy on the H100 (FIELD_NOTES)
EXP_PER_S = 4.2e12      # special-function unit exp rate (FIELD_NOTES)


def make(b, d, n, l, dtype=torch.bfloat16, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dt)  # noqa
    return dict(
        u=r(b, d, l), delta=(r(b, d, l, dt=torch.float32) * 0.5 - 4.0).to(dtype),
        A=-torch.exp(r(d, n, dt=torch.float32) * 0.5), B=r(b, n, l), C=r(b, n, l),
        D=r(d, dt=torch.float32), z=r(b, d, l), delta_bias=r(d, dt=torch.float32) * 0.3)


def floors(b, d, n, l, elt=2):
    pairs = b * d * l
    byte_floor = (4 * pairs + 2 * b * n * l) * elt / COPY_TBPS * 1e3
    exp_floor = pairs * n / EXP_PER_S * 1e3
    return byte_floor, exp_floor


def bench(fn, rep_ms=200):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_shape(shape, args, mamba_fn):
    from seqmamba.kernels.selective_scan import selective_scan, selective_scan_ref
    b, d, n, l = shape
    x = make(b, d, n, l)
    row = {"shape": f"b{b} d{d} n{n} l{l}"}
    kw = dict(delta_softplus=True, return_final_state=True)
    ours = lambda: selective_scan(**x, **kw, backend="triton")  # noqa: E731
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    row["fwd_ms"] = bench(ours)
    row["fwd_extra_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
    y, h = selective_scan(**leaves, **kw, backend="triton")
    dy, dh = torch.randn_like(y), torch.randn_like(h)

    def fwd_bwd():
        y, h = selective_scan(**leaves, **kw, backend="triton")
        torch.autograd.grad((y, h), list(leaves.values()), (dy, dh))
    del y, h
    for v in leaves.values():
        v.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    row["fwdbwd_ms"] = bench(fwd_bwd)
    row["fwdbwd_extra_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    row["fwd_graph_GB"], row["bwd_extra_GB"] = graph_memory(leaves, dy, dh, kw)
    row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
    bf, ef = floors(b, d, n, l)
    row["floor_ms"] = max(bf, ef)
    row["GBps"] = (4 * b * d * l + 2 * b * n * l) * 2 / row["fwd_ms"] / 1e6
    row["Texp_s"] = b * d * l * n / row["fwd_ms"] / 1e9
    if args.check or b * d * l <= (1 << 25):
        with torch.no_grad():
            yt, ht = ours()
            if b * d * l <= (1 << 31):
                yr, hr = selective_scan_ref(**x, **kw)
                row["err_y"], row["err_h"] = rel(yt, yr), rel(ht, hr)
            else:  # the last window of 2^16 positions, started from the Triton state before it
                w = 1 << 16
                xs = {k: (v[..., :-w] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
                _, h_before = selective_scan(**xs, **kw, backend="triton")
                xw = {k: (v[..., -w:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
                yr, hr = selective_scan_ref(**xw, **kw, initial_state=h_before)
                row["err_y"], row["err_h"] = rel(yt[..., -w:], yr), rel(ht, hr)
    if l * b * d <= (1 << 27) and not args.no_ref:
        row["ref_fwd_ms"] = bench(lambda: selective_scan_ref(**x, **kw), rep_ms=100)
    if mamba_fn is not None and b * d * l < (1 << 31):
        try:
            mx = {k: v for k, v in x.items()}
            row["mamba_fwd_ms"] = bench(lambda: mamba_fn(mx["u"], mx["delta"], mx["A"], mx["B"], mx["C"], mx["D"],
                                                          z=mx["z"], delta_bias=mx["delta_bias"],
                                                          delta_softplus=True, return_last_state=True))
        except Exception as e:  # noqa: BLE001
            row["mamba_err"] = repr(e)[:80]
    anchor = MAMBA_SSM_H100.get(shape)
    if anchor:
        row["fieldnotes_fwd_ms"], row["fieldnotes_bwd_ms"] = anchor
        row["fwd_vs_fieldnotes"] = row["fwd_ms"] / anchor[0]
        row["bwd_vs_fieldnotes"] = row["bwd_ms"] / anchor[1]
    return row


def graph_memory(leaves, dy, dh, kw):
    """FIELD_NOTES' memory (GB): the forward's peak under autograd above the inputs, and the backward's peak
    above what the forward left allocated (its outputs and saved tensors): that is, what the backward adds."""
    from seqmamba.kernels.selective_scan import selective_scan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y, h = selective_scan(**leaves, **kw, backend="triton")
    torch.cuda.synchronize()
    fwd = torch.cuda.max_memory_allocated() - base
    after = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad((y, h), list(leaves.values()), (dy, dh))
    torch.cuda.synchronize()
    bwd = torch.cuda.max_memory_allocated() - after
    del grads, y, h
    return fwd / 1e9, bwd / 1e9


def conv_rows():
    """causal_conv1d (width 4, SiLU, bias, bf16): Triton vs the reference (cuDNN depthwise conv via F.conv1d)."""
    from seqmamba.kernels.causal_conv1d import causal_conv1d
    rows = []
    for b, d, l in ((8, 1536, 2048), (1, 1536, 1 << 20)):
        x = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(d, 4, device="cuda", requires_grad=True)
        bias = torch.randn(d, device="cuda", requires_grad=True)
        row = {"conv": f"b{b} d{d} l{l} w4"}
        for be in ("triton", "ref"):
            f = lambda: causal_conv1d(x, w, bias, activation="silu", backend=be)  # noqa: E731
            row[f"{be}_fwd_ms"] = bench(f)
            y = f()
            dy = torch.randn_like(y)
            row[f"{be}_fwdbwd_ms"] = bench(lambda: torch.autograd.grad(f(), (x, w, bias), dy))
        row["GBps_fwd"] = 2 * b * d * l * 2 / row["triton_fwd_ms"] / 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# Caduceus-PS reference (FIELD_NOTES section 1, one H100 80GB, mamba_ssm kernels, no checkpointing):
# (mode, length) -> (batch, tokens/s, peak GB); None where it ran out of memory at batch 1.
CADUCEUS_H100 = {("train", 131072): (2, 198350, 77.9), ("train", 1 << 20): None,
                 ("infer", 1 << 20): (4, 847760, 78.2), ("infer", 1 << 22): (1, 827820, 78.2)}


def _is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def e2e_step(model, batch, length, width, mode, device):
    """One step of the backbone on random hidden states (b, l, width) under bf16 autocast: forward + backward
    of a mean-square loss ("train") or a no-grad forward ("infer")."""
    x = torch.randn(batch, length, width, device=device, requires_grad=mode == "train")
    with torch.autocast(device, dtype=torch.bfloat16):
        if mode == "train":
            model(x).float().square().mean().backward()
        else:
            with torch.no_grad():
                model(x)


def e2e_measure(model, batch, length, width, mode, device, reps):
    """(seconds per step, peak GB) of ``reps`` steps after one warm-up step; raises on out-of-memory."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        e2e_step(model, batch, length, width, mode, device)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            e2e_step(model, batch, length, width, mode, device)
        sync()
        sec = (time.perf_counter() - t0) / max(reps, 1)
    finally:
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
    return sec, peak


def e2e_rows(lengths=(1024, 131072, 1 << 20), infer_extra=(1 << 22,), d_model=256, n_layer=16,
             max_tokens=1 << 20, reps=2, device="cuda", backend="auto", budget_gb=None):
    """Caduceus-size backbone (d_model 256, 16 BiMamba layers, RCPS: hidden width 2 * d_model) under bf16
    autocast: a training step (forward + backward of the backbone on random hidden states; no embedding or LM
    head, which are tiny at this vocabulary) and inference, tokens/s and peak memory.

    Per (mode, length): batch 1 without activation checkpointing, or with it if that runs out of memory;
    the batch is then raised to the largest power of two that the batch-1 peak predicts to fit in
    ``budget_gb`` (default 90% of the GPU), at most ``max_tokens`` tokens, halving on out-of-memory."""
    from seqmamba.backbone import MambaBackbone
    from seqmamba.config import BackboneConfig
    if budget_gb is None:
        budget_gb = 0.9 * torch.cuda.get_device_properties(0).total_memory / 1e9 if device == "cuda" else 1.0
    width = 2 * d_model
    rows = []
    for mode in ("train", "infer"):
        for length in (*lengths, *(infer_extra if mode == "infer" else ())):
            row = dict(mode=mode, length=length, batch=0, error="out of memory at batch 1")
            for ckpt in ((False, True) if mode == "train" else (False,)):
                cfg = BackboneConfig(d_model=d_model, n_layer=n_layer, bidirectional=True, rcps=True,
                                     checkpoint_activations=ckpt)
                model = MambaBackbone(cfg, backend=backend).to(device).train(mode == "train")
                try:
                    sec, peak = e2e_measure(model, 1, length, width, mode, device, reps=0)
                except Exception as e:  # noqa: BLE001
                    if not _is_oom(e):
                        raise
                    del model
                    continue
                batch = 1
                if peak == peak:  # predicted from the batch-1 peak (linear in the batch)
                    while batch * 2 * length <= max_tokens and peak * batch * 2 <= budget_gb:
                        batch *= 2
                while batch >= 1:
                    try:
                        sec, peak = e2e_measure(model, batch, length, width, mode, device, reps=reps)
                        break
                    except Exception as e:  # noqa: BLE001
                        if not _is_oom(e):
                            raise
                        batch //= 2
                del model
                row = dict(mode=mode, length=length, batch=batch, ckpt=ckpt, s_per_step=sec,
                           tokens_per_s=batch * length / sec, peak_GB=peak)
                ref = CADUCEUS_H100.get((mode, length), "-")
                row["caduceus_ref"] = "OOM" if ref is None else ref
                break
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def with_layout(x, layout):
    """Same values, other strides: "bdl" (every (b, d, l) / (b, n, l) tensor contiguous along l), "module"
    (what Mamba passes: u along l; delta, z channel-last, B, C state-last, as views of (b, l, .) tensors) or
    "bld" (all channel-last)."""
    def last(t):  # (b, c, l) values held as a contiguous (b, l, c) tensor
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    keys = {"bdl": (), "module": ("delta", "z", "B", "C"), "bld": ("u", "delta", "z", "B", "C")}[layout]
    return {k: (last(v) if k in keys else v) for k, v in x.items()}


def layout_rows(shapes=((8, 1536, 16, 2048), (1, 1536, 16, 65536), (1, 1536, 16, 1 << 20))):
    """Forward time of the tile-state forward kernels and of the default (blocked), and fwd+bwd time of the
    default and of the tile-state kernels (``_tuning={}``), for each input layout."""
    from seqmamba.kernels.selective_scan.chunk import selective_scan_triton
    rows = []
    for shape in shapes:
        base = make(*shape)
        for layout in ("bdl", "module", "bld"):
            x = with_layout(base, layout)
            row = dict(shape=str(shape), layout=layout)
            for kern in ("scan", "seq"):
                row[f"fwd_{kern}_ms"] = bench(lambda: selective_scan_triton(
                    **x, delta_softplus=True, return_final_state=True, _tuning=dict(fwd_kernel=kern)), rep_ms=100)
            row["fwd_blocked_ms"] = bench(lambda: selective_scan_triton(
                **x, delta_softplus=True, return_final_state=True), rep_ms=100)
            leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
            for name, tuning in (("fwdbwd_ms", None), ("fwdbwd_tile_ms", {})):
                def f():
                    y, h = selective_scan_triton(**leaves, delta_softplus=True, return_final_state=True,
                                                 _tuning=tuning)
                    torch.autograd.backward((y, h), (y.detach(), h.detach()))
                row[name] = bench(f, rep_ms=100)
            del leaves
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _timed_pair(f, leaves, rep_ms=100):
    """(forward ms, forward+backward ms) of f() -> tensor, backward with a fixed random cotangent."""
    with torch.no_grad():
        fwd_ms = bench(f, rep_ms=rep_ms)
    y = f()
    dy = torch.randn_like(y)
    del y

    def fb():
        torch.autograd.grad(f(), leaves, dy)
    return fwd_ms, bench(fb, rep_ms=rep_ms)


def bidirectional_rows(scan_shapes=((8, 1536, 16, 2048), (1, 1536, 16, 1 << 18)),
                       layer_shapes=((8, 2048, 768), (2, 131072, 256))):
    """The fused bidirectional scan / layer against two single-direction ones plus flips (Caduceus style),
    same run. Scan: selective_scan_bidirectional vs flip(inputs) -> scan -> flip(output), twice, added (and vs
    two reverse-capable calls added, no flips). Layer (b, l, d_model, bf16 autocast): BiMamba with tied
    projections (fused scan) vs Caduceus' wrapper: mamba_fwd(x) + mamba_rev(x.flip(1)).flip(1) with tied
    in/out projections."""
    from seqmamba.bimamba import BiMamba
    from seqmamba.kernels.bidirectional import selective_scan_bidirectional
    from seqmamba.kernels.selective_scan import selective_scan
    from seqmamba.mamba import Mamba
    rows = []
    for b, d, n, l in scan_shapes:
        xf, xr = make(b, d, n, l, seed=1), make(b, d, n, l, seed=2)
        lf = {k: v.requires_grad_() for k, v in xf.items()}
        lr = {k: v.requires_grad_() for k, v in xr.items()}
        leaves = [*lf.values(), *lr.values()]
        seqk = ("u", "delta", "z", "B", "C")

        def fused():
            return selective_scan_bidirectional(**{k: (lf[k], lr[k]) for k in lf}, delta_softplus=True)

        def flips():
            yr = selective_scan(**{k: (v.flip(-1) if k in seqk else v) for k, v in lr.items()}, delta_softplus=True)
            return selective_scan(**lf, delta_softplus=True) + yr.flip(-1)

        def two_calls():
            return selective_scan(**lf, delta_softplus=True) + selective_scan(**lr, delta_softplus=True,
                                                                                 reverse=True)
        row = dict(bidir_scan=f"b{b} d{d} n{n} l{l}")
        for name, f in (("fused", fused), ("flips", flips), ("two_calls", two_calls)):
            row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = _timed_pair(f, leaves)
        with torch.no_grad():
            row["err_fused_vs_flips"] = rel(fused().float(), flips().float())
        for k in ("fwd", "fwdbwd"):
            row[f"ratio_{k}"] = row[f"fused_{k}_ms"] / row[f"flips_{k}_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del lf, lr, leaves, xf, xr
        torch.cuda.empty_cache()
    for b, l, dm in layer_shapes:
        torch.manual_seed(0)
        bi = BiMamba(dm).cuda()
        m_f, m_r = Mamba(dm).cuda(), Mamba(dm).cuda()
        for name in ("in_proj", "out_proj"):
            getattr(m_r, name).weight = getattr(m_f, name).weight
        x = torch.randn(b, l, dm, device="cuda", requires_grad=True)
        params = [x, *bi.parameters()]

        def layer(fn):
            def f():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return fn()
            return f

        def caduceus():
            return m_f(x) + m_r(x.flip(1)).flip(1)

        def bimamba(fused_scan):  # forced both ways: BiMamba's default fuses only without autograd
            def f():
                bi.fused_scan = fused_scan
                return bi(x)
            return f
        row = dict(bidir_layer=f"b{b} l{l} d_model{dm}")
        for name, f, ps in (("fused", layer(bimamba(True)), params), ("unfused", layer(bimamba(False)), params),
                            ("caduceus", layer(caduceus), [x, *m_f.parameters(), *m_r.parameters()])):
            row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = _timed_pair(f, ps)
        for k in ("fwd", "fwdbwd"):
            row[f"ratio_{k}"] = row[f"fused_{k}_ms"] / row[f"caduceus_{k}_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del bi, m_f, m_r, x, params
        torch.cuda.empty_cache()
    return rows


def module_sweep():
    """Tunings of the sequential forward kernel on the mixer's layout (channel-last delta/z/y), and its single
    pass (one chunk) against the chunked one."""
    cfgs = [dict(fwd_kernel="seq", bd_fwd=bd, warps_fwd=w, programs=p) for bd in (64, 128, 256)
            for w in (2, 4, 8) for p in (1024, 2048) if 1 <= bd // (32 * w) <= 4]
    for shape in ((8, 1536, 16, 2048), (1, 1536, 16, 1 << 20)):
        x = with_layout(make(*shape), "module")
        cf = cfgs if shape[0] == 1 else [c for c in cfgs if c["programs"] == 1024]
        if shape[0] == 1:
            cf = cf + [dict(fwd_kernel="seq", bd_fwd=bd, warps_fwd=w, fwd_chunks=1) for bd, w in ((8, 1), (16, 1), (32, 1))]
        sweep(shape, cf, x=x)


def seqt_rows(shapes=((8, 1536, 16, 2048), (1, 1536, 16, 65536), (1, 1536, 16, 1 << 20))):
    """The two sequential forward kernels side by side (state as (channels, n): "seq"; as (n, channels):
    "seqt"), in the mixer's layout and in (b, d, l)-contiguous inputs, forward and forward+backward."""
    rows = []
    cfgs = [dict(fwd_kernel="seq"), dict(fwd_kernel="seqt"), dict(fwd_kernel="seqt", programs=2048),
            dict(fwd_kernel="seqt", programs=4096), dict(fwd_kernel="seqt", bd_fwd=64, warps_fwd=2),
            dict(fwd_kernel="seqt", bd_fwd=128, warps_fwd=4)]
    for shape in shapes:
        base = make(*shape)
        for layout in ("module", "bdl"):
            x = with_layout(base, layout)
            for cfg in cfgs if layout == "module" else cfgs[:2]:
                ms, _ = sweep(shape, [cfg], x=x)
                rows.append(dict(shape=str(shape), layout=layout, cfg=str(cfg), fwd_ms=ms))
            if layout == "module":
                for cfg in cfgs[:2] + [dict(fwd_kernel="seqt", bwd_kernel="seq")]:
                    ms, _ = sweep(shape, [cfg], bwd=True, x=x)
                    rows.append(dict(shape=str(shape), layout=layout, cfg=str(cfg), fwdbwd_ms=ms))
        del base, x
        torch.cuda.empty_cache()
    print("\n| shape | layout | config | fwd ms | fwd+bwd ms |")
    for r in rows:
        print(f"| {r['shape']} | {r['layout']} | {r['cfg']} | {r.get('fwd_ms', '-')} | {r.get('fwdbwd_ms', '-')} |")
    return rows


def sweep(shape, configs, bwd=False, x=None):
    """Time the Triton forward (or forward+backward) of one shape under several tunings; print one line each."""
    from seqmamba.kernels.selective_scan.chunk import selective_scan_triton
    x = make(*shape) if x is None else x
    leaves = {k: v.detach().requires_grad_(bwd) for k, v in x.items()}
    out = []
    for cfg in configs:
        try:
            if bwd:
                def f():
                    y, h = selective_scan_triton(**leaves, delta_softplus=True, return_final_state=True, _tuning=cfg)
                    torch.autograd.backward((y, h), (y.detach(), h.detach()))
            else:
                def f():
                    return selective_scan_triton(**x, delta_softplus=True, return_final_state=True, _tuning=cfg)
            ms = bench(f, rep_ms=100)
        except Exception as e:  # noqa: BLE001
            ms = float("nan")
            print("config failed", cfg, repr(e)[:200])
        out.append((ms, cfg))
        print(f"sweep {'fwd+bwd' if bwd else 'fwd'} {shape} {cfg} {ms:.3f} ms", flush=True)
    best = min(out, key=lambda r: r[0] if r[0] == r[0] else 1e9)
    print(f"BEST {'fwd+bwd' if bwd else 'fwd'} {shape}: {best[0]:.3f} ms {best[1]}", flush=True)
    return best


def print_e2e(rows):
    cols = ["mode", "length", "batch", "ckpt", "s_per_step", "tokens_per_s", "peak_GB", "caduceus_ref", "error"]
    print("\n| " + " | ".join(cols) + " |")
    for r in rows:
        print("| " + " | ".join((f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")))
                                for c in cols) + " |")


def resources():
    """Registers, spill stack and the per-state loop's SASS instruction count of the blocked selective-scan
    kernels compiled for sm_90 (no GPU needed), as launched for bf16 inputs at b1 d1536 (softplus, z, D,
    delta_bias; one group), with the chunk/warps configurations blocked_fwd and chunk.py pick (the forward's
    registers capped as its launch caps them; B/C loads masked, as at 2^20 positions), and the backward at two
    channels a program, as from 2048 rows (positions: (channel, position) pairs a thread)."""
    import triton
    from sm90 import compile_sm90, innermost_loop, resource_usage

    from seqmamba.kernels.selective_scan import blocked_bwd, blocked_fwd, chunk

    half = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "y_ptr"}
    # the launch specialises these: l-strides of y and seq_idx are 1, one group; the rest are multiples of 16
    unit = {"sy_l", "ss_l", "ngroups"}
    aligned = {"su_b", "su_d", "sdl_b", "sdl_d", "sB_b", "sB_g", "sB_n", "sC_b", "sC_g", "sC_n", "sz_b", "sz_d",
               "so_b", "so_d", "sy_b", "sy_d", "ss_b", "dim", "nstate", "seqlen", "cpg", "n_chunks", "n_saved"}
    opts = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, REVERSE=False, HAS_SEQ=False, PADDED=False,
                BN=16)
    fwd = dict(HAS_H0=False, ACCUM=False, UNROLL=blocked_fwd.UNROLL, PAIRS=True, PREFETCH=True, BC_FULL=False,
               **opts)
    T, warps = blocked_fwd.default_plan(1536)
    nt, v = blocked_fwd.tile_layout(T, warps, 2, T)
    rows = [("forward, no grad", blocked_fwd._blocked_fwd_kernel, warps,
             dict(fwd, SAVE_STATES=False, S=T, BD=1, T=T, NT=nt, V=v), blocked_fwd.MAXNREG)]
    T, S = chunk._grad_lengths({}, 1536, False, torch.device("cpu"))  # off the GPU: an H100's 132 SMs
    nt, v = blocked_fwd.tile_layout(T, warps, 2, S)
    rows.append(("forward under autograd", blocked_fwd._blocked_fwd_kernel, warps,
                 dict(fwd, SAVE_STATES=True, S=S, BD=1, T=T, NT=nt, V=v), blocked_fwd.MAXNREG))
    for S, bd in sorted({(s, 1) for _, s in chunk.GRAD_STATE_LENS} | {(128, 2)}):
        w = blocked_bwd.default_warps(S)
        v = blocked_bwd.positions_per_thread(S, w, 2)
        rows.append((f"backward, chunk {S}" + (f", {bd} channels" if bd > 1 else ""), blocked_bwd._blocked_bwd_kernel,
                     w, dict(opts, BD=bd, T=S, NT=S // v, V=v, DA_PARTIALS=w > 1, HINTS=w == 1,
                             GATHER=blocked_bwd._gather(None, False, v, bd),
                             SHIFT=blocked_bwd._shift_decays(None, S // v),
                             WHOLE=blocked_bwd._whole_chunks(None, 1 << 20, S, bd)),
                     blocked_bwd.default_maxnreg(S, w, bd)))
    print(f"sm_90, bf16, triton {triton.__version__}; loop = the per-state loop, SASS instructions (top opcodes)")
    for name, fn, warps, consts, maxnreg in rows:
        cubin = compile_sm90(fn, consts, half=half, i64={"seq_ptr"}, aligned=aligned, unit=unit, num_warps=warps,
                             maxnreg=maxnreg)
        regs, stack = resource_usage(cubin)
        n, ops = innermost_loop(cubin)
        positions = consts["T"] // (32 * warps) * consts["BD"]
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(5))
        print(f"  {name:30s} {warps} warps {regs:8s} {stack:10s} loop {n} for {positions} positions ({top})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--ssd"]:  # the Mamba-2 SSD table lives in its own script; the rest of argv goes to it
        from kernels_ssd import main as ssd_main
        return ssd_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="--ssd [ARGS]: the SSD (Mamba-2) benchmark, benchmarks/kernels_ssd.py ARGS")
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--check", action="store_true", help="compare with the reference at every shape")
    p.add_argument("--no-ref", action="store_true", help="skip timing the PyTorch reference")
    p.add_argument("--shapes", default=None, help="indices into SHAPES, comma separated")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--sweep", action="store_true", help="time tunings of the Triton scan instead")
    p.add_argument("--grid", help="time these tunings, forward and forward+backward, at --shapes (default 0,3): a "
                                  "JSON list of selective_scan_triton _tuning dicts, e.g. '[{\"blocked\": true}, "
                                  "{\"blocked\": true, \"state_len\": 256, \"maxnreg_bwd\": 168}]'")
    p.add_argument("--e2e", action="store_true",
                   help="Caduceus-size backbone training/inference tokens/s and peak memory instead")
    p.add_argument("--bidirectional", action="store_true", help="fused bidirectional scan and layer rows only")
    p.add_argument("--sweep-module", action="store_true", help="sequential kernel tunings on the mixer's layout")
    p.add_argument("--e2e-lengths", default=None, help="with --e2e: these lengths only (comma separated)")
    p.add_argument("--seqt", action="store_true", help="the two sequential forward kernels side by side")
    p.add_argument("--layouts", action="store_true", help="forward/backward time per input memory layout")
    p.add_argument("--compare-fwd", action="store_true", help="the two forward kernels side by side")
    p.add_argument("--sweep-seq", action="store_true", help="time the sequential forward kernel's tunings")
    p.add_argument("--sweep-programs", action="store_true", help="time grid-size targets instead")
    p.add_argument("--resources", action="store_true",
                   help="registers, spills and per-state loop size of the blocked kernels for sm_90 (no GPU needed)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch deterministic mode: the scan runs the tile-state kernels instead of the blocked pair")
    args = p.parse_args(argv)
    if args.resources:
        resources()
        return
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.e2e:
        lengths = [int(v) for v in args.e2e_lengths.split(",")] if args.e2e_lengths else None
        rows = e2e_rows(lengths, infer_extra=()) if lengths else e2e_rows()
        print_e2e(rows)
        return
    if args.bidirectional:
        bidirectional_rows()
        return
    if args.sweep_module:
        module_sweep()
        return
    if args.seqt:
        seqt_rows()
        return
    if args.layouts:
        layout_rows()
        return
    if args.compare_fwd:
        for shape in ((8, 1536, 16, 2048), (1, 1536, 16, 65536), (1, 1536, 16, 1 << 20)):
            sweep(shape, [dict(fwd_kernel="scan"), dict(fwd_kernel="seq"), dict(fwd_kernel="seq", programs=512)])
        return
    if args.sweep_seq:
        from seqmamba.kernels.selective_scan import selective_scan_ref
        from seqmamba.kernels.selective_scan.chunk import selective_scan_triton
        x = make(8, 1536, 16, 2048)
        yr = selective_scan_ref(**x, delta_softplus=True)
        cfgs = [dict(fwd_kernel="seq", bd_fwd=bd, warps_fwd=w) for bd in (32, 64, 128, 256) for w in (1, 2, 4, 8)
                if bd // (32 * w) <= 4]
        for c in cfgs:
            yt = selective_scan_triton(**x, delta_softplus=True, _tuning=c)
            print("err", c, rel(yt, yr))
        best = sweep((8, 1536, 16, 2048), cfgs)
        best2 = sweep((1, 1536, 16, 65536), [dict(c, programs=p) for c in cfgs for p in (512, 2048)
                                             if c["bd_fwd"] >= 64])
        sweep((1, 1536, 16, 1 << 20), [best2[1], dict(best2[1], programs=4 * best2[1]["programs"])])
        return
    if args.sweep_programs:
        for shape in ((8, 1536, 16, 2048), (1, 1536, 16, 65536), (1, 1536, 16, 1 << 20)):
            sweep(shape, [dict(programs=p) for p in (2048, 8192, 32768)])
            sweep(shape, [dict(programs_bwd=p) for p in (2048, 8192, 32768)], bwd=True)
        return
    if args.grid:
        grid = json.loads(args.grid)
        for i in (int(k) for k in (args.shapes or "0,3").split(",")):
            sweep(SHAPES[i], grid)
            sweep(SHAPES[i], grid, bwd=True)
        return
    if args.sweep:
        fwd_cfgs = [dict(tile=t, bd_fwd=bd, warps_fwd=w) for t in (16, 32, 64, 128) for bd in (1, 2, 4, 8)
                    for w in (1, 2, 4, 8) if 4 <= 16 * t * bd // (32 * w) <= 32]
        best = sweep((8, 1536, 16, 2048), fwd_cfgs)
        sweep((1, 1536, 16, 65536), [best[1]] + [c for c in fwd_cfgs if c["tile"] == best[1]["tile"]][:6])
        t = best[1]["tile"]
        bwd_cfgs = [dict(best[1], bd_bwd=bd, warps_bwd=w) for bd in (1, 2, 4, 8) for w in (1, 2, 4, 8)
                    if 4 <= 16 * t * bd // (32 * w) <= 32]
        sweep((8, 1536, 16, 2048), bwd_cfgs, bwd=True)
        return
    import triton
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_fn
    except Exception:  # noqa: BLE001
        mamba_fn = None
    shapes = SHAPES[:3] if args.quick else SHAPES
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                mamba_ssm=mamba_fn is not None,
                scan_kernels="tile-state (deterministic)" if args.deterministic else "blocked")
    print(json.dumps(info))
    rows = []
    for s in shapes:
        try:
            rows.append(run_shape(s, args, mamba_fn))
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"shape": str(s), "error": "OOM " + str(e)[:60]})
        torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    crows = conv_rows() if not args.quick else []
    brows = bidirectional_rows() if not args.quick else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "conv": crows, "bidirectional": brows}, f, indent=1)
    cols = ["shape", "fwd_ms", "bwd_ms", "fwdbwd_ms", "fieldnotes_fwd_ms", "fieldnotes_bwd_ms", "mamba_fwd_ms",
            "ref_fwd_ms", "floor_ms", "GBps", "Texp_s", "fwd_extra_GB", "fwd_graph_GB", "bwd_extra_GB",
            "fwdbwd_extra_GB", "err_y", "err_h"]
    print("\n| " + " | ".join(cols) + " |")
    for r in rows:
        print("| " + " | ".join(
            (f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))) for c in cols) + " |")
    for r in crows + brows:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
