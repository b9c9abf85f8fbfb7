"""seqmamba: one Mamba core (exact PyTorch references on any device, Triton kernels on CUDA) under DNA
modelling, speech separation and sequential recommendation."""
from seqmamba.backbone import MambaBackbone, build_mixer
from seqmamba.bimamba import BiMamba
from seqmamba.block import Block
from seqmamba.config import BackboneConfig, Mamba2Config, MambaConfig
from seqmamba.mamba import Mamba
from seqmamba.mamba2 import Mamba2
from seqmamba.norm import RMSNormGated
from seqmamba.rcps import RCPSAddNormWrapper, RCPSEmbedding, RCPSLMHead, RCPSWrapper, rc, rc_ids
from seqmamba.state import MixerState

__version__ = "0.1.0"

__all__ = [
    "BackboneConfig", "BiMamba", "Block", "Mamba", "Mamba2", "Mamba2Config", "MambaBackbone", "MambaConfig",
    "MixerState", "RCPSAddNormWrapper", "RCPSEmbedding", "RCPSLMHead", "RCPSWrapper", "RMSNormGated",
    "build_mixer", "rc", "rc_ids",
]
