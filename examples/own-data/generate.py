"""Write the small generated files that examples/own-data/*.yaml describe (no real data).

    python examples/own-data/generate.py      # rewrites interactions.csv, users.csv, items.csv here

Events come from prerank's generated dataset (users and items with latent tastes, clicks drawn
from them), given string ids, date-time timestamps, a device per event, item tags and prices.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from prerank.data.synthetic import generate_log

HERE = Path(__file__).resolve().parent


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    frame.to_csv(tmp, index=False)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(out: Path = HERE, seed: int = 7) -> None:
    log, users, items = generate_log(n_users=150, n_items=80, events_per_user=20, seed=seed)
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-03-01")
    interactions = pd.DataFrame({
        "user": [f"u{u:04d}" for u in log["user"]],
        "product": [f"p{i:04d}" for i in log["item"]],
        "time": (start + pd.to_timedelta(log["timestamp"], unit="m")).dt.strftime("%Y-%m-%d %H:%M:%S"),
        "clicked": log["label"].astype(int),
        "stars": log["grade"],
        "device": rng.choice(["ios", "android", "web"], size=len(log)),
    })
    user_table = pd.DataFrame({"user": [f"u{u:04d}" for u in users.index], "segment": users["segment"].map(lambda s: f"s{s}"),
                               "age_band": rng.choice(["18-24", "25-34", "35-49", "50+"], size=len(users))})
    item_table = pd.DataFrame({"product": [f"p{i:04d}" for i in items.index], "category": items["category"],
                               "tags": items["tags"].map("|".join), "price": np.round(np.exp(items["popularity"]) * 10, 2)})
    write_csv(interactions, out / "interactions.csv")
    write_csv(user_table, out / "users.csv")
    write_csv(item_table, out / "items.csv")


if __name__ == "__main__":
    main()
