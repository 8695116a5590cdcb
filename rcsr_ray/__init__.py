"""rcsr-ray: Ray-distributed simulation of federated image-text retrieval (RCSR and baselines)."""

__version__ = "0.1.0"
