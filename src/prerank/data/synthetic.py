"""A generated interaction dataset with learnable structure, for the quickstart and the tests.

Users and items carry latent preference vectors; a click happens with probability
sigmoid(sharpness * <u, v> / sqrt(dim) + item_bias). Observable attributes are noisy functions of
the latents (a user segment, an item category, item tags), so a model can learn from ids, from
attributes and from the behaviour sequence. Events are spread in time per user, so both
protocols apply unchanged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from prerank.data.pipeline import ITEM, USER, FeatureSpec, ProtocolConfig, build_samples
from prerank.data.schema import Kind, Side
from prerank.data.table import GRADE, LABEL, TIMESTAMP, PreparedData


def generate_log(
    n_users: int = 500, n_items: int = 300, events_per_user: int = 40, dim: int = 8, seed: int = 0, sharpness: float = 4.0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    user_latent = rng.normal(size=(n_users, dim))
    item_latent = rng.normal(size=(n_items, dim))
    item_bias = rng.normal(scale=0.5, size=n_items)
    n_segments, n_categories, n_tags = 6, 12, 20
    users = pd.DataFrame(
        {"segment": np.argmax(user_latent[:, :n_segments] + rng.normal(scale=0.5, size=(n_users, n_segments)), axis=1)},
        index=pd.Index(np.arange(1, n_users + 1), name=USER),
    )
    tag_scores = item_latent @ rng.normal(size=(dim, n_tags))
    items = pd.DataFrame(
        {
            "category": np.argmax(item_latent[:, : min(dim, n_categories)], axis=1) * 2 + (item_bias > 0),
            "tags": [list(np.argsort(-row)[: 1 + i % 3].astype(str)) for i, row in enumerate(tag_scores)],
            "popularity": item_bias + rng.normal(scale=0.3, size=n_items),
        },
        index=pd.Index(np.arange(1, n_items + 1), name=ITEM),
    )
    # Popular items are shown more often, as in logged data.
    exposure = np.exp(item_bias) / np.exp(item_bias).sum()
    user = np.repeat(np.arange(n_users), events_per_user)
    item = rng.choice(n_items, size=len(user), p=exposure)
    logit = sharpness * np.einsum("nd,nd->n", user_latent[user], item_latent[item]) / np.sqrt(dim) + item_bias[item]
    label = (rng.random(len(user)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    grade = np.where(label > 0, 4 + (logit > 2), 1 + (logit > -1)).astype(np.int16)
    start = rng.integers(0, 10_000, size=n_users)
    timestamp = np.repeat(start, events_per_user) + np.tile(np.arange(events_per_user) * 60, n_users)
    log = pd.DataFrame({USER: user + 1, ITEM: item + 1, TIMESTAMP: timestamp, LABEL: label, GRADE: grade})
    return log, users, items


def synthetic_features(embed_dim: int | None = None) -> list[FeatureSpec]:
    """`embed_dim`: the schema's default dim of every id feature (None: DEFAULT_EMBED_DIM)."""
    return [
        FeatureSpec("user_id", Side.USER, Kind.CATEGORICAL, embed_dim=embed_dim),
        FeatureSpec("segment", Side.USER, Kind.CATEGORICAL, embed_dim=embed_dim),
        FeatureSpec("item_id", Side.ITEM, Kind.CATEGORICAL, embed_dim=embed_dim),
        FeatureSpec("category", Side.ITEM, Kind.CATEGORICAL, embed_dim=embed_dim),
        FeatureSpec("tags", Side.ITEM, Kind.MULTI_CATEGORICAL, embed_dim=embed_dim),
        FeatureSpec("popularity", Side.ITEM, Kind.DENSE),
    ]


def load_synthetic(
    protocol: ProtocolConfig | None = None,
    n_users: int = 500,
    n_items: int = 300,
    events_per_user: int = 40,
    seed: int = 0,
    embed_dim: int | None = None,
) -> PreparedData:
    """`embed_dim`: the schema's default dim of every id feature (None: DEFAULT_EMBED_DIM); a
    model's `embed_dim` option overrides it."""
    protocol = protocol or ProtocolConfig(seq_len=20)
    log, users, items = generate_log(n_users, n_items, events_per_user, seed=seed)
    return build_samples(
        log, users, items, synthetic_features(embed_dim), protocol, dataset="synthetic",
        meta={"dataset_label": f"synthetic ({n_users} users, {n_items} items, seed {seed})"},
    )
