"""Scoring a multi-FASTA: output schema, per-base log-likelihoods against the model's own logits, windowed
versus whole-record mode, atomic writes, the track plot, and the Python API (load, embed, predict)."""
import numpy as np
import polars as pl
import pytest
import torch

from seqmamba import MambaConfig
from seqmamba.tasks.dna import api
from seqmamba.tasks.dna.model import CaduceusConfig, CaduceusForMaskedLM, CaduceusWithHead

SEQS = {"r1": "ACGTTGCAAGGCTTANACGGT" * 3, "r2": "GGGATTACA"}


@pytest.fixture()
def fasta(tmp_path):
    path = tmp_path / "g.fa"
    path.write_text("".join(f">{k} some description\n{v}\n" for k, v in SEQS.items()))
    return path


def tiny(rcps=True, cls=CaduceusForMaskedLM, **kw):
    model = cls(CaduceusConfig(d_model=8, n_layer=1, rcps=rcps, mamba=MambaConfig(d_state=2)), **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("rcps", [True, False])
def test_score_fasta_schema_and_values(tmp_path, fasta, rcps):
    model = tiny(rcps)
    written = api.score_fasta(model, fasta, tmp_path / "out" / "s.parquet", mode="whole", progress=False)
    records = pl.read_parquet(written["records"])
    assert records.columns == ["record", "length", "mean_loglik", "embedding"]
    assert records["record"].to_list() == ["r1", "r2"] and records["length"].to_list() == [63, 9]
    assert len(records["embedding"][0]) == 8
    bases = pl.read_parquet(written["bases"])
    assert bases.columns == ["record", "position", "base", "loglik"] and bases.height == 72
    r1 = bases.filter(pl.col("record").cast(pl.String) == "r1")
    assert "".join(r1["base"].to_list()) == SEQS["r1"]
    assert r1.filter(pl.col("base") == "N")["loglik"].is_nan().all()
    # by hand: log-softmax over A/C/G/T of the model's logits at each observed base (N fed as [PAD])
    ids = torch.tensor([[{"A": 7, "C": 8, "G": 9, "T": 10, "N": 4}[c] for c in SEQS["r1"]]])
    with torch.no_grad():
        logits = model(ids, conjoin=not rcps)[0, :, 7:11].double().log_softmax(-1)
    expect = [logits[i, "ACGT".index(c)].item() if c != "N" else np.nan for i, c in enumerate(SEQS["r1"])]
    np.testing.assert_allclose(r1["loglik"].to_numpy(), expect, rtol=1e-5, atol=1e-6)
    assert records["mean_loglik"][0] == pytest.approx(np.nanmean(expect), rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s.bases.parquet", "s.parquet"]


def test_windowed_mode_covers_every_base_and_matches_whole_when_window_is_long(tmp_path, fasta):
    model = tiny()
    whole = api.score_fasta(model, fasta, tmp_path / "w.parquet", mode="whole", progress=False)
    long = api.score_fasta(model, fasta, tmp_path / "l.parquet", mode="windowed", window=100, overlap=10,
                           progress=False)
    short = api.score_fasta(model, fasta, tmp_path / "s.parquet", mode="windowed", window=16, overlap=6,
                            progress=False)
    a, b, c = (pl.read_parquet(w["bases"]) for w in (whole, long, short))
    np.testing.assert_allclose(b["loglik"].to_numpy(), a["loglik"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert c.height == a.height and c["loglik"].is_nan().sum() == a["loglik"].is_nan().sum()
    np.testing.assert_allclose(pl.read_parquet(long["records"])["embedding"].to_list(),
                               pl.read_parquet(whole["records"])["embedding"].to_list(), rtol=1e-5, atol=1e-6)


def test_failed_write_leaves_nothing_behind(tmp_path, fasta, monkeypatch):
    out = tmp_path / "s.parquet"
    out.write_bytes(b"old")

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        api.score_fasta(tiny(), fasta, out, mode="whole", progress=False)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.fa", "s.parquet"]


def test_plot_track(tmp_path, fasta):
    written = api.score_fasta(tiny(), fasta, tmp_path / "s.parquet", progress=False)
    png = api.plot_track(written["bases"], "r1", 5, 50, tmp_path / "t.png", smooth=5)
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no rows"):
        api.plot_track(written["bases"], "r9", 0, 10, tmp_path / "x.png")


def test_api_load_embed_predict_from_checkpoints(tmp_path):
    from seqmamba.tasks.dna.module import DNASequenceModule
    module = DNASequenceModule(num_classes=3, d_model=8, n_layer=1, d_state=2)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "m.ckpt")
    model = api.load(tmp_path / "m.ckpt")
    assert isinstance(model, CaduceusWithHead)
    probs = api.predict(model, ["ACGTAC", "GGATTACAGG"])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    emb = api.embed(model, ["ACGTAC", "GTACGT"])  # the second is the reverse complement of the first
    assert emb.shape == (2, 8) and torch.allclose(emb[0], emb[1], atol=1e-6)
    mlm = tiny()
    mlm.save_pretrained(tmp_path / "pre")
    assert isinstance(api.load(tmp_path / "pre"), CaduceusForMaskedLM)


def test_score_command_line(tmp_path, fasta, capsys):
    from seqmamba.tasks.dna import score
    tiny().save_pretrained(tmp_path / "model")
    written = score.main([str(tmp_path / "model"), str(fasta), str(tmp_path / "o.parquet"), "--device", "cpu",
                          "--window", "32", "--overlap", "8", "--plot", "r1:0-40"])
    assert {"records", "bases", "track"} <= set(written) and written["track"].is_file()
    assert "scored in" in capsys.readouterr().out


def test_seqmamba_score_command(tmp_path, fasta, capsys):
    """``seqmamba score`` writes both tables; a FASTA with a bad character is one error line naming it."""
    from seqmamba.cli import main
    tiny().save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit) as exc:
        main(["score", str(tmp_path / "model"), str(fasta), str(tmp_path / "o.parquet"), "--device", "cpu"])
    assert exc.value.code == 0
    assert pl.read_parquet(tmp_path / "o.parquet")["record"].to_list() == ["r1", "r2"]
    assert pl.read_parquet(tmp_path / "o.bases.parquet").height == 72
    bad = tmp_path / "bad.fa"
    bad.write_text(">ok\nACGT\n>broken\nACGTXACGT\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["score", str(tmp_path / "model"), str(bad), str(tmp_path / "b.parquet"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("seqmamba score: error:") and "bad.fa" in err and "broken" in err and "'X'" in err, err
    assert not (tmp_path / "b.parquet").exists()
