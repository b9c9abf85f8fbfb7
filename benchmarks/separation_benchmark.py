"""Mamba-TasNet vs torchaudio's Conv-TasNet on 2-speaker 8 kHz mixtures of real recorded speech, same step budget.

Data: the file written by benchmarks/separation_prepare.py (asterisk prompt voices + espeak-ng voices,
speaker-disjoint splits). Training mixes on the fly on the device: two distinct training speakers, a random crop
of each speaker's stream, unit RMS then a gain in [-2.5, 2.5] dB. Test mixtures are fixed (seeded): full
utterance pairs cut to the shorter one (WSJ0-2mix "min"), from held-out real voices (June x Menardi) and from
held-out espeak voices. Scores: SI-SNRi and SDRi under the best permutation.

Both models train for exactly ``--steps`` steps with the same schedule (Adam, linear warmup over
``--warmup`` of the steps, cosine decay to 1% of ``--lr``, gradient clipping 5). ``--max_train_seconds`` only
guards the wall clock: a run it cuts short says so (``"cut_short": true``), and its schedule never finished.

Three ways to run:
  * everything in one process (train Mamba-TasNet, then Conv-TasNet, then evaluate):
      python benchmarks/separation_benchmark.py --data .sep_bench/data.pt --out OUT --steps 2000
  * the two trainings side by side, --steps chosen by a timing probe so that training takes ~330 s:
      python benchmarks/separation_benchmark.py --data .sep_bench/data.pt --out OUT --concurrent \
          --train_seconds 330 --lr 3e-3 --hour
  * the two trainings as two processes sharing one GPU, then the evaluation:
      python benchmarks/separation_benchmark.py ... --only mamba_tasnet &
      python benchmarks/separation_benchmark.py ... --only conv_tasnet & wait
      python benchmarks/separation_benchmark.py ... --evaluate
  * ``--smoke``: tiny models on the CPU and short data, to check that the script runs end to end.

Training writes, per model, ``curve_<name>.csv`` (step, seconds, lr, mean train loss of the last
``--log_every`` steps, validation SI-SNRi on ``--n_val`` held-out-speaker mixtures every ``--val_every`` steps)
and, at the end, ``<name>.pt`` and ``train_<name>.json``. The evaluation reads those, writes
``separation_benchmark.json`` after every measurement, ``learning_curves.png``, and prints a table last.
Also measured: windowed vs whole-input SI-SNRi on 20 s mixtures, and the real-time factor and peak GPU memory
of separating 10 minutes (and with ``--hour`` 1 hour) of audio (windowed, 8 s windows, 1 s overlap).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchaudio

from seqmamba.hub import atomic_write
from seqmamba.tasks.separation.api import separate_windows
from seqmamba.tasks.separation.metrics import pit_si_snr, reorder, sdr_improvement, si_snr_improvement
from seqmamba.tasks.separation.model import SIZES, MambaSeparator, SeparatorConfig

SR = 8000
MODELS = ("mamba_tasnet", "conv_tasnet")


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


def write_json(obj: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


class Corpus:
    """Speaker streams ``{name: (n,)}`` on ``device`` with utterance bounds, and the speaker splits."""

    def __init__(self, path: Path, device: torch.device, max_seconds: float | None = None):
        data = torch.load(path)
        self.splits = data["splits"]
        self.streams = {n: s["audio"].float().div(32768).to(device) for n, s in data["speakers"].items()}
        self.bounds = {n: s["bounds"] for n, s in data["speakers"].items()}
        if max_seconds is not None:  # smoke runs: keep the first seconds of each speaker
            cut = int(max_seconds * SR)
            self.streams = {n: s[:cut] for n, s in self.streams.items()}
            self.bounds = {n: [b for b in bs if b[1] <= cut] for n, bs in self.bounds.items()}
        self.device = device

    def train_batch(self, batch: int, segment: int, gen: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixtures ``(batch, segment)`` and sources ``(batch, 2, segment)`` of two distinct training speakers."""
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
        """``n`` fixed mixtures ``((t,), (2, t))`` of two full utterances of distinct speakers, cut to the shorter."""
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
        """``n`` mixtures of ``seconds`` of two of the speakers' streams (several utterances each)."""
        gen = random.Random(seed)
        seg = int(seconds * SR)
        out = []
        for _ in range(n):
            src = []
            for name in speakers if len(speakers) == 2 else gen.sample(speakers, 2):
                stream = self.streams[name]
                start = gen.randrange(0, len(stream) - seg)
                crop = stream[start: start + seg]
                src.append(crop / crop.pow(2).mean().sqrt() * 10 ** (gen.uniform(-2.5, 2.5) / 20))
            src = torch.stack(src)
            out.append((src.sum(0), src))
        return out


def lr_lambda(total: int, warmup: int):
    """Linear warmup over ``warmup`` steps, then cosine decay to 1% at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))
    return f


def build(name: str, args, device: torch.device):
    """(model, run) where run maps mixtures ``(b, t)`` to estimates ``(b, 2, t)``."""
    if name == "mamba_tasnet":
        size = {"n_filters": 16, "n_layers": 1} if args.smoke else SIZES[args.size]
        model = MambaSeparator(SeparatorConfig(n_src=2, masker="mamba", **size, sample_rate=SR)).to(device)
        return model, model
    conv_kw = {"msk_num_layers": 1, "msk_num_stacks": 1, "enc_num_feats": 16} if args.smoke else {}
    model = torchaudio.models.ConvTasNet(num_sources=2, **conv_kw).to(device)
    return model, lambda x: model(x[:, None])


def train(name: str, args, corpus: Corpus, device: torch.device, fh) -> dict:
    """Train one model for ``args.steps``; writes the curve as it goes and the weights at the end."""
    torch.manual_seed(0)
    model, run = build(name, args, device)
    segment = int(args.segment_seconds * SR)
    val_pairs = corpus.utterance_pairs(corpus.splits["val"], args.n_val, seed=10)
    lr = args.conv_lr if name == "conv_tasnet" and args.conv_lr else args.lr
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(int(round(args.warmup * args.steps)), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, warmup))
    gen = random.Random(0)
    curve_path = args.out / f"curve_{name}.csv"
    curve = open(curve_path, "w", newline="")
    writer = csv.writer(curve)
    writer.writerow(["step", "seconds", "lr", "train_loss", "val_si_snri"])
    model.train()
    start, done, losses = time.time(), 0, []
    _reset_peak()
    while done < args.steps and time.time() - start < args.max_train_seconds:
        mix, src = corpus.train_batch(args.batch, segment, gen)
        best, _ = pit_si_snr(run(mix), src)
        loss = -best.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        done += 1
        losses.append(loss.item())
        if done % args.log_every == 0 or done == args.steps:
            elapsed, val = time.time() - start, ""  # the clock before validation: the probe times training only
            if done % args.val_every == 0 or done == args.steps:
                model.eval()
                val = evaluate(run, val_pairs, sdr=False)["si_snri"]
                model.train()
            recent = losses[-args.log_every:]
            writer.writerow([done, round(elapsed, 1), f"{lr:.3g}", round(sum(recent) / len(recent), 3),
                             val])
            curve.flush()
            log(f"{name} step {done} loss {sum(recent) / len(recent):.2f} val_si_snri {val} "
                f"({(time.time() - start) / done:.3f} s/step)", fh)
    _sync()
    curve.close()
    tail = losses[-100:]
    result = {"steps": done, "planned_steps": args.steps, "cut_short": done < args.steps,
              "train_seconds": round(time.time() - start, 1),
              "final_train_loss_100": round(sum(tail) / max(len(tail), 1), 2), "train_peak_gpu_mib": _peak_mib(),
              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    atomic_write(args.out / f"{name}.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    write_json(result, args.out / f"train_{name}.json")
    log(f"{name} trained: {result}", fh)
    return result


@torch.no_grad()
def evaluate(run, pairs, sdr: bool = True) -> dict:
    """Mean SI-SNRi (and SDRi) over ``pairs`` of (mixture ``(t,)``, sources ``(2, t)``), best permutation."""
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
    """Wall time, real-time factor and peak GPU memory of separating ``seconds`` of the test_real voices."""
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


def evaluate_all(args, corpus: Corpus, device: torch.device, fh) -> dict:
    """Load both trained models and measure everything; ``separation_benchmark.json`` after each measurement."""
    results = {"device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(), "torch": torch.__version__,
               "torchaudio": torchaudio.__version__, "date": datetime.date.today().isoformat(),
               "splits": corpus.splits, "batch": args.batch, "segment_seconds": args.segment_seconds,
               "lr": args.lr, "conv_lr": args.conv_lr or args.lr, "warmup": args.warmup, "size": args.size}
    tests = {"test_real": corpus.utterance_pairs(corpus.splits["test_real"], args.n_test, seed=11),
             "test_espeak": corpus.utterance_pairs(corpus.splits["test_espeak"], args.n_test, seed=12)}
    n_long = 2 if args.smoke else 10
    long_sets = {"real": corpus.long_pairs(corpus.splits["test_real"], n_long, 20.0, seed=13),
                 "espeak": corpus.long_pairs(corpus.splits["test_espeak"], n_long, 20.0, seed=14)}
    out_json = args.out / "separation_benchmark.json"
    for name in MODELS:
        model, run = build(name, args, device)
        model.load_state_dict(torch.load(args.out / f"{name}.pt", map_location=device))
        model.eval()
        results[name] = json.loads((args.out / f"train_{name}.json").read_text())
        for split, pairs in tests.items():
            results[name][split] = evaluate(run, pairs)
            log(f"{name} {split}: {results[name][split]}", fh)
            write_json(results, out_json)
        for voices, pairs in long_sets.items():
            whole = evaluate(run, pairs, sdr=False)["si_snri"]
            win = evaluate(windowed(run, 4.0, 1.0, 8, device), pairs, sdr=False)["si_snri"]
            results[name][f"long_20s_{voices}_whole_si_snri"] = whole
            results[name][f"long_20s_{voices}_windowed_4s_1s_si_snri"] = win
            log(f"{name} 20 s {voices} mixtures: whole {whole} dB, windowed (4 s / 1 s overlap) {win} dB", fh)
            write_json(results, out_json)
        # one full batch of 16 windows and a shorter one: compiles the timed runs' shapes outside the timings
        realtime(run, corpus, 20 if args.smoke else 8 * 16 + 20, device, batch_windows=16)
        for seconds in (20,) if args.smoke else (600, 3600) if args.hour else (600,):
            results[name][f"rtf_{seconds}s"] = realtime(run, corpus, seconds, device, batch_windows=16)
            log(f"{name} {seconds} s: {results[name][f'rtf_{seconds}s']}", fh)
            write_json(results, out_json)
        del model
    try:
        plot_curves(args.out, results)
    except Exception as err:  # a missing plotting library must not lose the numbers
        log(f"learning-curve plot failed: {err!r}", fh)
    return results


def read_curve(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_curves(out: Path, results: dict) -> Path:
    """Train loss and validation SI-SNRi against the step for both models, side by side, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name in MODELS:
        rows = read_curve(out / f"curve_{name}.csv")
        label = f"{name} ({results[name]['params_m']} M)"
        ax_loss.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows], label=label)
        val = [r for r in rows if r["val_si_snri"]]
        ax_val.plot([int(r["step"]) for r in val], [float(r["val_si_snri"]) for r in val], "o-", label=label)
    ax_loss.set(xlabel="step", ylabel="train loss: -SI-SNR (dB)", title="training (dynamic mixing)")
    ax_val.set(xlabel="step", ylabel="SI-SNRi (dB)", title="held-out val speakers (espeak-ng)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results['device']}, torch {results['torch']}, torchaudio {results['torchaudio']}, "
                 f"{results['date']}; batch {results['batch']} x {results['segment_seconds']} s, "
                 f"Adam lr {results['lr']} (Conv-TasNet {results['conv_lr']})", fontsize=9)
    fig.tight_layout()
    path = out / "learning_curves.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def table(results: dict) -> str:
    """The side-by-side markdown table of ``results``."""
    m, c = results["mamba_tasnet"], results["conv_tasnet"]
    rows = [("params (M)", "params_m", None), ("steps", "steps", None), ("train seconds", "train_seconds", None),
            ("train peak GPU MiB", "train_peak_gpu_mib", None),
            ("last-100-step train loss (dB)", "final_train_loss_100", None),
            ("test_real SI-SNRi", "test_real", "si_snri"), ("test_real SDRi", "test_real", "sdri"),
            ("test_espeak SI-SNRi", "test_espeak", "si_snri"), ("test_espeak SDRi", "test_espeak", "sdri"),
            ("20 s real whole SI-SNRi", "long_20s_real_whole_si_snri", None),
            ("20 s real windowed 4 s/1 s SI-SNRi", "long_20s_real_windowed_4s_1s_si_snri", None),
            ("20 s espeak whole SI-SNRi", "long_20s_espeak_whole_si_snri", None),
            ("20 s espeak windowed 4 s/1 s SI-SNRi", "long_20s_espeak_windowed_4s_1s_si_snri", None)]
    for key in sorted(k for k in m if k.startswith("rtf_")):
        rows += [(f"{key[4:]} wall s", key, "wall_seconds"), (f"{key[4:]} RTF", key, "rtf"),
                 (f"{key[4:]} peak GPU MiB", key, "peak_gpu_mib")]
    lines = [f"| {results['device']} | mamba_tasnet {results['size']} | conv_tasnet |", "|---|---|---|"]
    for label, key, sub in rows:
        cells = [(r.get(key, {}) or {}).get(sub, "-") if sub else r.get(key, "-") for r in (m, c)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _child(args, name: str, out: Path, steps: int, max_seconds: float, log_every: int,
           val_every: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--data", str(args.data), "--out", str(out), "--only", name, "--size", args.size,
           "--steps", str(steps), "--max_train_seconds", str(max_seconds), "--batch", str(args.batch),
           "--segment_seconds", str(args.segment_seconds), "--lr", str(args.lr), "--conv_lr", str(args.conv_lr or args.lr), "--warmup", str(args.warmup),
           "--log_every", str(log_every), "--val_every", str(val_every or args.val_every), "--n_val", str(args.n_val)]
    return subprocess.Popen(cmd + (["--smoke"] if args.smoke else []))


def _wait(procs: list[subprocess.Popen]) -> None:
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a training process failed (exit codes {codes})")


def seconds_per_step(curve: Path, after_seconds: float) -> float:
    """Seconds per step from a curve CSV over the rows logged after ``after_seconds`` (past compilation, and
    where the other process is training too)."""
    every = read_curve(curve)
    rows = [r for r in every if float(r["seconds"]) > after_seconds]
    if len(rows) < 2:  # too slow to log twice in the window: time what there is
        rows = every[-2:]
    if len(rows) < 2:
        raise SystemExit(f"{curve}: fewer than 2 logged steps in the probe; raise --probe_seconds")
    (a, b) = rows[0], rows[-1]
    return (float(b["seconds"]) - float(a["seconds"])) / max(int(b["step"]) - int(a["step"]), 1)


def train_concurrently(args, fh) -> None:
    """Both models as two processes on one device. With ``--train_seconds``, a short concurrent probe first
    measures both step times and sets ``--steps`` so that the slower model finishes in about that time.

    Both probe processes train for the same ``--probe_seconds`` of wall time and are timed over its second half
    only: a fixed probe step count let Conv-TasNet finish while Mamba-TasNet was still compiling, so Mamba was
    timed alone (0.14 s/step against 0.25 s/step side by side) and the run then hit the wall-clock guard."""
    if args.train_seconds:
        probe = args.out / "probe"
        probe.mkdir(parents=True, exist_ok=True)
        _wait([_child(args, name, probe, 10 ** 6, args.probe_seconds, 5, val_every=10 ** 6) for name in MODELS])
        rates = {name: seconds_per_step(probe / f"curve_{name}.csv", args.probe_seconds / 2) for name in MODELS}
        args.steps = max(int(args.train_seconds / max(rates.values())), 1)
        log(f"probe: seconds per step running side by side {rates}; --steps {args.steps}", fh)
    guard = args.max_train_seconds if not args.train_seconds else args.train_seconds * 1.1
    _wait([_child(args, name, args.out, args.steps, guard, args.log_every) for name in MODELS])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", choices=MODELS, help="train this model only (then run --evaluate)")
    ap.add_argument("--evaluate", action="store_true", help="evaluate the models trained into --out")
    ap.add_argument("--concurrent", action="store_true",
                    help="train the two models as two processes sharing the device, then evaluate")
    ap.add_argument("--train_seconds", type=float, default=None,
                    help="with --concurrent: choose --steps from a probe so that training takes about this long")
    ap.add_argument("--probe_seconds", type=float, default=40.0,
                    help="with --train_seconds: wall time of the side-by-side timing probe")
    ap.add_argument("--size", default="S", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=2000, help="training steps of each model (the schedule's length)")
    ap.add_argument("--max_train_seconds", type=float, default=1e9, help="wall-clock guard per model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--segment_seconds", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--conv_lr", type=float, default=None, help="Conv-TasNet's peak lr (default: --lr)")
    ap.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of --steps")
    ap.add_argument("--log_every", type=int, default=25)
    ap.add_argument("--val_every", type=int, default=250)
    ap.add_argument("--n_val", type=int, default=20)
    ap.add_argument("--n_test", type=int, default=100)
    ap.add_argument("--hour", action="store_true", help="also time one hour of audio")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script runs")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cpu" if args.smoke else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.only or ("evaluate" if args.evaluate else "all")
    with open(args.out / f"separation_benchmark_{tag}.log", "w") as fh:
        corpus = Corpus(args.data, device, max_seconds=30.0 if args.smoke else None)
        if args.concurrent and not args.evaluate:
            train_concurrently(args, fh)
        elif not args.evaluate:
            for name in [args.only] if args.only else MODELS:
                train(name, args, corpus, device, fh)
        if args.only is None:
            results = evaluate_all(args, corpus, device, fh)
            log(json.dumps(results, indent=1), fh)
            log(table(results), fh)


if __name__ == "__main__":
    main()
