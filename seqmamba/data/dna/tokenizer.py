"""Character tokenizer with the Caduceus ids (arXiv 2403.03234) and the complement map.

ids: [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6 A=7 C=8 G=9 T=10 N=11; the embedding table
is padded to 16 rows (ids 12-15 unused), as in the released checkpoints. Lower case (soft-masked repeats) maps
to the same ids as upper case; IUPAC ambiguity codes other than N (R Y S W K M B D H V) map to N and are
counted; any other character is an error that names the file, the record and the 1-based position.
"""
from __future__ import annotations

import numpy as np

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
CLS_ID, SEP_ID, BOS_ID, MASK_ID, PAD_ID, RESERVED_ID, UNK_ID = range(7)
A_ID, C_ID, G_ID, T_ID, N_ID = 7, 8, 9, 10, 11
BASE_IDS = (A_ID, C_ID, G_ID, T_ID)
VOCAB = SPECIAL_TOKENS + ("A", "C", "G", "T", "N")
VOCAB_SIZE = 16
"""Rows of the embedding / LM head: 12 tokens padded to 16 (the released Caduceus layout)."""
IGNORE_INDEX = -100
"""Label of positions that no loss counts."""

COMPLEMENT_MAP = tuple({A_ID: T_ID, T_ID: A_ID, C_ID: G_ID, G_ID: C_ID}.get(i, i) for i in range(VOCAB_SIZE))
"""Token id -> id of its complement (A<->T, C<->G, everything else itself); an involution over 16 ids."""

IUPAC_AMBIGUOUS = "RYSWKMBDHV"
_INVALID = 255
_LUT = np.full(256, _INVALID, dtype=np.uint8)
for _char, _id in zip("ACGTN", (A_ID, C_ID, G_ID, T_ID, N_ID)):
    _LUT[ord(_char)] = _LUT[ord(_char.lower())] = _id
for _char in IUPAC_AMBIGUOUS:
    _LUT[ord(_char)] = _LUT[ord(_char.lower())] = N_ID
_IS_AMBIGUOUS = np.zeros(256, dtype=bool)
_IS_AMBIGUOUS[[ord(c) for c in IUPAC_AMBIGUOUS + IUPAC_AMBIGUOUS.lower()]] = True
_DECODE = np.full(VOCAB_SIZE, ord("?"), dtype=np.uint8)
_DECODE[A_ID:N_ID + 1] = np.frombuffer(b"ACGTN", dtype=np.uint8)


class InvalidSequenceError(ValueError):
    """A sequence holds a character that is neither a base, N nor an IUPAC ambiguity code."""


def encode(sequence: str | bytes, source: str = "<sequence>", record: str = "<sequence>") -> tuple[np.ndarray, int]:
    """Sequence text -> (ids ``(l,)`` uint8, number of IUPAC ambiguity codes mapped to N).

    ``source`` and ``record`` only label the error raised for a bad character.
    """
    raw = sequence.encode("utf-8") if isinstance(sequence, str) else bytes(sequence)
    codes = np.frombuffer(raw, dtype=np.uint8)
    ids = _LUT[codes]
    bad = np.flatnonzero(ids == _INVALID)
    if bad.size:
        at = int(bad[0])
        char = raw[at:at + 4].decode("utf-8", errors="replace")[:1]
        position = len(raw[:at].decode("utf-8", errors="ignore")) + 1
        raise InvalidSequenceError(
            f"{source}: record {record!r}, position {position}: invalid character {char!r} "
            f"(allowed: A C G T N, lower case, IUPAC codes {IUPAC_AMBIGUOUS}); {bad.size} invalid character(s) in all")
    return ids, int(_IS_AMBIGUOUS[codes].sum())


def decode(ids) -> str:
    """ids -> text; special tokens become '?'."""
    ids = np.asarray(ids, dtype=np.int64)
    return _DECODE[ids].tobytes().decode("ascii")


def reverse_complement_ids(ids: np.ndarray) -> np.ndarray:
    """Reverse complement of a 1-D id array (special tokens map to themselves)."""
    return np.asarray(COMPLEMENT_MAP, dtype=ids.dtype)[ids[::-1]]


class DNATokenizer:
    """The Caduceus character tokenizer as an object: ``encode``, ``decode``, ids and the complement map.

    >>> tok = DNATokenizer(); tok.encode("ACgtn").tolist()
    [7, 8, 9, 10, 11]
    """

    vocab = VOCAB
    vocab_size = VOCAB_SIZE
    complement_map = COMPLEMENT_MAP
    pad_id, mask_id, n_id, unk_id, cls_id, sep_id = PAD_ID, MASK_ID, N_ID, UNK_ID, CLS_ID, SEP_ID

    def encode(self, sequence: str | bytes, source: str = "<sequence>", record: str = "<sequence>") -> np.ndarray:
        return encode(sequence, source, record)[0]

    def decode(self, ids) -> str:
        return decode(ids)

    def reverse_complement(self, ids: np.ndarray) -> np.ndarray:
        return reverse_complement_ids(np.asarray(ids))
