"""Separating recordings of any length with a trained model: ``Separator.load(...).separate_file(path)``.

Long inputs are processed in windows of ``window_seconds`` that overlap by ``overlap_seconds``; memory is that
of one batch of windows whatever the length of the file. A separator's output channels carry no fixed speaker
order, so each window's channels are re-ordered to best match the previous window on the overlap
(normalised cross-correlation, the assignment maximising the summed correlation), and the overlap is
crossfaded with complementary raised-cosine ramps (weights summing to one). Files are read block by block and
each speaker is written to its own file through a temporary name that is renamed when the whole file is done.

    from seqmamba.tasks.separation import Separator
    sep = Separator.load("runs/SeparationModule/.../checkpoints/last.ckpt")
    paths = sep.separate_file("meeting.wav", out_dir="separated")   # meeting_spk1.wav, meeting_spk2.wav
    estimates = sep.separate(torch.randn(8000 * 60))                 # (n_src, t) tensor
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from seqmamba.data.audio import AudioBlockReader, AudioStreamWriter, Downmix
from seqmamba.tasks.separation.model import MambaSeparator


def crossfade_ramps(overlap: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(fade_out, fade_in), each ``(overlap,)``: raised-cosine ramps that sum to exactly one."""
    k = torch.arange(overlap, device=device, dtype=torch.float64)
    fade_in = torch.sin(0.5 * math.pi * (k + 0.5) / overlap) ** 2
    return (1 - fade_in).to(dtype), fade_in.to(dtype)


def align_permutation(previous: torch.Tensor, current: torch.Tensor) -> list[int]:
    """Order of ``current``'s channels that best matches ``previous`` on their common samples.

    previous, current: ``(n_src, o)``. Returns ``perm`` such that ``current[perm]`` lines up with
    ``previous``: the assignment maximising the summed normalised cross-correlation (exhaustive up to 6 sources,
    Hungarian through scipy above).
    """
    prev = previous.double() - previous.double().mean(-1, keepdim=True)
    cur = current.double() - current.double().mean(-1, keepdim=True)
    prev = prev / (prev.norm(dim=-1, keepdim=True) + 1e-12)
    cur = cur / (cur.norm(dim=-1, keepdim=True) + 1e-12)
    score = prev @ cur.T  # (n, n): score[i, j] = corr(previous i, current j)
    n = score.shape[0]
    if n <= 6:
        perms = list(itertools.permutations(range(n)))
        totals = [sum(score[i, p[i]].item() for i in range(n)) for p in perms]
        return list(perms[max(range(len(perms)), key=totals.__getitem__)])
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:
        raise ImportError(f"aligning {n} sources between windows needs scipy (pip install scipy)") from err
    rows, cols = linear_sum_assignment(score.cpu().numpy(), maximize=True)
    return [int(c) for _, c in sorted(zip(rows, cols))]


def window_starts(total: int, window: int, overlap: int) -> list[int]:
    """Start of each window: hop = window - overlap, the last window ends at ``total`` or earlier; every window
    after the first begins with ``overlap`` samples shared with the one before."""
    if overlap < 0 or window <= overlap:
        raise ValueError(f"need 0 <= overlap < window, got window={window}, overlap={overlap}")
    hop = window - overlap
    return list(range(0, max(total - overlap, 1), hop))


@torch.no_grad()
def separate_windows(model: Callable[[torch.Tensor], torch.Tensor], read: Callable[[int, int], torch.Tensor],
                     total: int, window: int, overlap: int, write: Callable[[torch.Tensor], None],
                     batch_windows: int = 1, device: torch.device | str | None = None,
                     progress: bool = False, desc: str = "separating") -> None:
    """Stream ``total`` samples through ``model`` in overlapping windows, writing aligned, crossfaded output.

    model: ``(b, w) -> (b, n_src, w)``. read(start, length) -> ``(length,)`` (zero padded past the end).
    write(block ``(n_src, m)``) receives consecutive output blocks covering ``[0, total)`` exactly once.
    batch_windows: windows of equal length run through the model together.
    """
    starts = window_starts(total, window, overlap)
    fade_out, fade_in = crossfade_ramps(overlap) if overlap else (None, None)
    tail = None  # (n_src, overlap): the previous window's last samples, not written yet
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="sample", unit_scale=True)

    def emit(block: torch.Tensor) -> None:
        write(block)
        if bar is not None:
            bar.update(block.shape[-1])

    try:
        for group_at in range(0, len(starts), batch_windows):
            group = starts[group_at: group_at + batch_windows]
            lengths = [min(window, total - s) for s in group]
            # equal-length windows share a forward pass; a shorter last window runs alone
            outputs = []
            for length, members in itertools.groupby(zip(group, lengths), key=lambda x: x[1]):
                members = list(members)
                batch = torch.stack([read(s, length) for s, _ in members])
                batch = batch.to(device) if device is not None else batch
                outputs.extend(model(batch).float().cpu())
            for (start, length), est in zip(zip(group, lengths), outputs):  # est (n_src, length)
                is_last = start == starts[-1]
                body_from = 0
                if tail is not None:
                    est = est[align_permutation(tail, est[:, :overlap])]
                    emit(tail * fade_out + est[:, :overlap] * fade_in)
                    body_from = overlap
                body_to = length if is_last or not overlap else length - overlap
                emit(est[:, body_from:body_to])
                tail = None if is_last or not overlap else est[:, body_to:].clone()
    finally:
        if bar is not None:
            bar.close()


class Separator:
    """A trained separator with the verbs users need: ``separate`` (tensors) and ``separate_file`` (files)."""

    def __init__(self, model: MambaSeparator, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Separator":
        """From a Lightning checkpoint (``.ckpt`` of ``SeparationModule``) or a ``save_pretrained`` folder."""
        path = Path(path)
        if path.is_dir():
            return cls(MambaSeparator.from_pretrained(path), device)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file or pretrained folder")
        from seqmamba.tasks.separation.module import SeparationModule

        try:
            module = SeparationModule.load_from_checkpoint(path, map_location="cpu")
        except Exception as err:  # not a checkpoint, or one of another model: say which file, not a traceback
            raise ValueError(f"{path}: not a SeparationModule checkpoint ({type(err).__name__}: {err})") from err
        return cls(module.model, device)

    @property
    def sample_rate(self) -> int:
        return self.model.config.sample_rate

    @property
    def n_src(self) -> int:
        return self.model.config.n_src

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)

    @torch.no_grad()
    def separate(self, mixture: torch.Tensor, window_seconds: float | None = None,
                 overlap_seconds: float = 1.0, batch_windows: int = 1, progress: bool = False) -> torch.Tensor:
        """mixture ``(t,)`` at ``self.sample_rate`` -> estimates ``(n_src, t)`` on the CPU.

        window_seconds None: the whole input in one pass (memory grows with t); else windowed as in the module
        docstring.
        """
        if mixture.ndim != 1:
            raise ValueError(f"separate: expected a mono waveform (t,), got shape {tuple(mixture.shape)}")
        if window_seconds is None:
            return self._run(mixture[None].to(self.device))[0].float().cpu()
        window = int(round(window_seconds * self.sample_rate))
        overlap = int(round(overlap_seconds * self.sample_rate))
        blocks: list[torch.Tensor] = []
        separate_windows(self._run, lambda s, n: _padded(mixture, s, n), len(mixture), window, overlap,
                         blocks.append, batch_windows, self.device, progress)
        return torch.cat(blocks, dim=-1)

    @torch.no_grad()
    def separate_file(self, path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                      window_seconds: float = 8.0, overlap_seconds: float = 1.0, batch_windows: int = 4,
                      downmix: Downmix = "error", extension: str = ".wav", progress: bool = True) -> list[Path]:
        """Separate a WAV/FLAC file of any length into ``<out_dir>/<stem>_spk<i><extension>`` (one per speaker,
        at the model's sample rate, written atomically). Input at another rate is resampled block by block.
        Returns the output paths."""
        path = Path(path)
        reader = AudioBlockReader(path, self.sample_rate, downmix=downmix)
        out_dir = Path(out_dir) if out_dir is not None else path.parent
        outs = [out_dir / f"{path.stem}_spk{i + 1}{extension}" for i in range(self.n_src)]
        window = int(round(window_seconds * self.sample_rate))
        overlap = int(round(overlap_seconds * self.sample_rate))
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(AudioStreamWriter(p, self.sample_rate)) for p in outs]

            def write(block: torch.Tensor) -> None:
                for writer, channel in zip(writers, block):
                    writer.write(channel)

            separate_windows(self._run, reader.read, len(reader), window, overlap, write, batch_windows,
                             self.device, progress, desc=path.name)
        return outs


def _padded(wave: torch.Tensor, start: int, length: int) -> torch.Tensor:
    block = wave[start: start + length]
    return nn.functional.pad(block, (0, length - len(block)))
