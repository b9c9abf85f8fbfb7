"""Reverse-complement equivariance of the RCPS wrappers, layer by layer and for a whole backbone."""
import pytest
import torch

from seqmamba import BackboneConfig, BiMamba, MambaBackbone, MambaConfig, RCPSEmbedding, RCPSLMHead, RCPSWrapper
from seqmamba import rc, rc_ids
from tests.utils import assert_close

# Caduceus ids: A=7 C=8 G=9 T=10, everything else maps to itself.
CMAP = [0, 1, 2, 3, 4, 5, 6, 10, 9, 8, 7, 11, 12, 13, 14, 15]
VOCAB, D = 16, 8


def random_ids(b=2, l=21):
    return torch.randint(7, 12, (b, l))


def rc_logits(logits):
    return logits.flip(1)[..., CMAP]


def test_rc_ids_is_an_involution_and_complements():
    ids = torch.tensor([[7, 8, 9, 10, 11]])  # A C G T N
    assert rc_ids(ids, torch.tensor(CMAP)).tolist() == [[11, 7, 8, 9, 10]]  # N A C G T
    assert torch.equal(rc_ids(rc_ids(ids, torch.tensor(CMAP)), torch.tensor(CMAP)), ids)


def test_embedding_is_equivariant():
    emb = RCPSEmbedding(VOCAB, D, CMAP)
    ids = random_ids()
    assert_close("embedding", emb(rc_ids(ids, emb.complement_map)), rc(emb(ids)), 1e-6)


def test_wrapped_bimamba_is_equivariant():
    layer = RCPSWrapper(BiMamba(D, d_state=4))
    h = torch.randn(2, 15, 2 * D)
    assert_close("RCPS BiMamba", layer(rc(h)), rc(layer(h)), 1e-5)


def test_lm_head_is_equivariant():
    head = RCPSLMHead(D, VOCAB, CMAP)
    h = torch.randn(2, 15, 2 * D)
    assert_close("RCPS LM head", head(rc(h)), rc_logits(head(h)), 1e-6)


def test_complement_map_must_be_an_involution():
    with pytest.raises(ValueError, match="involution"):
        RCPSEmbedding(4, D, [1, 2, 3, 0])


def build_ps_model(norm):
    cfg = BackboneConfig(d_model=D, n_layer=2, mamba=MambaConfig(d_state=4), bidirectional=True, rcps=True,
                         norm=norm)
    backbone = MambaBackbone(cfg)
    with torch.no_grad():  # break the symmetric init of the norms so equivariance is not trivial
        for p in backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    emb, head = RCPSEmbedding(VOCAB, D, CMAP), RCPSLMHead(D, VOCAB, CMAP)
    head.lm_head.weight = emb.embedding.weight  # tied, as Caduceus-PS
    return emb, backbone, head


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_two_layer_rcps_bimamba_backbone_is_equivariant(norm):
    emb, backbone, head = build_ps_model(norm)
    ids = random_ids()
    logits = head(backbone(emb(ids)))
    logits_rc = head(backbone(emb(rc_ids(ids, emb.complement_map))))
    assert_close(f"PS logits ({norm})", logits_rc, rc_logits(logits), 1e-5)
    hidden, hidden_rc = backbone(emb(ids)), backbone(emb(rc_ids(ids, emb.complement_map)))
    assert_close(f"PS hidden ({norm})", hidden_rc, rc(hidden), 1e-5)


def test_rcps_backbone_with_padding_mask():
    emb, backbone, head = build_ps_model("rmsnorm")
    backbone.double(); emb.double(); head.double()
    ids = random_ids(2, 12)
    reference = head(backbone(emb(ids)))
    padded = torch.cat([ids, torch.full((2, 5), 4)], 1)  # [PAD] = 4 on the right
    mask = padded != 4
    assert_close("RCPS with right padding", head(backbone(emb(padded), mask=mask))[:, :12], reference, 1e-10)
