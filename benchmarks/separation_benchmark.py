"""Mamba-TasNet vs torchaudio's Conv-TasNet on 2-speaker 8 kHz mixtures of real recorded speech, same step budget.

Data: the file written by benchmarks/separation_prepare.py (asterisk prompt voices + espeak-ng voices,
speaker-disjoint splits). Training mixes on the fly on the GPU: two distinct training speakers, a random 4 s crop
of each speaker's stream, unit RMS then a gain in [-2.5, 2.5] dB. Test mixtures are fixed (seeded): full
utterance pairs cut to the shorter one (WSJ0-2mix "min"), from held-out real voices (June x Menardi) and from
held-out espeak voices. Scores: SI-SNRi and SDRi under the best permutation.

Mamba-TasNet trains for at most --max_train_seconds (or --steps); Conv-TasNet then trains for exactly as many
steps. Also measured: windowed vs whole-input SI-SNRi on 20 s mixtures, and the real-time factor and peak GPU
memory of separating 10 minutes and 1 hour of audio (windowed, 8 s windows, 1 s overlap).

  python benchmarks/separation_benchmark.py --data .sep_bench/data.pt --out results_dir
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torchaudio

from seqmamba.tasks.separation.api import separate_windows
from seqmamba.tasks.separation.metrics import pit_si_snr, reorder, sdr_improvement, si_snr_improvement
from seqmamba.tasks.separation.model import SIZES, MambaSeparator, SeparatorConfig

SR = 8000


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> int:
    return round(torch.cuda.max_memory_allocated() / 2 ** 20) if torch.cuda.is_available() else -1


def log(msg: str, fh=None) -> None:
    print(msg, flush=True)
    if fh is not None:
        fh.write(msg + "\n")
        fh.flush()


class Corpus:
    def __init__(self, path: Path, device: torch.device):
        data = torch.load(path)
        self.splits = data["splits"]
        self.streams = {n: s["audio"].float().div(32768).to(device) for n, s in data["speakers"].items()}
        self.bounds = {n: s["bounds"] for n, s in data["speakers"].items()}
        self.device = device

    def train_batch(self, batch: int, segment: int, gen: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        sources = []
        for _ in range(batch):
            pair = gen.sample(self.splits["train"], 2)
            crops = []
            for name in pair:
                stream = self.streams[name]
                start = gen.randrange(0, len(stream) - segment)
                crop = stream[start: start + segment]
                crops.append(crop / (crop.pow(2).mean().sqrt() + 1e-4) * 10 ** (gen.uniform(-2.5, 2.5) / 20))
            sources.append(torch.stack(crops))
        sources = torch.stack(sources)
        return sources.sum(1), sources

    def utterance_pairs(self, speakers: list[str], n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = random.Random(seed)
        out = []
        for _ in range(n):
            pair = gen.sample(speakers, 2)
            utts = []
            for name in pair:
                a, b = gen.choice(self.bounds[name])
                utts.append(self.streams[name][a:b])
            length = min(len(u) for u in utts)
            src = torch.stack([u[:length] / (u[:length].pow(2).mean().sqrt() + 1e-4)
                               * 10 ** (gen.uniform(-2.5, 2.5) / 20) for u in utts])
            out.append((src.sum(0), src))
        return out

    def long_pairs(self, speakers: list[str], n: int, seconds: float, seed: int):
        gen = random.Random(seed)
        seg = int(seconds * SR)
        out = []
        for _ in range(n):
            src = []
            for name in speakers:
                stream = self.streams[name]
                start = gen.randrange(0, len(stream) - seg)
                crop = stream[start: start + seg]
                src.append(crop / crop.pow(2).mean().sqrt() * 10 ** (gen.uniform(-2.5, 2.5) / 20))
            src = torch.stack(src)
            out.append((src.sum(0), src))
        return out


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))
    return f


def train(model, corpus, steps, max_seconds, batch, segment, lr, seed, fh, name):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(steps // 20, 1)))
    gen = random.Random(seed)
    model.train()
    start, done, losses = time.time(), 0, []
    _reset_peak()
    while done < steps and time.time() - start < max_seconds:
        mix, src = corpus.train_batch(batch, segment, gen)
        est = model(mix) if isinstance(model, MambaSeparator) else model(mix[:, None])
        best, _ = pit_si_snr(est, src)
        loss = -best.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        done += 1
        losses.append(loss.item())
        if done % 100 == 0:
            log(f"{name} step {done} loss {sum(losses[-100:]) / len(losses[-100:]):.2f} "
                f"({(time.time() - start) / done:.3f} s/step)", fh)
    _sync()
    return {"steps": done, "train_seconds": round(time.time() - start, 1),
            "final_train_loss_100": round(sum(losses[-100:]) / max(len(losses[-100:]), 1), 2),
            "train_peak_gpu_mib": _peak_mib()}


@torch.no_grad()
def evaluate(run, pairs, sdr: bool = True) -> dict:
    sisnri, sdri = [], []
    for mix, src in pairs:
        est = run(mix[None])
        best, perm = pit_si_snr(est, src[None])
        ordered = reorder(est, perm)
        sisnri.append(si_snr_improvement(ordered, src[None], mix[None]).item())
        if sdr:
            sdri.append(sdr_improvement(ordered, src[None], mix[None]).item())
    out = {"n": len(pairs), "si_snri": round(sum(sisnri) / len(sisnri), 2)}
    if sdr:
        out["sdri"] = round(sum(sdri) / len(sdri), 2)
    return out


def windowed(run, window_s, overlap_s, batch_windows, device):
    def sep(mix):  # (1, t) -> (1, n_src, t)
        wave = mix[0]
        blocks = []
        separate_windows(run, lambda s, n: torch.nn.functional.pad(wave[s: s + n], (0, n - len(wave[s: s + n]))),
                         len(wave), int(window_s * SR), int(overlap_s * SR), blocks.append, batch_windows, device)
        return torch.cat(blocks, -1)[None].to(device)
    return sep


@torch.no_grad()
def realtime(run, corpus, seconds, device, batch_windows) -> dict:
    wave = torch.cat([corpus.streams[n] for n in corpus.splits["test_real"]])
    wave = wave.repeat(math.ceil(seconds * SR / len(wave)))[: int(seconds * SR)]
    _sync()
    _reset_peak()
    t0 = time.time()
    n_out = [0]
    separate_windows(run, lambda s, n: torch.nn.functional.pad(wave[s: s + n], (0, n - len(wave[s: s + n]))),
                     len(wave), 8 * SR, SR, lambda b: n_out.__setitem__(0, n_out[0] + b.shape[-1]),
                     batch_windows, device)
    _sync()
    wall = time.time() - t0
    assert n_out[0] == len(wave)
    return {"audio_seconds": seconds, "wall_seconds": round(wall, 2), "rtf": round(wall / seconds, 5),
            "peak_gpu_mib": _peak_mib()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", default="S", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--max_train_seconds", type=float, default=80)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--segment_seconds", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n_test", type=int, default=100)
    ap.add_argument("--hour", action="store_true", help="also time one hour of audio")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script runs")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cpu" if args.smoke else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    fh = open(args.out / "separation_benchmark.log", "w")
    torch.manual_seed(0)
    corpus = Corpus(args.data, device)
    segment = int(args.segment_seconds * SR)
    if args.smoke:
        corpus.streams = {n: s[: 30 * SR] for n, s in corpus.streams.items()}
        corpus.bounds = {n: [b for b in bs if b[1] <= 30 * SR] for n, bs in corpus.bounds.items()}
    tests = {"test_real": corpus.utterance_pairs(corpus.splits["test_real"], args.n_test, seed=11),
             "test_espeak": corpus.utterance_pairs(corpus.splits["test_espeak"], args.n_test, seed=12)}
    long_pairs = corpus.long_pairs(corpus.splits["test_real"], 2 if args.smoke else 10, 20.0, seed=13)
    results = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
               "torchaudio": torchaudio.__version__, "splits": corpus.splits, "batch": args.batch,
               "segment_seconds": args.segment_seconds, "lr": args.lr}

    size = {"n_filters": 16, "n_layers": 1} if args.smoke else SIZES[args.size]
    cfg = SeparatorConfig(n_src=2, masker="mamba", **size, sample_rate=SR)
    mamba = MambaSeparator(cfg).to(device)
    conv_kw = {"msk_num_layers": 1, "msk_num_stacks": 1, "enc_num_feats": 16} if args.smoke else {}
    conv = torchaudio.models.ConvTasNet(num_sources=2, **conv_kw).to(device)
    steps = args.steps
    for name, model, run in (("mamba_tasnet", mamba, lambda x: mamba(x)), ("conv_tasnet", conv, lambda x: conv(x[:, None]))):
        results[name] = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
        if name == "mamba_tasnet":
            results[name]["size"] = args.size
            results[name] |= train(model, corpus, steps, args.max_train_seconds, args.batch, segment, args.lr, 0, fh,
                                   name)
            steps = results[name]["steps"]  # Conv-TasNet gets exactly the same number of steps
        else:
            results[name] |= train(model, corpus, steps, 1e9, args.batch, segment, args.lr, 0, fh, name)
        model.eval()
        for split, pairs in tests.items():
            results[name][split] = evaluate(run, pairs)
            log(f"{name} {split}: {results[name][split]}", fh)
        whole = evaluate(run, long_pairs, sdr=False)["si_snri"]
        win = evaluate(windowed(run, 4.0, 1.0, 8, device), long_pairs, sdr=False)["si_snri"]
        results[name]["long_20s_whole_si_snri"] = whole
        results[name]["long_20s_windowed_4s_1s_si_snri"] = win
        log(f"{name} 20 s mixtures: whole {whole} dB, windowed (4 s / 1 s overlap) {win} dB", fh)
        json.dump(results, open(args.out / "separation_benchmark.json", "w"), indent=1)
        for seconds in (20,) if args.smoke else (600, 3600) if args.hour else (600,):
            results[name][f"rtf_{seconds}s"] = realtime(run, corpus, seconds, device, batch_windows=16)
            log(f"{name} {seconds} s: {results[name][f'rtf_{seconds}s']}", fh)
            json.dump(results, open(args.out / "separation_benchmark.json", "w"), indent=1)
    log(json.dumps(results, indent=1), fh)


if __name__ == "__main__":
    main()
