"""Serving: the exported artifact (item-state table), the online scorer, the HTTP service and its benchmarks.

Imports models and data only, never the trainer: checkpoints load through `prerank.models.checkpoint`.
"""

from prerank.serve.artifact import Artifact, ArtifactError, export_artifact, load_artifact
from prerank.serve.scorer import RequestError, Scorer, ScoreResult, UnknownItemsError

__all__ = ["Artifact", "ArtifactError", "RequestError", "ScoreResult", "Scorer", "UnknownItemsError", "export_artifact", "load_artifact"]
