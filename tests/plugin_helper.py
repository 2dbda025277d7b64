"""Run by tests/test_plugin.py with the example plugin (examples/custom-model) on PYTHONPATH; not
collected by pytest.

    python tests/plugin_helper.py OUT

Takes the plugin model through what a user does, by its name only: `prerank models`, `prerank
train --model example_fm` (1 epoch, generated data), `prerank export`, then one HTTP request to the
service built on the artifact and the same request through the Python scorer. Writes what it saw
to OUT/result.json for the test to check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from prerank.cli import app
from prerank.serve import Scorer
from prerank.serve.app import create_app

MODEL = "example_fm"


def invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        sys.exit(f"prerank {' '.join(args)} exited {result.exit_code}:\n{result.output}")
    return result.output


def main(out: Path) -> None:
    listing = invoke(["models"])
    run = out / "run"
    invoke(["train", "--model", MODEL, "--dataset", "synthetic", "--epochs", "1", "--seq-len", "8",
            "--batch-size", "512", "--set", "embed_dim=8", "--threads", "1", "--no-progress", "--out", str(run),
            "--cache-dir", str(out / "cache")])
    artifact = out / "artifact"
    invoke(["export", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(artifact)])

    scorer = Scorer.load(artifact)
    item_ids = np.load(artifact / "items" / "ids.npy", allow_pickle=False)
    candidates = item_ids[:20].tolist()
    # A user the data never saw: every user feature null (out-of-vocabulary), no behaviour.
    schema = scorer.artifact.model.schema
    user = {f.name: None for f in schema.user_features if f is not schema.sequence_feature}
    http = TestClient(create_app(scorer)).post("/v1/prerank", json={"user_features": user, "candidates": candidates, "k": 20})
    python_scores = scorer.score(user, candidates)
    result = {
        "listing": listing,
        "metrics": json.loads((run / "metrics.json").read_text()),
        "manifest": json.loads((artifact / "manifest.json").read_text()),
        "http_status": http.status_code,
        "http": http.json(),
        "python_scores": dict(zip(candidates, python_scores.scores.tolist())),
    }
    (out / "result.json").write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
