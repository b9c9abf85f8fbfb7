"""Score a (multi-)FASTA with a DNA model: per-record embeddings and predictions, per-base log-likelihoods.

    seqmamba score MODEL GENOME.fa[.gz] OUT.parquet [--mode auto|whole|windowed]
        [--window 16384] [--overlap 1024] [--device auto] [--no-per-base] [--plot RECORD:START-END]

MODEL: a released Caduceus directory, a ``save_pretrained`` directory, or a ``.ckpt`` of the DNA modules.
Writes OUT.parquet (one row per record) and OUT.bases.parquet (one row per base), each atomically, with a
progress bar; ``--plot`` also draws the per-base log-likelihood of a region to OUT.track.png.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from seqmamba.tasks.dna import api


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="seqmamba score", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model directory or .ckpt")
    parser.add_argument("fasta", help="FASTA (plain, .gz, bgzip, .xz) or builtin:lambda_phage")
    parser.add_argument("out", type=Path, help="output parquet (per record); per-base rows go to OUT.bases.parquet")
    parser.add_argument("--mode", choices=["auto", "whole", "windowed"], default="auto",
                        help="auto: whole records on a GPU when they fit in its memory, else windows")
    parser.add_argument("--window", type=int, default=16384, help="window length in windowed mode")
    parser.add_argument("--overlap", type=int, default=1024, help="overlap of consecutive windows")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-per-base", action="store_true", help="skip the per-base table")
    parser.add_argument("--plot", default=None, metavar="RECORD:START-END",
                        help="draw the per-base log-likelihood of this region to OUT.track.png")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = api.load(args.model, device=device)
    start = time.time()
    written = api.score_fasta(model, args.fasta, args.out, mode=args.mode, window=args.window,
                              overlap=args.overlap, per_base=not args.no_per_base)
    print(f"scored in {time.time() - start:.1f} s on {device}")
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if args.plot:
        match = re.fullmatch(r"(.+):(\d+)-(\d+)", args.plot)
        if not match or "bases" not in written:
            parser.error("--plot needs RECORD:START-END and a masked-LM model's per-base table")
        png = api.plot_track(written["bases"], match[1], int(match[2]), int(match[3]),
                             args.out.with_name(args.out.name.removesuffix(".parquet") + ".track.png"), smooth=25)
        print(f"track: {png}")
        written["track"] = png
    return written


if __name__ == "__main__":
    main()
