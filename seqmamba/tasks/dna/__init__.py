"""DNA task: Caduceus-PS / -Ph models, masked-LM pretraining, fine-tuning heads, released-checkpoint loading,
and whole-genome scoring. The DataModules live in ``seqmamba.data.dna`` and are re-exported here so that configs
and the task registry find every class of the task in one module."""
from seqmamba.data.dna import DNAPretrainData, DNATableData
from seqmamba.tasks.dna.model import (Caduceus, CaduceusConfig, CaduceusForMaskedLM, CaduceusWithHead, DNAHead,
                                      masked_pool)
from seqmamba.tasks.dna.module import DNAMaskedLM, DNASequenceModule

__all__ = ["Caduceus", "CaduceusConfig", "CaduceusForMaskedLM", "CaduceusWithHead", "DNAHead", "DNAMaskedLM",
           "DNAPretrainData", "DNASequenceModule", "DNATableData", "masked_pool"]
