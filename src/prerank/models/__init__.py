"""Models: the shared contract (`base`), shared layers, and one file per model.

Every module in this package is imported here, so a model registers itself by existing.
"""

import importlib
import pkgutil

from prerank.models.base import REGISTRY, ModelOutput, PreRankModel, create_model, get_model_class, make_config, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "ModelOutput", "PreRankModel", "create_model", "get_model_class", "make_config", "register"]
