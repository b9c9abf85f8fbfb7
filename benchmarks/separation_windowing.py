"""SI-SNRi cost of windowed separation against whole-input separation, on mixtures short enough for both.

Mixtures are built from a speaker-folder split (default: the quickstart's held-out test speakers): each source is
several utterances of one speaker joined together (``--seconds`` long), unit RMS, gains in [-2.5, 2.5] dB.

  python benchmarks/separation_windowing.py CKPT --speakers data/separation_synthetic60 --window 2 --overlap 0.5
"""
from __future__ import annotations

import argparse
import json
import random

import torch

from seqmamba.data.audio import load_audio
from seqmamba.data.separation import scan_speakers, speaker_disjoint_split
from seqmamba.tasks.separation import Separator, pit_si_snr, reorder, si_snr_improvement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--speakers", default="data/separation_synthetic60")
    ap.add_argument("--split", choices=("train", "val", "test"), default="test")
    ap.add_argument("--val_fraction", type=float, default=0.1)
    ap.add_argument("--test_fraction", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--window", type=float, nargs="+", default=[2.0])
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sep = Separator.load(args.model)
    sr = sep.sample_rate
    pool = scan_speakers(args.speakers)
    split = dict(zip(("train", "val", "test"), speaker_disjoint_split(list(pool), args.val_fraction,
                                                                       args.test_fraction, args.seed)))[args.split]
    rng = random.Random(1234)
    length = int(args.seconds * sr)
    scores = {"whole": []} | {f"window_{w}s": [] for w in args.window}
    for _ in range(args.n):
        sources = []
        for name in rng.sample(split, sep.n_src):
            files = pool[name][:]
            rng.shuffle(files)
            wave = torch.cat([load_audio(f, sr) for f in files])
            while len(wave) < length:
                wave = torch.cat([wave, wave])
            wave = wave[:length]
            sources.append(wave / wave.pow(2).mean().sqrt() * 10 ** (rng.uniform(-2.5, 2.5) / 20))
        sources = torch.stack(sources)
        mixture = sources.sum(0)
        for key in scores:
            window = None if key == "whole" else float(key.split("_")[1][:-1])
            est = sep.separate(mixture, window_seconds=window, overlap_seconds=args.overlap)[None]
            _, perm = pit_si_snr(est, sources[None])
            scores[key].append(si_snr_improvement(reorder(est, perm), sources[None], mixture[None]).item())
    out = {k: round(sum(v) / len(v), 2) for k, v in scores.items()}
    out |= {"n": args.n, "seconds": args.seconds, "overlap": args.overlap, "speakers": split}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
