"""Audio I/O errors, the mixture builder (gains, crops, speaker disjointness, reproducible lists), tables."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import soundfile as sf
import torch

from seqmamba.data.audio import (AudioBlockReader, AudioError, AudioStreamWriter, check_silent, load_audio,
                                 write_audio)
from seqmamba.data.separation import (MetadataMixtures, MixingConfig, SeparationData, _Loader,
                                      build_mixture_list, collate_mixtures, draw_mixture, render_row,
                                      scan_speakers, speaker_disjoint_split)

SR = 8000


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.3, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def make_speakers(root: Path, n_speakers: int = 6, n_utts: int = 2, seconds: float = 0.5) -> Path:
    """Speaker folders of noisy tones: every utterance is distinct and none is silent."""
    rng = np.random.default_rng(1)
    for s in range(n_speakers):
        for u in range(n_utts):
            wave = tone(150 + 40 * s + 7 * u, seconds * (1 + 0.2 * u)) + 0.05 * rng.standard_normal(
                int(seconds * (1 + 0.2 * u) * SR)).astype(np.float32)
            (root / f"spk{s}").mkdir(parents=True, exist_ok=True)
            sf.write(root / f"spk{s}" / f"u{u}.wav", wave, SR)
    return root


# --- audio I/O -------------------------------------------------------------------------------------------------


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wav file")
    with pytest.raises(AudioError, match="broken.wav"):
        load_audio(bad)
    with pytest.raises(AudioError, match="missing.flac: no such audio file"):
        load_audio(tmp_path / "missing.flac")


def test_multichannel_needs_a_downmix_choice(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = tone(200, 0.1), tone(300, 0.1, amp=0.1)
    sf.write(path, np.stack([left, right], 1), SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"stereo.wav: 2 channels where mono audio is expected"):
        load_audio(path)
    np.testing.assert_allclose(load_audio(path, downmix="mean").numpy(), (left + right) / 2, atol=1e-7)
    np.testing.assert_allclose(load_audio(path, downmix="first").numpy(), left, atol=1e-7)
    with pytest.raises(AudioError, match="stereo.wav: 2 channels"):
        AudioBlockReader(path)


def test_sample_rate_mismatch_rejected_or_resampled(tmp_path):
    path = tmp_path / "wide.flac"
    sf.write(path, tone(440, 0.5, sr=16000), 16000)
    with pytest.raises(AudioError, match=r"wide.flac: sample rate 16000 Hz, expected 8000 Hz"):
        load_audio(path, SR, resample_to_rate=False)
    wave = load_audio(path, SR)
    assert wave.shape == (4000,)
    ref = tone(440, 0.5)
    # a 440 Hz tone survives the 16k -> 8k resampling (away from the edges)
    assert np.abs(wave.numpy()[200:-200] - ref[200:-200]).max() < 1e-2


def test_nan_and_inf_samples_rejected(tmp_path):
    path = tmp_path / "nan.wav"
    data = tone(300, 0.1)
    data[17] = np.nan
    data[40] = np.inf
    sf.write(path, data, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan.wav: audio has 2 NaN/Inf sample\(s\), the first at sample 17"):
        load_audio(path)


def test_silent_source_rejected(tmp_path):
    with pytest.raises(AudioError, match="quiet.wav: source is silent"):
        check_silent(torch.zeros(100), tmp_path / "quiet.wav")
    check_silent(torch.full((100,), 0.01), "loud.wav")


def test_write_audio_is_atomic_and_round_trips(tmp_path):
    wave = torch.from_numpy(tone(300, 0.2))
    out = write_audio(tmp_path / "sub" / "x.wav", wave, SR)
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], wave.numpy())
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.wav"]
    with pytest.raises(AudioError, match=r"y.mp3: cannot write audio with extension '.mp3'"):
        write_audio(tmp_path / "y.mp3", wave, SR)
    # the stream writer leaves nothing behind when interrupted
    with pytest.raises(RuntimeError):
        with AudioStreamWriter(tmp_path / "z.wav", SR) as writer:
            writer.write(wave)
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_block_reader_matches_whole_file(tmp_path):
    path = tmp_path / "long.wav"
    data = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 0.1
    sf.write(path, data, SR, subtype="FLOAT")
    reader = AudioBlockReader(path, SR)
    assert len(reader) == 5000
    np.testing.assert_array_equal(reader.read(1234, 1000).numpy(), data[1234:2234])
    tail = reader.read(4500, 1000).numpy()  # zero padded past the end
    np.testing.assert_array_equal(tail[:500], data[4500:])
    assert not tail[500:].any()
    # resampled in blocks = resampled whole (the margin hides block edges)
    path16 = tmp_path / "long16.wav"
    sf.write(path16, tone(500, 1.0, sr=16000) + tone(1700, 1.0, sr=16000, amp=0.1), 16000, subtype="FLOAT")
    whole = load_audio(path16, SR)
    blocks = AudioBlockReader(path16, SR, margin=512)
    got = torch.cat([blocks.read(s, 1000) for s in range(0, 8000, 1000)])
    assert len(blocks) == 8000
    assert (got[100:-100] - whole[100:-100]).abs().max() < 2e-3


# --- speaker folders, split, mixing ---------------------------------------------------------------------------


def test_scan_speakers_and_errors(tmp_path):
    make_speakers(tmp_path / "spk", 3, 2)
    (tmp_path / "spk" / "empty").mkdir()
    speakers = scan_speakers(tmp_path / "spk")
    assert sorted(speakers) == ["spk0", "spk1", "spk2"]  # the folder without audio is not a speaker
    assert all(len(files) == 2 and all(p.is_absolute() for p in files) for files in speakers.values())
    with pytest.raises(AudioError, match="no speaker subfolders"):
        scan_speakers(tmp_path / "spk" / "empty")


def test_speaker_disjoint_split():
    names = [f"s{i}" for i in range(20)]
    train, val, test = speaker_disjoint_split(names, 0.1, 0.2, seed=3)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val + test) == sorted(names)
    assert speaker_disjoint_split(names, 0.1, 0.2, seed=3) == (train, val, test)
    assert speaker_disjoint_split(names, 0.1, 0.2, seed=4) != (train, val, test)
    with pytest.raises(ValueError, match="no training speaker"):
        speaker_disjoint_split(names[:2], 0.4, 0.4)


@pytest.mark.parametrize("n_src", [2, 3])
def test_dynamic_mixture_gains_and_crops(tmp_path, n_src):
    speakers = scan_speakers(make_speakers(tmp_path, 5, 2, seconds=0.5))
    loader = _Loader(SR, "error", True)
    cfg = MixingConfig(n_src=n_src, sample_rate=SR, gain_db=(-3.0, 3.0))
    for seed in range(4):
        item = draw_mixture(random.Random(seed), speakers, loader, cfg, segment=1000)
        row, sources = item["row"], item["sources"]
        assert sources.shape == (n_src, 1000) and item["mixture"].shape == (1000,)
        torch.testing.assert_close(item["mixture"], sources.sum(0))
        spk = [row[f"source_{i}_speaker"] for i in range(1, n_src + 1)]
        assert len(set(spk)) == n_src  # distinct speakers
        levels = []
        for i in range(n_src):
            path, offset, gain = Path(row[f"source_{i + 1}_path"]), row[f"source_{i + 1}_offset"], row[
                f"source_{i + 1}_gain"]
            raw = sf.read(path, dtype="float32")[0]
            assert 0 <= offset <= len(raw) - 1000  # the crop lies inside the file
            np.testing.assert_allclose(sources[i].numpy(), raw[offset: offset + 1000] * gain, rtol=1e-5, atol=1e-7)
            levels.append(10 * np.log10(np.mean(raw[offset: offset + 1000].astype(np.float64) ** 2) * gain ** 2))
        # unit RMS times a gain in [-3, 3] dB, then one common peak scale: level differences within 6 dB
        assert max(levels) - min(levels) <= 6.0 + 1e-6
        assert item["mixture"].abs().max() <= 0.9 + 1e-6
        # the row alone re-renders the same waveforms
        again = render_row(row, n_src, loader)
        torch.testing.assert_close(again["sources"], sources)


def test_zero_gain_range_gives_equal_levels(tmp_path):
    speakers = scan_speakers(make_speakers(tmp_path, 3, 1))
    item = draw_mixture(random.Random(0), speakers, _Loader(SR, "error", True),
                        MixingConfig(2, SR, gain_db=(0.0, 0.0)), segment=800)
    rms = item["sources"].double().pow(2).mean(-1).sqrt()
    assert abs(rms[0] / rms[1] - 1) < 1e-6


def test_noise_is_added_at_the_drawn_snr(tmp_path):
    speakers = scan_speakers(make_speakers(tmp_path / "spk", 3, 1))
    (tmp_path / "noise").mkdir()
    sf.write(tmp_path / "noise" / "n.wav", np.random.default_rng(2).standard_normal(8000).astype(np.float32) * 0.1,
             SR, subtype="FLOAT")
    cfg = MixingConfig(2, SR, noise_snr_db=(10.0, 12.0))
    item = draw_mixture(random.Random(0), speakers, _Loader(SR, "error", True), cfg, 1000,
                        noise_files=[tmp_path / "noise" / "n.wav"])
    clean = item["sources"].sum(0).double()
    noise = item["mixture"].double() - clean
    snr = 10 * torch.log10(clean.pow(2).sum() / noise.pow(2).sum()).item()
    assert 10.0 - 1e-3 <= snr <= 12.0 + 1e-3
    assert item["row"]["noise_path"].endswith("n.wav")


def test_fixed_lists_reproducible_and_speaker_disjoint(tmp_path):
    root = make_speakers(tmp_path / "train", 8, 2)
    kwargs = dict(train_dir=str(root), val_fraction=0.25, test_fraction=0.25, n_val_mixtures=5, n_test_mixtures=6,
                  segment_seconds=0.1, list_dir=str(tmp_path / "lists"))
    dm = SeparationData(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    train, val, test = dm.speakers("train"), dm.speakers("val"), dm.speakers("test")
    assert len(val) == 2 and len(test) == 2 and len(train) == 4
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    val_table = pl.read_csv(dm.list_path("val"))
    assert val_table.height == 5
    used = set(val_table["source_1_speaker"]) | set(val_table["source_2_speaker"])
    assert used <= set(val)
    test_used = set(pl.read_csv(dm.list_path("test"))["source_1_speaker"])
    assert test_used <= set(test)
    # a second module with the same settings writes the same list (drawn from the seed, not the clock)
    first = dm.list_path("val").read_text()
    dm.list_path("val").unlink()
    SeparationData(**kwargs).prepare_data()
    assert dm.list_path("val").read_text() == first
    # a different seed gives another list, under another name
    other = SeparationData(**{**kwargs, "seed": 1})
    other.prepare_data()
    assert other.list_path("val") != dm.list_path("val") and other.list_path("val").read_text() != first
    # evaluation items are full-length mixtures (shortest source), identical on every read
    a, b = dm.datasets["val"][0], dm.datasets["val"][0]
    torch.testing.assert_close(a["mixture"], b["mixture"])
    assert a["mixture"].shape[-1] == val_table["length"][0]
    batch = next(iter(dm.train_dataloader()))
    assert batch["mixture"].shape == (4, 800) and batch["sources"].shape == (4, 2, 800)


def test_val_and_test_dirs_replace_the_split(tmp_path):
    make_speakers(tmp_path / "train", 3, 1)
    make_speakers(tmp_path / "val", 2, 1)
    dm = SeparationData(n_src=2, train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"),
                        test_fraction=0.0, n_val_mixtures=2, list_dir=str(tmp_path / "lists"))
    assert dm.speakers("train") == ["spk0", "spk1", "spk2"] and dm.speakers("test") == []
    assert dm.speakers("val") == ["spk0", "spk1"]
    dm.prepare_data()
    assert {Path(p).parent.parent.name for p in pl.read_csv(dm.list_path("val"))["source_1_path"]} == {"val"}
    three = SeparationData(n_src=3, train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"),
                           test_fraction=0.0)
    with pytest.raises(ValueError, match=r"val split has 2 speaker\(s\).*fewer than n_src=3"):
        three.prepare_data()


def test_metadata_tables_csv_and_parquet(tmp_path):
    s1, s2 = tone(200, 0.25), tone(330, 0.25, amp=0.2)
    for name, data in (("a.wav", s1), ("b.wav", s2), ("mix.wav", s1 + s2), ("z.wav", np.zeros(2000, np.float32))):
        sf.write(tmp_path / name, data, SR, subtype="FLOAT")
    table = pl.DataFrame({"mixture_id": ["m1", "m2"], "source_1_path": ["a.wav", "a.wav"],
                          "source_2_path": ["b.wav", "b.wav"], "source_2_gain_db": [0.0, 6.0]})
    table.write_csv(tmp_path / "t.csv")
    table.write_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        ds = MetadataMixtures(tmp_path / name, n_src=2, sample_rate=SR)
        item = ds[1]
        assert item["id"] == "m2"
        np.testing.assert_allclose(item["sources"][1].numpy(), s2 * 10 ** (6 / 20), rtol=1e-5)
        np.testing.assert_allclose(item["mixture"].numpy(), s1 + s2 * 10 ** (6 / 20), rtol=1e-5, atol=1e-6)
    # with a mixture file the mixture is read, not rebuilt
    pl.DataFrame({"mixture_path": ["mix.wav"], "source_1_path": ["a.wav"], "source_2_path": ["b.wav"]}).write_csv(
        tmp_path / "m.csv")
    item = MetadataMixtures(tmp_path / "m.csv", 2, SR)[0]
    np.testing.assert_allclose(item["mixture"].numpy(), s1 + s2, atol=1e-7)
    # random training crops keep mixture and sources aligned
    crop = MetadataMixtures(tmp_path / "m.csv", 2, SR, segment=500)[0]
    torch.testing.assert_close(crop["mixture"], crop["sources"].sum(0), atol=1e-6, rtol=0)
    # errors name the table, the row and the file
    pl.DataFrame({"source_1_path": ["a.wav"], "source_2_path": ["z.wav"]}).write_csv(tmp_path / "silent.csv")
    with pytest.raises(AudioError, match=r"silent.csv row 1: .*z.wav: source_2 is silent"):
        MetadataMixtures(tmp_path / "silent.csv", 2, SR)[0]
    with pytest.raises(ValueError, match=r"m.csv: missing column\(s\) \['source_3_path'\]"):
        MetadataMixtures(tmp_path / "m.csv", 3, SR)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        MetadataMixtures(tmp_path / "nope.csv", 2, SR)


def test_collate_pads_and_keeps_lengths():
    items = [{"mixture": torch.ones(5), "sources": torch.ones(2, 5), "length": 5, "id": "a"},
             {"mixture": torch.ones(3), "sources": torch.ones(2, 3), "length": 3, "id": "b"}]
    batch = collate_mixtures(items)
    assert batch["mixture"].shape == (2, 5) and batch["lengths"].tolist() == [5, 3]
    assert batch["mixture"][1, 3:].abs().sum() == 0 and batch["ids"] == ["a", "b"]


def test_build_mixture_list_three_speakers(tmp_path):
    speakers = scan_speakers(make_speakers(tmp_path, 4, 2))
    table = build_mixture_list(speakers, 3, MixingConfig(3, SR), seed=7, max_length=1500)
    assert table.height == 3 and (table["length"] <= 1500).all()
    assert table.equals(build_mixture_list(speakers, 3, MixingConfig(3, SR), seed=7, max_length=1500))


def _median_f0(wave: np.ndarray, sr: int = SR, lo: float = 70.0, hi: float = 300.0) -> float:
    """Median pitch (Hz) of the loud 40 ms frames of ``wave``: the autocorrelation peak in [sr/hi, sr/lo]."""
    n, f0s = int(0.04 * sr), []
    frames = [wave[i: i + n] for i in range(0, len(wave) - n, n)]
    loud = max(float(np.square(f).mean()) for f in frames)
    for f in frames:
        if np.square(f).mean() < 0.1 * loud:
            continue
        f = f - f.mean()
        ac = np.correlate(f, f, "full")[n - 1:]
        lags = np.arange(int(sr / hi), int(sr / lo) + 1)
        f0s.append(sr / lags[np.argmax(ac[lags])])
    return float(np.median(f0s))


def test_synthetic_speakers_have_their_own_pitch(tmp_path):
    from seqmamba.data.separation import make_synthetic_speakers

    seed = int(np.random.default_rng().integers(1000))
    root = make_synthetic_speakers(tmp_path / "syn", n_speakers=4, utterances=2, seconds=1.0, seed=seed,
                                   f0_range=(100.0, 200.0))
    assert sorted(p.name for p in root.iterdir()) == ["spk00", "spk01", "spk02", "spk03"]
    medians = []
    for spk in sorted(root.iterdir()):
        waves = [sf.read(p, dtype="float32")[0] for p in sorted(spk.glob("*.wav"))]
        assert len(waves) == 2 and all(0.5 * SR <= len(w) <= 1.5 * SR and np.abs(w).max() > 0.1 for w in waves)
        medians.append(_median_f0(np.concatenate(waves)))
    # speakers' mean pitches are log-evenly spread over f0_range (shuffled); each syllable stays within
    # +-5% (jitter) +-8% (glide) of it, so the median lands within a few percent (lags are whole samples:
    # 2.5% steps at 200 Hz)
    expected = np.exp(np.linspace(np.log(100.0), np.log(200.0), 4))
    np.testing.assert_allclose(np.sort(medians), expected, rtol=0.08, err_msg=f"seed {seed}")
