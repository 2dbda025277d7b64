"""The HTTP service: FastAPI over one `Scorer`.

    POST /v1/prerank   user features, behaviour sequence, candidate ids, k -> top-k ids and scores
    GET  /v1/model     what is served: model, version, item count, bytes per item, input features
    GET  /healthz      liveness (the artifact is loaded)

Bodies are pydantic models, so malformed JSON or wrong types are 422s with the framework's
message; requests that parse but that the model cannot answer (an unknown feature, a dense value
that is not a finite number, unknown candidates under `on_unknown="error"`, too many candidates)
are 422s with the scorer's message.
The scoring handler is `async` and scores on the event loop: a request is about a millisecond of
CPU on one torch thread, and a thread-pool hop per request cost more CPU and widened the tail
(measured with `prerank load-test`). Scale out with processes (`--workers`): they share the
memory-mapped item-state table through the page cache. The OpenAPI schema is at /openapi.json
and the docs at /docs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from prerank import __version__
from prerank.serve.artifact import verify_artifact
from prerank.serve.scorer import RequestError, Scorer, UnknownItemsError

RawId = Union[StrictInt, str]
# StrictBool keeps true/false from becoming 1.0/0.0, so a boolean sent for a dense feature is refused.
RawValue = Union[StrictInt, StrictBool, float, str, None]


class PrerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_features: dict[str, Union[RawValue, list[RawValue]]] = Field(
        default_factory=dict,
        description="raw user and context features by schema name (see GET /v1/model); null or an unseen value is "
                    "out-of-vocabulary; dense features are raw numbers (the service applies the scaler), null if missing",
        examples=[{"user_id": 1, "gender": "F", "age": 1, "occupation": 10}],
    )
    behaviour: list[RawId] = Field(
        default_factory=list, description="raw ids of the user's earlier positive items, oldest first", examples=[[1193, 661, 914]]
    )
    candidates: list[RawId] = Field(..., min_length=1, description="raw ids of the items to rank", examples=[[1, 2, 3, 1193]])
    k: int = Field(100, ge=1, description="how many of the best candidates to return")
    on_unknown: Literal["error", "skip"] = Field(
        "error", description="candidates not in the catalogue: 'error' (422 listing them) or 'skip' (listed in `unknown`)"
    )


class PrerankResponse(BaseModel):
    model: str
    version: str
    items: list[RawId] = Field(description="the top-k candidate ids, best first")
    scores: list[float] = Field(description="the model's logits for `items` (higher is better)")
    unknown: list[RawId] = Field(default_factory=list, description="candidate ids skipped as not in the catalogue")
    candidates_scored: int


class Health(BaseModel):
    status: str
    model: str
    version: str
    item_count: int


def create_app(scorer: Scorer, max_candidates: int = 100_000) -> FastAPI:
    manifest = scorer.manifest
    app = FastAPI(
        title="prerank",
        version=__version__,
        description=f"Pre-ranking service: {manifest['model']} version {manifest['version']}, {manifest['item_count']:,} items.",
    )

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok", model=manifest["model"], version=manifest["version"], item_count=manifest["item_count"])

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        return {**scorer.info(), "max_candidates": max_candidates}

    @app.post("/v1/prerank", response_model=PrerankResponse, responses={422: {"description": "a request the model cannot answer"}})
    async def prerank(request: PrerankRequest) -> PrerankResponse:
        if len(request.candidates) > max_candidates:
            raise HTTPException(422, f"{len(request.candidates)} candidates exceed this service's limit of {max_candidates}")
        try:
            result = scorer.topk(request.user_features, request.candidates, request.k, request.behaviour, request.on_unknown)
        except UnknownItemsError as err:
            raise HTTPException(422, {"message": str(err), "unknown": err.ids[:1000]}) from None
        except RequestError as err:
            raise HTTPException(422, str(err)) from None
        return PrerankResponse(
            model=manifest["model"],
            version=manifest["version"],
            items=result.item_ids,
            scores=result.scores.tolist(),
            unknown=result.unknown,
            candidates_scored=len(request.candidates) - len(result.unknown),
        )

    return app


ENV_SETTINGS = "PRERANK_SERVE_SETTINGS"


def app_from_env() -> FastAPI:
    """The app factory each uvicorn worker process calls: settings travel in an environment variable."""
    import torch

    settings = json.loads(os.environ[ENV_SETTINGS])
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    scorer = Scorer.load(settings["artifact"], device=settings["device"], verify=settings["verify"])
    return create_app(scorer, max_candidates=settings["max_candidates"])


def serve(artifact: str, host: str = "127.0.0.1", port: int = 8000, threads: Optional[int] = 1, device: str = "cpu",
          verify: bool = True, max_candidates: int = 100_000, log_level: str = "info", workers: int = 1) -> None:
    import uvicorn

    if verify:  # once, here, so that a bad artifact is one clear message rather than one per worker
        verify_artifact(artifact)
    os.environ[ENV_SETTINGS] = json.dumps({"artifact": str(artifact), "threads": threads, "device": device,
                                           "verify": False, "max_candidates": max_candidates})
    if workers > 1:
        uvicorn.run("prerank.serve.app:app_from_env", factory=True, host=host, port=port, log_level=log_level, workers=workers)
    else:
        uvicorn.run(app_from_env(), host=host, port=port, log_level=log_level)
