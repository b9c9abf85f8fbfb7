"""Build the separation benchmark's data from speech available offline: real recorded voices from Debian's
asterisk prompt packages and synthetic espeak-ng voices, 8 kHz, with speaker-disjoint splits.

Speakers (one per package): en_US_f_Allison, fr_CA_f_June, it_IT_f_Menardi (WAV) and the French voice of
asterisk-prompt-fr-armelle (raw GSM 6.10, decoded by libsndfile through soundfile); plus espeak-ng voices (languages x variants).

Splits (speaker-disjoint):
  train: Allison, Armelle (real) + most espeak voices
  val:   a few held-out espeak voices
  test_real:   June x Menardi (both real, never seen in training)
  test_espeak: held-out espeak voices

Every speaker's trimmed utterances are joined into one stream (short pauses between them) so that training can
crop 4 s segments anywhere. Output: one torch file with int16 streams per speaker, the utterance boundaries,
and the split lists; the benchmark (separation_benchmark.py) mixes from it.

  apt-get download asterisk-core-sounds-en-wav asterisk-core-sounds-fr-wav asterisk-prompt-it-menardi-wav \\
      asterisk-prompt-fr-armelle espeak-ng espeak-ng-data libespeak-ng1 libpcaudio0 libsonic0 libpulse0 libasyncns0 \\
      libsndfile1 libdbus-1-3 libx11-xcb1   (into DEBS; espeak-ng links against pulseaudio's client library)
  python benchmarks/separation_prepare.py --debs DEBS --out .sep_bench/data.pt
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from seqmamba.data.audio import load_audio

SR = 8000
WORDS = ("the a one two three seven blue green river mountain morning evening quickly slowly bright quiet "
         "table window garden city train station paper music letter number open close bring find read write "
         "tomorrow yesterday always never before after under over little large warm cold happy simple strong "
         "people children teacher doctor water coffee bread market number question answer story picture").split()
ESPEAK_VOICES = ["en", "en-us", "en-gb-scotland", "de", "fr", "es", "it", "pt", "nl", "sv", "pl", "cs"]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]


def unpack(debs: Path, root: Path) -> None:
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def trim(wave: np.ndarray, frame: int = 80, rel_db: float = -40.0) -> np.ndarray:
    """Cut leading/trailing frames quieter than rel_db below the loudest frame."""
    n = len(wave) // frame
    if n == 0:
        return wave
    energy = (wave[: n * frame].reshape(n, frame) ** 2).mean(1) + 1e-12
    loud = np.nonzero(10 * np.log10(energy / energy.max()) > rel_db)[0]
    return wave[loud[0] * frame: (loud[-1] + 1) * frame] if len(loud) else wave[:0]


def stream(utterances: list[np.ndarray], rng: random.Random) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Join utterances (each RMS-normalised to -25 dBFS) with 0.1-0.3 s pauses; return int16-ready floats."""
    parts, bounds, pos = [], [], 0
    for utt in utterances:
        utt = utt / (np.sqrt(np.mean(utt ** 2)) + 1e-9) * 10 ** (-25 / 20)
        pause = np.zeros(int(rng.uniform(0.1, 0.3) * SR), np.float32)
        parts += [utt.astype(np.float32), pause]
        bounds.append((pos, pos + len(utt)))
        pos += len(utt) + len(pause)
    return np.clip(np.concatenate(parts), -1, 1), bounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debs", type=Path, required=True, help="folder with the downloaded .deb files")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--real_train_utts", type=int, default=250)
    ap.add_argument("--real_test_utts", type=int, default=120)
    ap.add_argument("--espeak_utts", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sep_bench_"))
    unpack(args.debs, work)
    libdirs = sorted({str(p.parent) for p in work.rglob("*.so*")})
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(libdirs)}
    sounds = work / "usr/share/asterisk/sounds"

    real: dict[str, list[np.ndarray]] = {}
    for name in ("en_US_f_Allison", "fr_CA_f_June", "it_IT_f_Menardi"):
        files = sorted((sounds / name).rglob("*.wav"))
        rng.shuffle(files)
        real[name] = [w for w in (trim(load_audio(f, SR).numpy()) for f in files) if len(w) > SR // 2]
    gsm = sorted((sounds / "fr").rglob("*.gsm"))
    armelle = []
    for f in gsm:  # raw GSM 6.10 frames: libsndfile decodes them as sox -t gsm would
        data, _ = sf.read(str(f), format="RAW", subtype="GSM610", samplerate=8000, channels=1, dtype="float32")
        wave = trim(data)
        if len(wave) > SR // 2:
            armelle.append(wave)
    real["fr_armelle"] = armelle

    espeak = {}
    data_path = next(p for p in work.rglob("espeak-ng-data") if (p / "phontab").is_file())
    voices = [(v, var) for v in ESPEAK_VOICES for var in ESPEAK_VARIANTS]
    rng.shuffle(voices)
    for v, var in voices[:36]:
        utts = []
        for k in range(args.espeak_utts):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12)))
            out = work / f"es_{v}_{var}_{k}.wav"
            subprocess.run([str(work / "usr/bin/espeak-ng"), f"--path={data_path}", "-v", f"{v}+{var}",
                            "-s", str(rng.randint(140, 190)), "-p", str(rng.randint(30, 70)), "-w", str(out), text],
                           check=True, env=env, capture_output=True)
            utts.append(trim(load_audio(out, SR).numpy()))
        espeak[f"espeak_{v}_{var}"] = utts

    names = sorted(espeak)
    rng.shuffle(names)
    splits = {"train": ["en_US_f_Allison", "fr_armelle"] + sorted(names[10:]), "val": sorted(names[:4]),
              "test_real": ["fr_CA_f_June", "it_IT_f_Menardi"], "test_espeak": sorted(names[4:10])}
    speakers = {}
    for name, utts in {**real, **espeak}.items():
        limit = args.real_test_utts if name in splits["test_real"] else args.real_train_utts
        wave, bounds = stream(utts[:limit], rng)
        speakers[name] = {"audio": torch.from_numpy((wave * 32767).astype(np.int16)), "bounds": bounds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"sample_rate": SR, "speakers": speakers, "splits": splits}, args.out)
    summary = {s: {n: round(len(speakers[n]["audio"]) / SR, 1) for n in names_} for s, names_ in splits.items()}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({s: f"{len(v)} speakers, {sum(v.values()):.0f} s" for s, v in summary.items()}))
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB")
    sf.write(args.out.with_name("example_real.wav"), speakers["fr_CA_f_June"]["audio"][: 3 * SR].numpy(), SR)


if __name__ == "__main__":
    main()
