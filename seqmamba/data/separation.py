"""Speech-separation data: mixture tables, on-the-fly dynamic mixing, reproducible evaluation lists.

Two ways in:

(a) **Metadata tables** (CSV or parquet, read with polars), LibriMix / WSJ0-2mix style. One row per mixture:

    ==================  =================================================================================
    column              meaning
    ==================  =================================================================================
    mixture_id          optional name of the row (default: row number)
    mixture_path        optional mixture file; when absent the mixture is the sum of the scaled sources
    source_{i}_path     source i = 1..n_src (required)
    source_{i}_gain     optional linear gain applied to source i (default 1); ``source_{i}_gain_db`` in dB
    source_{i}_offset   optional first sample of source i, at the dataset's sample rate (default 0)
    noise_path          optional noise file, with optional ``noise_gain`` / ``noise_gain_db``, ``noise_offset``
    length              optional mixture length in samples (default: the shortest source from its offset)
    ==================  =================================================================================

    Relative paths are taken from ``root`` (default: the table's folder).

(b) **Dynamic mixing** from folders with one subfolder per speaker (WAV/FLAC files inside, any depth).
    Training mixtures are drawn afresh every time: ``n_src`` distinct speakers, one utterance each, a random
    crop of ``segment_seconds``, each source scaled to unit RMS and then by a random gain in ``gain_db``, and
    optional noise at a random SNR in ``noise_snr_db``. Validation and test mixtures are drawn once, from a
    fixed seed, over full utterances (cut to the shortest source, like WSJ0-2mix's "min" mode) and written as a
    metadata table (a) -- ``<list_dir>/{val,test}_<n_src>spk_seed<seed>_n<count>.csv``, atomically -- so
    every run and every model is scored on the same mixtures. Without ``val_dir``/``test_dir`` the speakers of
    ``train_dir`` are split into disjoint train / val / test speaker sets.

Batches are dicts: ``mixture (b, t)``, ``sources (b, n_src, t)``, ``lengths (b,)`` (real samples before
padding) and ``ids`` (list of str). Nothing here imports model code.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from seqmamba.data.audio import (AUDIO_EXTENSIONS, SILENCE_RMS, AudioError, Downmix, audio_info, check_silent,
                                 load_audio)
from seqmamba.hub import atomic_write

PEAK_LIMIT = 0.9
"""Dynamic mixtures whose peak exceeds this are scaled down (sources too) so that files never clip."""


# ---------------------------------------------------------------------------------------------------------------
# Speaker folders and the speaker-disjoint split


def scan_speakers(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``{speaker: sorted audio files}`` for each subfolder of ``root`` holding WAV/FLAC files (any depth).

    Paths are absolute, so lists written from them work from any folder. Raises ``AudioError`` if ``root`` is
    missing or holds no speaker folder with audio.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise AudioError(f"{root}: speaker folder root does not exist")
    speakers = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        if files:
            speakers[sub.name] = files
    if not speakers:
        raise AudioError(f"{root}: no speaker subfolders with {'/'.join(AUDIO_EXTENSIONS)} files "
                         "(expected one subfolder per speaker)")
    return speakers


def speaker_disjoint_split(speakers: list[str], val_fraction: float, test_fraction: float,
                           seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Shuffle ``speakers`` with ``seed`` and cut them into disjoint (train, val, test) lists.

    Each non-zero fraction gets at least one speaker; the lists are returned sorted.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"speaker fractions must be in [0, 1) and sum below 1, got val={val_fraction}, "
                         f"test={test_fraction}")
    order = sorted(speakers)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(order))) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * len(order))) if test_fraction > 0 else 0
    if n_val + n_test >= len(order):
        raise ValueError(f"{len(order)} speakers cannot be split into train/val/test with fractions "
                         f"{val_fraction}/{test_fraction}: no training speaker would be left")
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return sorted(train), sorted(val), sorted(test)


# ---------------------------------------------------------------------------------------------------------------
# Mixing


def rms(wave: torch.Tensor) -> float:
    return wave.double().pow(2).mean().sqrt().item() if wave.numel() else 0.0


@dataclass
class MixingConfig:
    """How dynamic mixtures are drawn."""

    n_src: int = 2
    sample_rate: int = 8000
    gain_db: tuple[float, float] = (-2.5, 2.5)
    """Each source is scaled to unit RMS, then by a gain drawn uniformly from this range (dB)."""
    noise_snr_db: tuple[float, float] = (10.0, 20.0)
    """SNR of the added noise against the sum of the sources (dB), drawn uniformly."""
    downmix: Downmix = "error"
    resample: bool = True


class _Loader:
    """Loads (and caches the lengths of) utterances at one sample rate with one downmix policy."""

    def __init__(self, sample_rate: int, downmix: Downmix, resample: bool):
        self.sample_rate, self.downmix, self.resample = sample_rate, downmix, resample
        self._lengths: dict[Path, int] = {}

    def length(self, path: Path) -> int:
        if path not in self._lengths:
            info = audio_info(path)
            if info.samplerate != self.sample_rate and not self.resample:
                raise AudioError(f"{path}: sample rate {info.samplerate} Hz, expected {self.sample_rate} Hz "
                                 "(set resample=True to convert)")
            self._lengths[path] = int(round(info.frames * self.sample_rate / info.samplerate))
        return self._lengths[path]

    def load(self, path: Path, offset: int = 0, length: int | None = None) -> torch.Tensor:
        """Samples ``[offset, offset + length)`` at the loader's rate, zero padded past the end of the file."""
        info = audio_info(path)
        if info.samplerate == self.sample_rate:
            frames = -1 if length is None else length
            wave = load_audio(path, self.sample_rate, resample_to_rate=False, downmix=self.downmix,
                              start=offset, frames=frames)
        else:
            wave = load_audio(path, self.sample_rate, resample_to_rate=self.resample, downmix=self.downmix)
            wave = wave[offset:] if length is None else wave[offset: offset + length]
        if length is not None and len(wave) < length:
            wave = torch.nn.functional.pad(wave, (0, length - len(wave)))
        return wave


def _draw_crop(rng: random.Random, loader: _Loader, path: Path, segment: int | None,
               tries: int = 10) -> tuple[int, torch.Tensor]:
    """A random ``segment``-sample crop of ``path`` that is not silent (None: the whole file), retrying."""
    total = loader.length(path)
    if segment is None or total <= segment:
        wave = loader.load(path, 0, segment)
        return 0, check_silent(wave, path, "utterance")
    for _ in range(tries):
        offset = rng.randrange(0, total - segment + 1)
        wave = loader.load(path, offset, segment)
        if rms(wave) >= SILENCE_RMS:
            return offset, wave
    wave = loader.load(path)
    check_silent(wave, path, "utterance")
    raise AudioError(f"{path}: {tries} random crops of {segment} samples were all silent")


def draw_mixture(rng: random.Random, speakers: dict[str, list[Path]], loader: _Loader, cfg: MixingConfig,
                 segment: int | None, noise_files: list[Path] | None = None) -> dict:
    """One random mixture as a metadata row (``mixture_id`` excluded) plus the rendered waveforms.

    Returns ``{"row": {...}, "mixture": (t,), "sources": (n_src, t)}``; the row renders to the same waveforms
    through ``render_row``. With ``segment=None`` the mixture covers the shortest of the full utterances.
    """
    if len(speakers) < cfg.n_src:
        raise ValueError(f"{cfg.n_src}-speaker mixtures need at least {cfg.n_src} speakers, got {len(speakers)}")
    chosen = rng.sample(sorted(speakers), cfg.n_src)
    paths = [rng.choice(speakers[s]) for s in chosen]
    if segment is None:
        length = min(loader.length(p) for p in paths)
        crops = [(0, check_silent(loader.load(p, 0, length), p, "utterance")) for p in paths]
    else:
        length = segment
        crops = [_draw_crop(rng, loader, p, segment) for p in paths]
    row: dict = {"length": length}
    sources = []
    for i, (spk, path, (offset, wave)) in enumerate(zip(chosen, paths, crops), start=1):
        gain = 10 ** (rng.uniform(*cfg.gain_db) / 20) / rms(wave)
        row |= {f"source_{i}_path": str(path), f"source_{i}_speaker": spk, f"source_{i}_offset": offset,
                f"source_{i}_gain": gain}
        sources.append(wave * gain)
    sources = torch.stack(sources)
    mixture = sources.sum(0)
    if noise_files:
        npath = rng.choice(noise_files)
        noff, noise = _draw_crop(rng, loader, npath, length) if loader.length(npath) > length else \
            (0, check_silent(loader.load(npath, 0, length), npath, "noise"))
        ngain = rms(mixture) / rms(noise) / 10 ** (rng.uniform(*cfg.noise_snr_db) / 20)
        row |= {"noise_path": str(npath), "noise_offset": noff, "noise_gain": ngain}
        mixture = mixture + noise * ngain
    peak = mixture.abs().max().item()
    if peak > PEAK_LIMIT:
        scale = PEAK_LIMIT / peak
        mixture, sources = mixture * scale, sources * scale
        for i in range(1, cfg.n_src + 1):
            row[f"source_{i}_gain"] *= scale
        if "noise_gain" in row:
            row["noise_gain"] *= scale
    return {"row": row, "mixture": mixture, "sources": sources}


def render_row(row: dict, n_src: int, loader: _Loader, root: Path | None = None, where: str = "") -> dict:
    """Waveforms of one metadata row: ``{"mixture": (t,), "sources": (n_src, t)}``.

    ``where`` (e.g. ``"val.csv row 3"``) goes into error messages.
    """
    def resolve(p) -> Path:
        p = Path(p)
        return p if p.is_absolute() or root is None else root / p

    def gain_of(prefix: str) -> float:
        if row.get(f"{prefix}_gain") is not None:
            return float(row[f"{prefix}_gain"])
        if row.get(f"{prefix}_gain_db") is not None:
            return 10 ** (float(row[f"{prefix}_gain_db"]) / 20)
        return 1.0

    paths, offsets = [], []
    for i in range(1, n_src + 1):
        if row.get(f"source_{i}_path") is None:
            raise AudioError(f"{where}: no source_{i}_path for a {n_src}-speaker mixture")
        paths.append(resolve(row[f"source_{i}_path"]))
        offsets.append(int(row.get(f"source_{i}_offset") or 0))
    length = row.get("length")
    if length is None:
        length = min(loader.length(p) - o for p, o in zip(paths, offsets))
    length = int(length)
    sources = []
    for i, (path, offset) in enumerate(zip(paths, offsets), start=1):
        try:
            wave = loader.load(path, offset, length) * gain_of(f"source_{i}")
            sources.append(check_silent(wave, path, f"source_{i}"))
        except AudioError as err:
            raise AudioError(f"{where}: {err}") from err
    sources = torch.stack(sources)
    mix_path = row.get("mixture_path")
    if mix_path is not None:
        try:
            mixture = loader.load(resolve(mix_path), 0, length)
        except AudioError as err:
            raise AudioError(f"{where}: {err}") from err
    else:
        mixture = sources.sum(0)
        if row.get("noise_path") is not None:
            noise = loader.load(resolve(row["noise_path"]), int(row.get("noise_offset") or 0), length)
            mixture = mixture + noise * gain_of("noise")
    return {"mixture": mixture, "sources": sources}


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def read_table(path: str | os.PathLike):
    """A metadata table (CSV or parquet) as a polars DataFrame, or an error naming the file."""
    import polars as pl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metadata table does not exist")
    try:
        if path.suffix.lower() == ".parquet":
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema_length=None)
    except Exception as err:  # polars raises several exception types for malformed files
        raise ValueError(f"{path}: cannot read metadata table ({err})") from err


class MetadataMixtures(Dataset):
    """Mixtures listed in a metadata table (see the module docstring for the columns).

    segment: crop length in samples (random crop for training; None: the full mixture).
    max_length: with ``segment=None``, cut mixtures longer than this many samples (from the start).
    """

    def __init__(self, table: str | os.PathLike, n_src: int = 2, sample_rate: int = 8000,
                 segment: int | None = None, root: str | os.PathLike | None = None, downmix: Downmix = "error",
                 resample: bool = True):
        self.path = Path(table)
        frame = read_table(self.path)
        needed = [f"source_{i}_path" for i in range(1, n_src + 1)]
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ValueError(f"{self.path}: missing column(s) {missing} for {n_src}-speaker mixtures; "
                             f"columns are {frame.columns}")
        if frame.height == 0:
            raise ValueError(f"{self.path}: the table has no rows")
        self.rows = frame.to_dicts()
        self.n_src, self.segment, self.max_length = n_src, segment, None
        self.root = Path(root) if root is not None else self.path.parent
        self.loader = _Loader(sample_rate, downmix, resample)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict:
        row = self.rows[idx]
        item = render_row(row, self.n_src, self.loader, self.root, where=f"{self.path} row {idx + 1}")
        length = item["mixture"].shape[-1]
        if self.segment is None and self.max_length is not None and length > self.max_length:
            item = {k: v[..., : self.max_length] for k, v in item.items()}
            length = self.max_length
        if self.segment is not None:
            if length > self.segment:
                start = int(torch.randint(0, length - self.segment + 1, ()).item())
                item = {k: v[..., start: start + self.segment] for k, v in item.items()}
            else:
                item = {k: torch.nn.functional.pad(v, (0, self.segment - length)) for k, v in item.items()}
        item["length"] = min(length, self.segment or length)
        item["id"] = str(row.get("mixture_id", idx))
        return item


class DynamicMixtures(Dataset):
    """Training mixtures drawn afresh for every item (dynamic mixing); ``epoch_size`` items an epoch.

    Randomness comes from torch's global generator (one draw an item), so runs are reproducible under
    ``seed_everything`` and every DataLoader worker and epoch sees new mixtures.
    """

    def __init__(self, speakers: dict[str, list[Path]], cfg: MixingConfig, segment: int, epoch_size: int,
                 noise_files: list[Path] | None = None):
        if len(speakers) < cfg.n_src:
            raise ValueError(f"dynamic mixing of {cfg.n_src} speakers needs at least {cfg.n_src} training "
                             f"speakers, got {len(speakers)}: {sorted(speakers)}")
        self.speakers, self.cfg, self.segment, self.epoch_size = speakers, cfg, segment, epoch_size
        self.noise_files = noise_files
        self.loader = _Loader(cfg.sample_rate, cfg.downmix, cfg.resample)

    def __len__(self) -> int:
        return self.epoch_size

    def __getitem__(self, idx: int) -> dict:
        rng = random.Random(int(torch.randint(0, 2 ** 62, ()).item()))
        item = draw_mixture(rng, self.speakers, self.loader, self.cfg, self.segment, self.noise_files)
        return {"mixture": item["mixture"], "sources": item["sources"], "length": self.segment, "id": str(idx)}


def build_mixture_list(speakers: dict[str, list[Path]], n_mixtures: int, cfg: MixingConfig, seed: int,
                       segment: int | None = None, noise_files: list[Path] | None = None,
                       max_length: int | None = None, progress: bool = False):
    """``n_mixtures`` mixtures drawn with ``seed`` as a polars metadata table (rows render via ``render_row``).

    segment None: full utterances cut to the shortest source (then to ``max_length`` samples if given).
    """
    import polars as pl

    rng = random.Random(seed)
    loader = _Loader(cfg.sample_rate, cfg.downmix, cfg.resample)
    rows = []
    iterator = range(n_mixtures)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="drawing mixture list", leave=False)
    for k in iterator:
        row = draw_mixture(rng, speakers, loader, cfg, segment, noise_files)["row"]
        if max_length is not None and row["length"] > max_length:
            row["length"] = max_length
        rows.append({"mixture_id": f"mix{k:05d}", **row})
    return pl.DataFrame(rows)


def write_table(frame, path: str | os.PathLike) -> Path:
    """Write a polars table as CSV or parquet (by extension), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        atomic_write(path, lambda tmp: frame.write_parquet(tmp))
    else:
        atomic_write(path, lambda tmp: frame.write_csv(tmp))
    return path


def collate_mixtures(items: list[dict]) -> dict:
    """Pad to the longest item: ``mixture (b, t)``, ``sources (b, n_src, t)``, ``lengths (b,)``, ``ids``."""
    longest = max(item["mixture"].shape[-1] for item in items)
    pad = lambda x: torch.nn.functional.pad(x, (0, longest - x.shape[-1]))  # noqa: E731
    return {
        "mixture": torch.stack([pad(item["mixture"]) for item in items]),
        "sources": torch.stack([pad(item["sources"]) for item in items]),
        "lengths": torch.tensor([item["length"] for item in items], dtype=torch.long),
        "ids": [item["id"] for item in items],
    }


# ---------------------------------------------------------------------------------------------------------------
# Synthetic voices (quickstart data: no download)


def synthetic_utterance(rng: np.random.Generator, f0: float, formants: np.ndarray, sample_rate: int,
                        seconds: float, jitter: float = 0.05, glide: float = 0.08) -> np.ndarray:
    """A harmonic "voice": syllables with gliding pitch around ``f0`` and formant-shaped spectra, with pauses.

    formants: ``(n_vowels, 3)`` formant frequencies (Hz) this speaker draws its vowels from.
    jitter, glide: each syllable's pitch starts within ``f0 * (1 +- jitter)`` and glides by up to ``+- glide``.
    """
    n = int(seconds * sample_rate)
    out = np.zeros(n, np.float32)
    pos = int(rng.uniform(0.0, 0.15) * sample_rate)
    while pos < n:
        dur = int(rng.uniform(0.12, 0.35) * sample_rate)
        dur = min(dur, n - pos)
        if dur < 16:
            break
        t = np.arange(dur) / sample_rate
        pitch = f0 * (1 + rng.uniform(-jitter, jitter) + rng.uniform(-glide, glide) * t / max(t[-1], 1e-3))
        phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
        vowel = formants[rng.integers(len(formants))]
        n_harm = int(sample_rate / 2 / pitch.max())
        k = np.arange(1, n_harm + 1)[:, None]                                   # (h, 1)
        freqs = k * pitch[None, :]                                               # (h, t)
        amp = sum(np.exp(-0.5 * ((freqs - f) / (60 + 0.08 * f)) ** 2) for f in vowel) + 0.02
        amp /= k ** 0.5
        syl = (amp * np.sin(k * phase[None, :])).sum(0)
        envelope = np.sin(np.pi * np.arange(dur) / dur) ** 0.6
        out[pos: pos + dur] += (syl * envelope).astype(np.float32)
        pos += dur + int(rng.uniform(0.0, 0.12) * sample_rate)
    peak = np.abs(out).max()
    return out / peak * 0.5 if peak > 0 else out


def make_synthetic_speakers(root: str | os.PathLike, n_speakers: int = 12, utterances: int = 8,
                            seconds: float = 2.0, sample_rate: int = 8000, seed: int = 0,
                            f0_range: tuple[float, float] = (90.0, 330.0)) -> Path:
    """Write ``n_speakers`` synthetic speakers (``root/spkNN/uttNN.wav``), each with its own pitch and vowels.

    Speakers differ in mean pitch (spread log-evenly over ``f0_range``, in shuffled order) and in their formant
    sets. Many speakers with few utterances each (the quickstart: 60 x 3) make a separator learn to group
    harmonics by pitch rather than memorise voices, so it also separates held-out speakers. Returns ``root``.
    """
    import soundfile as sf

    root = Path(root)
    rng = np.random.default_rng(seed)
    pitches = np.exp(np.linspace(np.log(f0_range[0]), np.log(f0_range[1]), n_speakers))
    rng.shuffle(pitches)
    for s in range(n_speakers):
        formants = np.sort(np.stack([rng.uniform(250, 900, 4), rng.uniform(900, 2300, 4),
                                     rng.uniform(2300, 3600, 4)], axis=1), axis=1)
        folder = root / f"spk{s:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for u in range(utterances):
            wave = synthetic_utterance(rng, pitches[s], formants, sample_rate, seconds * rng.uniform(0.8, 1.2))
            path = folder / f"utt{u:02d}.wav"
            atomic_write(path, lambda tmp: sf.write(tmp, wave, sample_rate, format="WAV", subtype="PCM_16"))
    return root


# ---------------------------------------------------------------------------------------------------------------
# DataModule


class SeparationData(L.LightningDataModule):
    """Speech-separation data for ``seqmamba fit``: metadata tables or dynamic mixing of speaker folders.

    Each split comes from its metadata table when given (``train_metadata`` ...), else from speaker folders:
    ``train_dir`` (dynamic mixing), ``val_dir`` / ``test_dir`` (fixed lists drawn once); without those two,
    ``train_dir``'s speakers are split disjointly by ``val_fraction`` / ``test_fraction``. Validation and test
    mixtures are full length; training mixtures are ``segment_seconds`` long.
    """

    def __init__(self, n_src: int = 2, sample_rate: int = 8000, segment_seconds: float = 4.0,
                 train_dir: str | None = None, val_dir: str | None = None, test_dir: str | None = None,
                 train_metadata: str | None = None, val_metadata: str | None = None,
                 test_metadata: str | None = None, metadata_root: str | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.1,
                 train_mixtures_per_epoch: int = 10000, n_val_mixtures: int = 200, n_test_mixtures: int = 200,
                 eval_max_seconds: float | None = None,
                 gain_db: tuple[float, float] = (-2.5, 2.5), noise_dir: str | None = None,
                 noise_snr_db: tuple[float, float] = (10.0, 20.0), list_dir: str | None = None, seed: int = 0,
                 batch_size: int = 4, eval_batch_size: int = 1, num_workers: int = 0,
                 downmix: Downmix = "error", resample: bool = True,
                 synthetic_speakers: int = 0, synthetic_utterances: int = 8, synthetic_seconds: float = 2.0):
        """
        Args:
            n_src: speakers per mixture (2 or 3 typically; any number >= 1 works).
            sample_rate: rate of everything the model sees; other files are resampled (``resample``) or rejected.
            segment_seconds: training crop length.
            train_dir, val_dir, test_dir: speaker-folder roots (one subfolder per speaker).
            train_metadata, val_metadata, test_metadata: metadata tables (CSV/parquet); they win over folders.
            metadata_root: base of relative paths in the tables (default: each table's folder).
            val_fraction, test_fraction: fractions of ``train_dir``'s speakers held out when ``val_dir`` /
                ``test_dir`` are not given.
            train_mixtures_per_epoch: dynamic-mixing items in one training epoch.
            n_val_mixtures, n_test_mixtures: size of the fixed evaluation lists.
            eval_max_seconds: cut evaluation mixtures to this length (None: full utterances).
            gain_db: per-source gain range (dB) after RMS normalisation.
            noise_dir: folder of noise files (any depth); adds noise at ``noise_snr_db``.
            list_dir: where the fixed lists are written (default ``<train_dir>_lists`` beside ``train_dir``).
            seed: seed of the speaker split and of the evaluation lists.
            batch_size, eval_batch_size, num_workers: DataLoader settings.
            downmix: multi-channel files: "error", "mean" (average channels) or "first" (channel 0).
            resample: resample files at other rates (else they are errors).
            synthetic_speakers: if > 0 and ``train_dir`` holds no audio, write that many synthetic speakers
                there first (the quickstart's data).
        """
        super().__init__()
        if n_src < 1:
            raise ValueError(f"n_src must be >= 1, got {n_src}")
        if train_dir is None and train_metadata is None:
            raise ValueError("SeparationData: give train_dir (speaker folders) or train_metadata (a table)")
        self.save_hyperparameters()
        self.n_src, self.sample_rate = n_src, sample_rate
        self.segment = int(round(segment_seconds * sample_rate))
        self.mixing = MixingConfig(n_src, sample_rate, tuple(gain_db), tuple(noise_snr_db), downmix, resample)
        self.datasets: dict[str, Dataset] = {}

    # -- preparation (rank 0): synthetic data, the fixed lists --------------------------------------------------
    @property
    def list_dir(self) -> Path:
        hp = self.hparams
        if hp.list_dir is not None:
            return Path(hp.list_dir)
        return Path(hp.train_dir).with_name(Path(hp.train_dir).name + "_lists")

    def list_path(self, split: str) -> Path:
        n = self.hparams.n_val_mixtures if split == "val" else self.hparams.n_test_mixtures
        return self.list_dir / f"{split}_{self.n_src}spk_seed{self.hparams.seed}_n{n}.csv"

    def _speaker_sets(self) -> dict[str, dict[str, list[Path]]]:
        hp = self.hparams
        pool = scan_speakers(hp.train_dir)
        val_frac = 0.0 if hp.val_dir or hp.val_metadata else hp.val_fraction
        test_frac = 0.0 if hp.test_dir or hp.test_metadata else hp.test_fraction
        train, val, test = speaker_disjoint_split(list(pool), val_frac, test_frac, hp.seed)
        sets = {"train": {s: pool[s] for s in train}, "val": {s: pool[s] for s in val},
                "test": {s: pool[s] for s in test}}
        for split in ("val", "test"):
            folder = getattr(hp, f"{split}_dir")
            if folder is not None:
                sets[split] = scan_speakers(folder)
        for split in ("val", "test"):
            if getattr(hp, f"{split}_metadata") is None and 0 < len(sets[split]) < self.n_src:
                raise ValueError(f"the {split} split has {len(sets[split])} speaker(s) ({sorted(sets[split])}), "
                                 f"fewer than n_src={self.n_src}: raise {split}_fraction or give {split}_dir")
        return sets

    def _noise_files(self) -> list[Path] | None:
        if self.hparams.noise_dir is None:
            return None
        root = Path(self.hparams.noise_dir)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise AudioError(f"{root}: noise_dir holds no {'/'.join(AUDIO_EXTENSIONS)} files")
        return files

    def prepare_data(self) -> None:
        hp = self.hparams
        if hp.train_dir is not None and hp.synthetic_speakers > 0:
            root = Path(hp.train_dir)
            if not root.is_dir() or not any(root.rglob("*.wav")):
                make_synthetic_speakers(root, hp.synthetic_speakers, hp.synthetic_utterances,
                                        hp.synthetic_seconds, self.sample_rate, hp.seed)
        if hp.train_dir is None:
            return
        sets = self._speaker_sets()
        for split, n in (("val", hp.n_val_mixtures), ("test", hp.n_test_mixtures)):
            if getattr(hp, f"{split}_metadata") is not None or not sets[split] or n <= 0:
                continue
            path = self.list_path(split)
            if path.is_file():
                continue  # drawn before with the same seed, size and speaker count: reuse it as it is
            max_len = None if hp.eval_max_seconds is None else int(hp.eval_max_seconds * self.sample_rate)
            table = build_mixture_list(sets[split], n, self.mixing, seed=hp.seed + (1 if split == "val" else 2),
                                       noise_files=self._noise_files(), max_length=max_len, progress=True)
            write_table(table, path)
            meta = {"split": split, "speakers": sorted(sets[split]), "n_src": self.n_src, "seed": hp.seed,
                    "sample_rate": self.sample_rate, "gain_db": list(hp.gain_db)}
            atomic_write(path.with_suffix(".json"),
                         lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))

    # -- datasets -------------------------------------------------------------------------------------------------
    def _table_dataset(self, table: str, segment: int | None) -> MetadataMixtures:
        hp = self.hparams
        return MetadataMixtures(table, self.n_src, self.sample_rate, segment, hp.metadata_root, hp.downmix,
                                hp.resample)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        sets = self._speaker_sets() if hp.train_dir is not None else None
        if hp.train_metadata is not None:
            self.datasets["train"] = self._table_dataset(hp.train_metadata, self.segment)
        else:
            self.datasets["train"] = DynamicMixtures(sets["train"], self.mixing, self.segment,
                                                     hp.train_mixtures_per_epoch, self._noise_files())
        for split in ("val", "test"):
            table = getattr(hp, f"{split}_metadata")
            if table is None and sets is not None and sets[split]:
                table = self.list_path(split)
                if not table.is_file():
                    raise FileNotFoundError(f"{table}: evaluation list missing; prepare_data() writes it")
            if table is not None:
                self.datasets[split] = self._table_dataset(table, None)
                if hp.eval_max_seconds is not None:
                    self.datasets[split].max_length = int(hp.eval_max_seconds * self.sample_rate)

    def speakers(self, split: str) -> list[str]:
        """Speaker names of a split drawn from folders (for reports and disjointness checks)."""
        return sorted(self._speaker_sets()[split])

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"SeparationData: no {split} data (give {split}_metadata, {split}_dir, or a "
                             f"non-zero {split}_fraction with train_dir)")
        return DataLoader(self.datasets[split], batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, collate_fn=collate_mixtures,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        shuffle = isinstance(self.datasets["train"], MetadataMixtures)
        return self._loader("train", shuffle, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.hparams.eval_batch_size)


__all__ = [
    "DynamicMixtures", "MetadataMixtures", "MixingConfig", "SeparationData", "build_mixture_list",
    "collate_mixtures", "draw_mixture", "make_synthetic_speakers", "read_table", "render_row", "scan_speakers",
    "speaker_disjoint_split", "write_table",
]
