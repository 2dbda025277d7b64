"""prerank: pre-ranking models for cascade recommender systems."""

__version__ = "0.1.0"
