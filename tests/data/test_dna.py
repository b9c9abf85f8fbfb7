"""DNA data: tokenizer, FASTA readers and their errors, windows, masking, collate, labelled tables."""
import gzip
import lzma

import numpy as np
import pytest

from seqmamba.data.dna import (COMPLEMENT_MAP, IGNORE_INDEX, MASK_ID, N_ID, PAD_ID, DNAPretrainData, DNATableData,
                               FastaFormatError, Genome, GenomeWindows, InvalidSequenceError, LabelledSequences,
                               collate, decode, encode, mlm_mask, read_bed, read_fasta, read_table,
                               reverse_complement_ids)

HAND_IDS = {"A": 7, "C": 8, "G": 9, "T": 10, "N": 11}


def rc_text(s: str) -> str:
    return s[::-1].translate(str.maketrans("ACGTN", "TGCAN"))


def test_tokenizer_ids_round_trip_and_lower_case():
    seq = "ACGTNacgtn"
    ids, n_amb = encode(seq)
    assert ids.tolist() == [HAND_IDS[c.upper()] for c in seq] and n_amb == 0
    assert decode(ids) == seq.upper()


def test_iupac_codes_become_n_and_are_counted():
    ids, n_amb = encode("ARYsWkmbdhvN")
    assert ids.tolist() == [7] + [11] * 11
    assert n_amb == 10


def test_bad_character_names_source_record_and_position():
    with pytest.raises(InvalidSequenceError, match=r"f\.fa: record 'chr9', position 4: invalid character 'X'"):
        encode("ACGXTT", "f.fa", "chr9")
    with pytest.raises(InvalidSequenceError, match="position 3"):
        encode("AC-T")


def test_complement_map_and_reverse_complement():
    cmap = np.asarray(COMPLEMENT_MAP)
    assert len(cmap) == 16 and (cmap[cmap] == np.arange(16)).all()
    assert [cmap[HAND_IDS[b]] for b in "ACGT"] == [HAND_IDS[b] for b in "TGCA"]
    seq = "AACGTNGGT"
    assert decode(reverse_complement_ids(encode(seq)[0])) == rc_text(seq)


FASTA = ">r1 first record\nACGTACGTAC\nGGTTAACC\n>r2\nacgtnRYacgt\n"


def write_all_formats(tmp_path):
    from Bio import bgzf
    paths = {"plain": tmp_path / "g.fa", "gz": tmp_path / "g.fa.gz", "xz": tmp_path / "g.fa.xz",
             "bgzip": tmp_path / "g.bgz.fa.gz"}
    paths["plain"].write_text(FASTA)
    with gzip.open(paths["gz"], "wt") as f:
        f.write(FASTA)
    with lzma.open(paths["xz"], "wt") as f:
        f.write(FASTA)
    with bgzf.BgzfWriter(paths["bgzip"], "wb") as f:
        f.write(FASTA.encode())
    return paths


def test_fasta_formats_agree(tmp_path):
    paths = write_all_formats(tmp_path)
    for kind, path in paths.items():
        records = read_fasta(path)
        assert [r.name for r in records] == ["r1", "r2"], kind
        assert decode(records[0].ids) == "ACGTACGTACGGTTAACC", kind
        assert decode(records[1].ids) == "ACGTNNNACGT" and records[1].n_ambiguous == 2, kind


def test_genome_windows_are_slices(tmp_path):
    paths = write_all_formats(tmp_path)
    genome = Genome(paths["gz"], cache_dir=tmp_path / "cache")
    again = Genome(paths["gz"], cache_dir=tmp_path / "cache")  # memory-mapped from the cache
    assert isinstance(again["r1"], np.memmap)
    assert decode(genome.window("r1", 2, 7)) == "GTACG" == decode(again.window("r1", 2, 7))
    with pytest.raises(IndexError, match="outside"):
        genome.window("r1", 5, 30)


@pytest.mark.parametrize("text,match", [
    (">a\nACGT\n>b\n>c\nAC\n", "record 'b' is empty"),
    (">a\nACGT\n>a\nAC\n", "occurs twice"),
    (">a\nACGT\n>b\nACQT\n", r"record 'b', position 3: invalid character 'Q'"),
    ("", "no FASTA records"),
])
def test_bad_fasta_errors(tmp_path, text, match):
    path = tmp_path / "bad.fa"
    path.write_text(text)
    with pytest.raises((FastaFormatError, InvalidSequenceError), match=match) as info:
        read_fasta(path)
    assert "bad.fa" in str(info.value)


def test_truncated_gzip_is_reported(tmp_path):
    path = tmp_path / "t.fa.gz"
    with gzip.open(path, "wt") as f:
        f.write(">a\n" + "ACGT" * 5000 + "\n>b\n" + "GATC" * 5000 + "\n")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FastaFormatError, match="truncated"):
        read_fasta(path)


def test_tiles_cover_every_base_and_random_windows_stay_inside(tmp_path):
    path = tmp_path / "g.fa"
    path.write_text(">a\n" + "ACGT" * 25 + "\n>b\n" + "GGCA" * 3 + "\n")  # 100 and 12 bases
    genome = Genome(path)
    tiles = GenomeWindows(genome, 30, mode="tile", mlm_probability=0)
    covered = {"a": np.zeros(100, int), "b": np.zeros(12, int)}
    for i in range(len(tiles)):
        s = tiles[i]
        covered[s["record"]][s["start"]:s["start"] + len(s["input_ids"])] += 1
        np.testing.assert_array_equal(s["input_ids"], genome.window(s["record"], s["start"],
                                                                     s["start"] + len(s["input_ids"])))
    assert all((c >= 1).all() for c in covered.values())
    assert len(tiles[len(tiles) - 1]["input_ids"]) == 12  # short record: whole, padded later
    from seqmamba.data.dna import Interval
    rand = GenomeWindows(genome, 10, intervals=[Interval("a", 40, 60)], samples=50, rc_augment=True,
                         mlm_probability=0)
    strands = set()
    for i in range(50):
        s = rand[i]
        assert 40 <= s["start"] <= 50
        window = genome.window("a", s["start"], s["start"] + 10)
        expect = reverse_complement_ids(window) if s["strand"] == "-" else window
        np.testing.assert_array_equal(s["input_ids"], expect)
        strands.add(s["strand"])
    assert strands == {"+", "-"}
    np.testing.assert_array_equal(rand[7]["input_ids"], rand[7]["input_ids"])  # deterministic per index


def test_mlm_masking_rates_and_n_handling():
    rng = np.random.default_rng(0)
    ids = rng.choice([7, 8, 9, 10, 11], size=200_000, p=[0.22, 0.22, 0.22, 0.22, 0.12])
    inputs, labels = mlm_mask(ids, rng)
    is_n = ids == N_ID
    assert (inputs[is_n] == PAD_ID).all() and (labels[is_n] == IGNORE_INDEX).all()
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.sum() / (~is_n).sum() - 0.15) < 0.005
    assert (labels[chosen] == ids[chosen]).all()
    masked = (inputs[chosen] == MASK_ID).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()  # 10% kept + 1/4 of the 10% random that hit the same base
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.125) < 0.01
    assert (inputs[~chosen & ~is_n] == ids[~chosen & ~is_n]).all()
    assert set(np.unique(inputs[chosen & (inputs != MASK_ID)])) <= {7, 8, 9, 10}


def test_collate_pads_with_mask():
    batch = collate([{"input_ids": np.array([7, 8, 9]), "labels": np.array([-100, 8, -100])},
                     {"input_ids": np.array([10]), "labels": np.array([10])}])
    assert batch["input_ids"].tolist() == [[7, 8, 9], [10, PAD_ID, PAD_ID]]
    assert batch["mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["labels"].tolist() == [[-100, 8, -100], [10, -100, -100]]
    assert batch["lengths"].tolist() == [3, 1]


def test_bed_split_column_drives_the_splits(tmp_path):
    fasta = tmp_path / "g.fa"
    fasta.write_text(">c\n" + "ACGT" * 50 + "\n")
    bed = tmp_path / "r.bed"
    bed.write_text("track name=x\nc\t0\t100\ttrain\nc\t100\t150\tval\nc\t150\t200\ttest\n")
    assert [iv.split for iv in read_bed(bed, split_column=3)] == ["train", "val", "test"]
    dm = DNAPretrainData(str(fasta), length=20, batch_size=4, bed=str(bed), split_column=3, train_samples=16,
                         val_samples=8)
    dm.setup("fit")
    for split, (lo, hi) in {"train": (0, 100), "val": (100, 150), "test": (150, 200)}.items():
        data = dm.splits[split]
        starts = [data[i]["start"] for i in range(len(data))]
        assert all(lo <= s <= hi - 20 for s in starts), split
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 20) and batch["labels"].shape == (4, 20)
    bed.write_text("c\t0\t100\tfoo\n")
    with pytest.raises(ValueError, match="train/val/test"):
        DNAPretrainData(str(fasta), bed=str(bed), split_column=3).setup("fit")


def test_labelled_tables_all_formats(tmp_path):
    import polars as pl
    table = pl.DataFrame({"sequence": ["ACGT", "GGCCA", "acgtn"], "label": ["b", "a", "b"]})
    table.write_csv(tmp_path / "t.csv")
    table.write_csv(tmp_path / "t.tsv", separator="\t")
    table.write_parquet(tmp_path / "t.parquet")
    (tmp_path / "t.fa").write_text(">s1 label=b\nACGT\n>s2 x a\nGGCCA\n>s3 label=b\nacgtn\n")
    for name in ("t.csv", "t.tsv", "t.parquet", "t.fa"):
        read = read_table(tmp_path / name)
        assert read["sequence"].str.to_uppercase().to_list() == ["ACGT", "GGCCA", "ACGTN"], name
        assert [str(v) for v in read["label"].to_list()] == ["b", "a", "b"], name
    dm = DNATableData(train=str(tmp_path / "t.csv"), val=str(tmp_path / "t.parquet"), batch_size=3)
    dm.setup("fit")
    assert dm.classes == ["a", "b"] and dm.num_classes == 2
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["mask"].sum(1).tolist() == [4, 5, 5]
    with pytest.raises(ValueError, match="needs --data.test"):
        DNATableData(train=str(tmp_path / "t.csv")).setup("test")


def test_rc_augmentation_permutes_strand_labels():
    import polars as pl
    table = pl.DataFrame({"sequence": ["AACG"] * 64, "label": [0] * 64})
    data = LabelledSequences(table, "t", classes=["0", "1"], rc_augment=True, rc_label_map=[1, 0])
    seen = set()
    for i in range(64):
        s = data[i]
        assert (s["strand"] == "-") == (int(s["labels"]) == 1)
        assert decode(s["input_ids"]) == ("AACG" if s["strand"] == "+" else "CGTT")
        seen.add(s["strand"])
    assert seen == {"+", "-"}


def test_bad_row_in_table_names_file_and_row(tmp_path):
    (tmp_path / "t.csv").write_text("sequence,label\nACGT,1\nACJT,0\n")
    with pytest.raises(InvalidSequenceError, match=r"t\.csv: record 'row 2', position 3"):
        DNATableData(train=str(tmp_path / "t.csv")).setup("fit")


def test_bed_with_label_column_as_a_table(tmp_path):
    (tmp_path / "g.fa").write_text(">c\nAACCGGTTAC\n")
    (tmp_path / "t.bed").write_text("c\t0\t4\tpos\nc\t4\t10\tneg\n")
    dm = DNATableData(train=str(tmp_path / "t.bed"), genome=str(tmp_path / "g.fa"), batch_size=2)
    dm.setup("fit")
    assert dm.classes == ["neg", "pos"]
    batch = next(iter(dm.val_dataloader() or [collate([dm.splits["train"][i] for i in range(2)])]))
    assert decode(batch["input_ids"][0][:4]) == "AACC" and decode(batch["input_ids"][1]) == "GGTTAC"
    assert batch["labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="needs the genome"):
        DNATableData(train=str(tmp_path / "t.bed")).setup("fit")


def test_per_position_labels(tmp_path):
    import polars as pl
    pl.DataFrame({"sequence": ["ACGT", "AAC"], "label": ["0110", "200"]}).write_csv(tmp_path / "t.csv")
    dm = DNATableData(train=str(tmp_path / "t.csv"), level="token", batch_size=2)
    dm.setup("fit")
    assert dm.num_classes == 3
    batch = collate([dm.splits["train"][i] for i in range(2)])
    assert batch["labels"].tolist() == [[0, 1, 1, 0], [2, 0, 0, -100]]
    table = pl.DataFrame({"sequence": ["AACG"] * 32, "label": ["0001"] * 32})
    data = LabelledSequences(table, "t", classes=["0", "1"], rc_augment=True, rc_label_map=[1, 0], level="token")
    strands = set()
    for i in range(32):
        s = data[i]
        strands.add(s["strand"])
        assert s["labels"].tolist() == ([0, 0, 0, 1] if s["strand"] == "+" else [0, 1, 1, 1])  # reversed, mapped
    assert strands == {"+", "-"}
    pl.DataFrame({"sequence": ["ACGT"], "label": ["01"]}).write_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="row 1: 2 per-position labels for 4 bases"):
        DNATableData(train=str(tmp_path / "bad.csv"), level="token").setup("fit")
