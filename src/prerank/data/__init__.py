"""Data: the feature schema, dataset loaders, evaluation protocols and sample tables."""

from prerank.data.pipeline import PROTOCOLS, FeatureSpec, ProtocolConfig, build_samples
from prerank.data.schema import Feature, Kind, Schema, Side
from prerank.data.table import DataError, PreparedData, SampleTable

__all__ = [
    "PROTOCOLS", "DataError", "Feature", "FeatureSpec", "Kind", "PreparedData", "ProtocolConfig",
    "SampleTable", "Schema", "Side", "build_samples",
]
