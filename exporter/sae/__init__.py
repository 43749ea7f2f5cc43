"""TopK sparse autoencoder with the AuxK dead-latent loss (Gao et al. 2024): the model and its
SAELens format, the trainer, the reconstruction metrics."""

from .metrics import reconstruction_metrics, spliced_ce
from .model import SAETrainingError, TopKSAE, load_sae, save_sae
from .train import TrainResult, geometric_median, outlier_mask, sae_loss, train_sae, world

__all__ = [
    "SAETrainingError", "TopKSAE", "TrainResult", "geometric_median", "load_sae", "outlier_mask",
    "reconstruction_metrics", "sae_loss", "save_sae", "spliced_ce", "train_sae", "world",
]  # fmt: skip
