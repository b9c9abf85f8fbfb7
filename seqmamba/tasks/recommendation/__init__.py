"""Sequential recommendation: Mamba4Rec and SASRec, full-ranking metrics, batch scoring.

``seqmamba.tasks.recommendation.SequentialRecModule`` with ``seqmamba.data.recommendation.RecDataModule``
in configs; ``seqmamba.tasks.recommendation.api`` for loading a checkpoint and scoring users.
"""
from seqmamba.data.recommendation import RecDataModule
from seqmamba.tasks.recommendation.metrics import full_ranking_metrics, ranking_metrics, target_ranks
from seqmamba.tasks.recommendation.model import Mamba4Rec, SASRec, SequentialRecommender
from seqmamba.tasks.recommendation.module import SequentialRecModule, build_model

__all__ = ["Mamba4Rec", "RecDataModule", "SASRec", "SequentialRecModule", "SequentialRecommender", "build_model",
           "full_ranking_metrics", "ranking_metrics", "target_ranks"]
