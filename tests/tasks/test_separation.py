"""Separation losses against float64/brute-force references, the models, the long-audio API, the CLI."""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from seqmamba.tasks.separation import (MambaSeparator, SeparatorConfig, Separator, align_permutation,
                                       pit_si_snr, pit_si_snr_loss, plot_spectrograms, reorder,
                                       sdr_improvement, separate_windows, si_snr, si_snr_improvement)
from seqmamba.tasks.separation.api import crossfade_ramps, window_starts
from tests.utils import assert_close

REPO = Path(__file__).resolve().parents[2]
SR = 8000


def si_snr_f64(est: np.ndarray, ref: np.ndarray) -> float:
    """SI-SNR written out in float64: zero-mean both, project the estimate on the reference."""
    est = est.astype(np.float64) - est.mean()
    ref = ref.astype(np.float64) - ref.mean()
    target = (est @ ref) / (ref @ ref) * ref
    noise = est - target
    return 10 * math.log10((target @ target) / (noise @ noise))


# --- metrics -----------------------------------------------------------------------------------------------------


def test_si_snr_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 400, generator=g)
    est = 0.7 * ref + 0.3 * torch.randn(3, 400, generator=g) + 0.2  # offset: zero-mean matters
    got = si_snr(est, ref)
    for k in range(3):
        assert abs(got[k].item() - si_snr_f64(est[k].numpy(), ref[k].numpy())) < 1e-3
    # scale invariance: any positive gain on the estimate leaves it unchanged
    torch.testing.assert_close(si_snr(5.0 * est, ref), got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_src", [1, 2, 3, 4])
def test_pit_matches_brute_force(n_src):
    g = torch.Generator().manual_seed(n_src)
    refs = torch.randn(5, n_src, 300, generator=g)
    est = refs[:, torch.randperm(n_src, generator=g)] + 0.8 * torch.randn(5, n_src, 300, generator=g)
    best, perm = pit_si_snr(est, refs)
    for b in range(5):
        scores = {}
        for p in itertools.permutations(range(n_src)):
            scores[p] = np.mean([si_snr_f64(est[b, p[j]].numpy(), refs[b, j].numpy()) for j in range(n_src)])
        best_p = max(scores, key=scores.get)
        assert abs(best[b].item() - scores[best_p]) < 1e-3
        assert tuple(perm[b].tolist()) == best_p
    ordered = reorder(est, perm)
    torch.testing.assert_close(si_snr(ordered, refs).mean(-1), best, rtol=1e-5, atol=1e-5)
    # the loss is invariant to the order of the references, and differentiable
    est.requires_grad_(True)
    loss = pit_si_snr_loss(est, refs)
    shuffled = refs[:, torch.randperm(n_src, generator=g)]
    torch.testing.assert_close(pit_si_snr_loss(est, shuffled), loss)
    loss.backward()
    assert est.grad is not None and torch.isfinite(est.grad).all()


def test_improvements_against_hand_computed_values():
    g = torch.Generator().manual_seed(1)
    refs = torch.randn(2, 2, 2000, generator=g)
    mix = refs.sum(1)
    est = refs + 0.1 * torch.randn(2, 2, 2000, generator=g)
    want = np.array([[si_snr_f64(est[b, j].numpy(), refs[b, j].numpy())
                      - si_snr_f64(mix[b].numpy(), refs[b, j].numpy()) for j in range(2)] for b in range(2)]).mean(1)
    np.testing.assert_allclose(si_snr_improvement(est, refs, mix).numpy(), want, atol=1e-3)
    # SDRi: a perfect estimate scores far above the mixture; the mixture itself improves by zero
    assert (sdr_improvement(refs + 1e-3 * torch.randn(2, 2, 2000, generator=g), refs, mix) > 30).all()
    assert sdr_improvement(mix[:, None].expand(-1, 2, -1).clone(), refs, mix).abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"\(batch, n_src, time\)"):
        si_snr_improvement(est[0], refs[0], mix[0])


# --- models ------------------------------------------------------------------------------------------------------


def tiny(masker="mamba", **kw) -> MambaSeparator:
    cfg = SeparatorConfig(masker=masker, n_filters=16, n_layers=1, chunk_size=kw.pop("chunk_size", 10), **kw)
    return MambaSeparator(cfg, backend="ref").eval()


@pytest.mark.parametrize("masker", ["mamba", "dual_path"])
@pytest.mark.parametrize("n_src", [2, 3])
def test_model_shapes_and_scale_equivariance(masker, n_src):
    model = tiny(masker, n_src=n_src)
    for t in (15, 16, 257):  # shorter than the kernel, exact, ragged
        x = torch.randn(2, t)
        with torch.no_grad():
            y = model(x)
            assert y.shape == (2, n_src, t) and torch.isfinite(y).all()
            # ReLU encoder, layer-normed masker, linear decoder: positively homogeneous in the input
            assert_close(f"3x input (t={t})", model(3.0 * x), 3.0 * y, rtol=1e-4)
    assert model(torch.randn(100)).shape == (n_src, 100)


def test_dual_path_chunking_is_exact():
    """With identity blocks, chunking with 50% overlap and averaging the overlap-add gives the frames back."""
    model = tiny("dual_path", chunk_size=7)
    masker = model.masker
    masker.intra = nn.ModuleList([nn.Identity()])
    masker.inter = nn.ModuleList([nn.Identity()])
    for f in (1, 6, 7, 50):
        hidden = torch.randn(2, f, 16)
        torch.testing.assert_close(masker.mix(hidden, None), hidden)


def test_dual_path_inter_chunk_path_sees_other_chunks():
    model = tiny("dual_path", chunk_size=8)
    x = torch.randn(1, 800)
    with torch.no_grad():
        base = model(x)
        x2 = x.clone()
        x2[0, 700:] += 1.0  # change only the end
        changed = model(x2)
    assert (changed[..., :100] - base[..., :100]).abs().max() > 0  # reaches the start through inter-chunk blocks


def test_padded_batch_equals_single_runs():
    model = tiny("mamba")
    a, b = torch.randn(400), torch.randn(237)
    batch = torch.stack([a, nn.functional.pad(b, (0, 163))])
    with torch.no_grad():
        out = model(batch, torch.tensor([400, 237]))
        torch.testing.assert_close(out[0], model(a), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[1, :, :237], model(b), rtol=1e-4, atol=1e-5)


def test_save_and_load_pretrained(tmp_path):
    model = tiny("dual_path", n_src=3)
    model.save_pretrained(tmp_path / "m")
    again = MambaSeparator.from_pretrained(tmp_path / "m", backend="ref").eval()
    x = torch.randn(1, 300)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    sep = Separator.load(tmp_path / "m")
    assert sep.n_src == 3 and sep.sample_rate == 8000


# --- long recordings --------------------------------------------------------------------------------------------


class SwappingOracle(nn.Module):
    """Returns the true sources of each window, in an order that alternates from one window to the next."""

    def __init__(self, sources: torch.Tensor, window: int, overlap: int):
        super().__init__()
        self.sources, self.hop, self.calls = sources, window - overlap, 0
        self.max_len = 0

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        outs = []
        for window in batch:
            start = self.calls * self.hop
            est = self.sources[:, start: start + len(window)]
            n = est.shape[0]
            order = [(i + self.calls) % n for i in range(n)]  # rotate the speakers every window
            outs.append(est[order])
            self.calls += 1
            self.max_len = max(self.max_len, len(window))
        return torch.stack(outs)


def speechlike(t: int, f0: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.arange(t) / SR
    env = 0.6 + 0.4 * torch.sin(2 * math.pi * (0.7 + seed) * n)
    return env * (torch.sin(2 * math.pi * f0 * n) + 0.2 * torch.randn(t, generator=g))


@pytest.mark.parametrize("n_src", [2, 3])
@pytest.mark.parametrize("batch_windows", [1, 3])
def test_windowed_separation_keeps_speakers_across_swaps(n_src, batch_windows):
    t, window, overlap = 10_001, 1000, 250
    sources = torch.stack([speechlike(t, 150 * (k + 1), k) for k in range(n_src)])
    oracle = SwappingOracle(sources, window, overlap)
    blocks, requested = [], []

    def read(start, length):
        requested.append(length)
        return sources.sum(0)[start: start + length]

    separate_windows(oracle, read, t, window, overlap, blocks.append, batch_windows=batch_windows)
    out = torch.cat(blocks, -1)
    assert out.shape == (n_src, t)
    assert oracle.calls == len(window_starts(t, window, overlap)) > 10
    # every window rotated the speakers, yet each output channel is one speaker from start to end
    torch.testing.assert_close(out, sources, rtol=1e-5, atol=1e-5)
    assert max(requested) <= window  # memory: never more than one window read at a time


def test_crossfade_and_alignment_helpers():
    fade_out, fade_in = crossfade_ramps(64)
    torch.testing.assert_close(fade_out + fade_in, torch.ones(64))
    assert fade_in[0] < 0.01 and fade_in[-1] > 0.99 and (fade_in.diff() > 0).all()
    prev = torch.randn(4, 200)
    perm = [2, 0, 3, 1]
    cur = torch.empty_like(prev)
    cur[perm] = prev + 0.3 * torch.randn(4, 200)  # current channel perm[i] holds previous speaker i
    assert align_permutation(prev, cur) == perm
    assert window_starts(1000, 1000, 100) == [0]
    assert window_starts(1001, 1000, 100) == [0, 900]
    with pytest.raises(ValueError, match="overlap < window"):
        window_starts(10, 5, 5)


def test_separate_file_streams_and_writes_atomically(tmp_path):
    model = tiny("mamba")
    sep = Separator(model)
    mixture = speechlike(SR * 3 + 17, 200, 0) * 0.3
    sf.write(tmp_path / "long.wav", mixture.numpy(), SR, subtype="FLOAT")
    outs = sep.separate_file(tmp_path / "long.wav", out_dir=tmp_path / "out", window_seconds=1.0,
                             overlap_seconds=0.25, progress=False)
    assert [p.name for p in outs] == ["long_spk1.wav", "long_spk2.wav"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["long_spk1.wav", "long_spk2.wav"]
    got = torch.stack([torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in outs])
    want = sep.separate(mixture, window_seconds=1.0, overlap_seconds=0.25)
    torch.testing.assert_close(got, want)
    # a 16 kHz file is resampled to the model's rate on the way in
    sf.write(tmp_path / "wide.wav", np.repeat(mixture.numpy(), 2), 2 * SR, subtype="FLOAT")
    outs = sep.separate_file(tmp_path / "wide.wav", out_dir=tmp_path / "out", window_seconds=1.0,
                             overlap_seconds=0.25, progress=False)
    assert sf.info(outs[0]).samplerate == SR and abs(sf.info(outs[0]).frames - len(mixture)) <= 1
    # whole-input and windowed separation agree closely for a window covering the input
    whole = sep.separate(mixture[:4000])
    torch.testing.assert_close(sep.separate(mixture[:4000], window_seconds=1.0, overlap_seconds=0.25), whole)


def test_spectrogram_plot(tmp_path):
    mix = torch.randn(2000)
    path = plot_spectrograms(mix, torch.randn(2, 2000), torch.randn(2, 2000), SR, tmp_path / "p" / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.png"]


@pytest.mark.slow
def test_one_hour_at_8k_streams_in_flat_memory(tmp_path):
    import resource

    t = SR * 3600
    sf.write(tmp_path / "hour.wav", (0.1 * np.sin(np.arange(t) * 0.05)).astype(np.float32), SR, subtype="PCM_16")
    sep = Separator(tiny("mamba"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    outs = sep.separate_file(tmp_path / "hour.wav", out_dir=tmp_path, window_seconds=8.0, overlap_seconds=1.0,
                             progress=True)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert all(sf.info(p).frames == t for p in outs)
    # the whole hour as float32 would be 110 MiB an output channel: streaming holds far less
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB"


def test_separate_command_line(tmp_path, capsys):
    from seqmamba.tasks.separation.__main__ import main

    tiny("mamba").save_pretrained(tmp_path / "model")
    sf.write(tmp_path / "a.wav", (0.1 * np.random.default_rng(0).standard_normal(3000)).astype(np.float32), SR)
    assert main([str(tmp_path / "model"), str(tmp_path / "a.wav"), "--out_dir", str(tmp_path / "o"),
                 "--window_seconds", "0.2", "--overlap_seconds", "0.05", "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_spk1.wav", "a_spk2.wav"]
    sf.write(tmp_path / "st.wav", np.zeros((100, 2), np.float32), SR)
    assert main([str(tmp_path / "model"), str(tmp_path / "st.wav"), "--device", "cpu"]) == 2
    assert "st.wav: 2 channels where mono audio is expected" in capsys.readouterr().err
