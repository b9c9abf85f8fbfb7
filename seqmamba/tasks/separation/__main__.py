"""``seqmamba separate MODEL FILE [FILE ...] [--out_dir DIR] [--window_seconds 8] ...``

Separates WAV/FLAC files of any length with a trained model (a ``SeparationModule`` checkpoint or a
``save_pretrained`` folder) into ``<out_dir>/<stem>_spk<i>.wav``, one file per speaker, with a progress bar.
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="seqmamba separate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint (.ckpt) or save_pretrained folder")
    ap.add_argument("files", nargs="+", help="WAV/FLAC mixtures")
    ap.add_argument("--out_dir", default=None, help="output folder (default: beside each input)")
    ap.add_argument("--window_seconds", type=float, default=8.0)
    ap.add_argument("--overlap_seconds", type=float, default=1.0)
    ap.add_argument("--batch_windows", type=int, default=4, help="windows per forward pass")
    ap.add_argument("--downmix", choices=("error", "mean", "first"), default="error",
                    help="multi-channel input: refuse, average the channels, or keep the first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from seqmamba.data.audio import AudioError
    from seqmamba.tasks.separation.api import Separator

    try:
        sep = Separator.load(args.model, args.device)
        for path in args.files:
            outs = sep.separate_file(path, args.out_dir, args.window_seconds, args.overlap_seconds,
                                     args.batch_windows, args.downmix)
            print(f"{path}: " + ", ".join(str(p) for p in outs))
    except (AudioError, FileNotFoundError, ValueError) as err:
        print(f"seqmamba separate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
