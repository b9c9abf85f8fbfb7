"""DNA data: the Caduceus tokenizer, FASTA/BED readers with window access, masked-LM and labelled datasets,
and the LightningDataModules. Imports no model code."""
from seqmamba.data.dna.datamodules import DNAPretrainData, DNATableData
from seqmamba.data.dna.datasets import (EpochSampler, GenomeWindows, LabelledSequences, collate, mlm_mask,
                                        read_table, shuffled_windows_table)
from seqmamba.data.dna.fasta import (BUILTIN_GENOMES, FastaFormatError, FastaRecord, Genome, Interval, iter_fasta,
                                     read_bed, read_fasta, resolve_path)
from seqmamba.data.dna.tokenizer import (A_ID, BASE_IDS, C_ID, COMPLEMENT_MAP, G_ID, IGNORE_INDEX, MASK_ID, N_ID,
                                         PAD_ID, T_ID, VOCAB, VOCAB_SIZE, DNATokenizer, InvalidSequenceError, decode,
                                         encode, reverse_complement_ids)

__all__ = [
    "A_ID", "BASE_IDS", "BUILTIN_GENOMES", "COMPLEMENT_MAP", "C_ID", "DNAPretrainData", "DNATableData",
    "DNATokenizer", "EpochSampler", "FastaFormatError", "FastaRecord", "G_ID", "Genome", "GenomeWindows",
    "IGNORE_INDEX", "Interval", "InvalidSequenceError", "LabelledSequences", "MASK_ID", "N_ID", "PAD_ID", "T_ID",
    "VOCAB", "VOCAB_SIZE", "collate", "decode", "encode", "iter_fasta", "mlm_mask", "read_bed", "read_fasta",
    "read_table", "resolve_path", "reverse_complement_ids", "shuffled_windows_table",
]
