"""Audio files in and out: soundfile for WAV/FLAC, torchaudio for resampling, errors that name the file.

Every reader returns float32 mono ``(t,)`` tensors at the sample rate the caller asks for. What the file cannot
give is an ``AudioError`` (a ``ValueError``) whose message starts with the path:

- unreadable or missing file, or a format soundfile does not know;
- several channels where mono is expected (``downmix="error"``, the default), unless ``downmix="mean"``
  (average of the channels) or ``downmix="first"`` (channel 0) is asked for;
- a sample rate other than the one expected, unless ``resample=True`` (torchaudio's band-limited sinc);
- NaN or Inf samples;
- a silent signal where a source is expected (``check_silent``).

Writers go through a temporary file beside the target and a rename (``write_audio``, ``AudioStreamWriter``), so
an interrupted job never leaves a file that looks complete.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch

from seqmamba.hub import atomic_write

AUDIO_EXTENSIONS = (".wav", ".flac")
Downmix = Literal["error", "mean", "first"]
SILENCE_RMS = 1e-5
"""RMS below which a source counts as silent (-100 dBFS): SI-SNR against it is undefined."""


class AudioError(ValueError):
    """An audio file that cannot be used as asked; the message names the file and what was wrong."""


def audio_info(path: str | os.PathLike) -> sf._SoundFileInfo:
    """soundfile's header info (``samplerate``, ``frames``, ``channels``), or ``AudioError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        return sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as err:
        raise AudioError(f"{path}: cannot read audio header ({err})") from err


def _to_mono(data: np.ndarray, path: Path, downmix: Downmix) -> np.ndarray:
    """data ``(t, c)`` -> ``(t,)``."""
    if data.shape[1] == 1:
        return data[:, 0]
    if downmix == "mean":
        return data.mean(axis=1)
    if downmix == "first":
        return data[:, 0]
    raise AudioError(f"{path}: {data.shape[1]} channels where mono audio is expected "
                     "(pass downmix='mean' to average the channels or downmix='first' to keep channel 0)")


def check_finite(wave: torch.Tensor, path: str | os.PathLike, what: str = "audio") -> torch.Tensor:
    """Raise ``AudioError`` if ``wave`` holds NaN or Inf, naming the first bad sample."""
    bad = ~torch.isfinite(wave)
    if bad.any():
        first = int(bad.reshape(-1).nonzero()[0])
        raise AudioError(f"{path}: {what} has {int(bad.sum())} NaN/Inf sample(s), the first at sample {first}")
    return wave


def check_silent(wave: torch.Tensor, path: str | os.PathLike, what: str = "source",
                 threshold: float = SILENCE_RMS) -> torch.Tensor:
    """Raise ``AudioError`` if the RMS of ``wave`` is below ``threshold`` (default -100 dBFS)."""
    rms = wave.double().pow(2).mean().sqrt().item() if wave.numel() else 0.0
    if rms < threshold:
        raise AudioError(f"{path}: {what} is silent (RMS {rms:.2e} < {threshold:.0e}); a silent reference makes "
                         "SI-SNR undefined")
    return wave


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """torchaudio's band-limited sinc resampling along the last axis (identity when the rates agree)."""
    if orig_rate == new_rate:
        return wave
    import torchaudio.functional as AF

    return AF.resample(wave, orig_rate, new_rate)


def load_audio(path: str | os.PathLike, sample_rate: int | None = None, *, resample_to_rate: bool = True,
               downmix: Downmix = "error", start: int = 0, frames: int = -1) -> torch.Tensor:
    """Read ``path`` as float32 mono ``(t,)``.

    sample_rate: the rate the caller expects (None: keep the file's rate). A file at another rate is resampled
        when ``resample_to_rate`` (the default), else rejected.
    start, frames: the part to read, in samples of the *file*.
    """
    path = Path(path)
    info = audio_info(path)
    if sample_rate is not None and info.samplerate != sample_rate and not resample_to_rate:
        raise AudioError(f"{path}: sample rate {info.samplerate} Hz, expected {sample_rate} Hz "
                         "(resample_to_rate=True converts it)")
    try:
        data, rate = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise AudioError(f"{path}: cannot read audio ({err})") from err
    wave = torch.from_numpy(np.ascontiguousarray(_to_mono(data, path, downmix)))
    check_finite(wave, path)
    if sample_rate is not None and rate != sample_rate:
        wave = resample(wave, rate, sample_rate)
    return wave


def _format_for(path: Path) -> str:
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
    if fmt is None:
        raise AudioError(f"{path}: cannot write audio with extension {path.suffix!r}; use .wav or .flac")
    return fmt


def write_audio(path: str | os.PathLike, wave: torch.Tensor | np.ndarray, sample_rate: int,
                subtype: str | None = None) -> Path:
    """Write ``wave`` ``(t,)`` (mono) or ``(c, t)`` atomically as WAV or FLAC (chosen by the extension).

    subtype: soundfile subtype, default ``"FLOAT"`` for WAV and ``"PCM_24"`` for FLAC.
    """
    path = Path(path)
    fmt = _format_for(path)
    data = wave.detach().cpu().float().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float32)
    data = data.T if data.ndim == 2 else data  # soundfile wants (t, c)
    subtype = subtype or ("FLOAT" if fmt == "WAV" else "PCM_24")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sf.write(tmp, data, sample_rate, format=fmt, subtype=subtype))
    return path


class AudioStreamWriter:
    """Write a mono file block by block to a temporary name; ``commit()`` renames it into place.

    Used as a context manager: leaving the block with an exception deletes the temporary file, leaving it
    normally commits. Memory stays that of one block.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, subtype: str | None = None):
        self.path = Path(path)
        fmt = _format_for(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        subtype = subtype or ("FLOAT" if fmt == "WAV" else "PCM_24")
        self._file = sf.SoundFile(tmp, "w", samplerate=sample_rate, channels=1, format=fmt, subtype=subtype)
        self.frames = 0

    def write(self, block: torch.Tensor | np.ndarray) -> None:
        data = block.detach().cpu().float().numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
        self._file.write(data.astype(np.float32, copy=False))
        self.frames += len(data)

    def commit(self) -> Path:
        self._file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AudioStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class AudioBlockReader:
    """Read a long file in blocks, converted to mono float32 at ``sample_rate``, without loading all of it.

    ``len(reader)`` is the length in output samples; ``reader.read(start, length)`` returns ``(length,)`` (zero
    padded past the end) for positions in output samples. With a resampled file each block is read with
    ``margin`` extra input samples on both sides, resampled, and trimmed, so block seams carry no edge effects.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int | None = None, *, resample_to_rate: bool = True,
                 downmix: Downmix = "error", margin: int = 256):
        self.path = Path(path)
        info = audio_info(self.path)
        self.file_rate = info.samplerate
        self.sample_rate = sample_rate or info.samplerate
        if self.sample_rate != self.file_rate and not resample_to_rate:
            raise AudioError(f"{self.path}: sample rate {self.file_rate} Hz, expected {self.sample_rate} Hz "
                             "(resample_to_rate=True converts it)")
        if info.channels > 1 and downmix == "error":
            _to_mono(np.zeros((1, info.channels), np.float32), self.path, downmix)  # raises the usual error
        self.downmix, self.margin = downmix, margin
        self.file_frames = info.frames
        self.frames = int(round(info.frames * self.sample_rate / self.file_rate))

    def __len__(self) -> int:
        return self.frames

    def _read_file(self, start: int, stop: int) -> torch.Tensor:
        lo, hi = max(start, 0), min(stop, self.file_frames)
        out = torch.zeros(stop - start)
        if hi > lo:
            try:
                data, _ = sf.read(str(self.path), start=lo, stop=hi, dtype="float32", always_2d=True)
            except (RuntimeError, sf.LibsndfileError) as err:
                raise AudioError(f"{self.path}: cannot read samples {lo}..{hi} ({err})") from err
            wave = torch.from_numpy(np.ascontiguousarray(_to_mono(data, self.path, self.downmix)))
            check_finite(wave, self.path, f"samples {lo}..{hi}")
            out[lo - start: lo - start + len(wave)] = wave
        return out

    def read(self, start: int, length: int) -> torch.Tensor:
        if self.sample_rate == self.file_rate:
            return self._read_file(start, start + length)
        ratio = self.file_rate / self.sample_rate
        in_start = int(np.floor(start * ratio)) - self.margin
        in_stop = int(np.ceil((start + length) * ratio)) + self.margin
        block = resample(self._read_file(in_start, in_stop), self.file_rate, self.sample_rate)
        offset = int(round((start * ratio - in_start) / ratio))
        block = block[offset: offset + length]
        return torch.nn.functional.pad(block, (0, length - len(block)))
