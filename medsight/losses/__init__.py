"""Training losses. A new loss goes in a module here and is chosen by its task (``medsight.tasks``)."""

from medsight.losses.classification import ClassificationLoss, class_weights
from medsight.losses.embedding import (CenterLoss, EmbeddingLoss, PrototypicalLoss, batch_hard_triplet,
                                       prototypical_loss)
from medsight.losses.evidential import EvidentialLoss, ExpectedNLL, dirichlet_kl_to_uniform
from medsight.losses.multilabel import AsymmetricLoss, BinaryFocal, MaskedBCE, positive_weights
from medsight.losses.ordinal import (CornLoss, CornProbabilities, DistanceSmoothedCE, ExpectedGradeMSE,
                                     RegressionProbabilities)

__all__ = ["ClassificationLoss", "class_weights", "DistanceSmoothedCE", "CornLoss", "CornProbabilities",
           "ExpectedGradeMSE", "RegressionProbabilities", "MaskedBCE", "BinaryFocal", "AsymmetricLoss", "positive_weights",
           "EvidentialLoss", "ExpectedNLL", "dirichlet_kl_to_uniform", "batch_hard_triplet", "CenterLoss", "prototypical_loss",
           "EmbeddingLoss", "PrototypicalLoss"]
