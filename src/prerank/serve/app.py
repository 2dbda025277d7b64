"""The HTTP service: FastAPI over one `Scorer`.

    POST /v1/prerank   user features, behaviour sequence, candidate ids, k -> top-k ids and scores
    GET  /v1/model     what is served: model, version, item count, bytes per item, input features
    GET  /healthz      liveness (the artifact is loaded)
    GET  /metrics      Prometheus: requests by path and status, latency and candidates histograms

Bodies are pydantic models, so malformed JSON or wrong types are 422s with the framework's
message; requests that parse but that the model cannot answer (an unknown feature, a dense value
that is not a finite number, unknown candidates under `on_unknown="error"`, too many candidates)
are 422s with the scorer's message. Bounds: a body over `max_body_bytes` (default 4 MiB) is a 413
before it is parsed; strings hold at most 1,000 characters of valid Unicode, the behaviour at
most 10,000 ids, the candidates at most
`max_candidates`, each once; a raw dense value more than 1,000 training ranges outside the values
the model was trained on is refused (it would saturate the model into equal scores).
The scoring handler is `async` and scores a request of up to `OFFLOAD_CANDIDATES` candidates on
the event loop: such a request is about a millisecond of CPU on one torch thread, and a
thread-pool hop per request cost more CPU and widened the tail (measured with `prerank
load-test`). A larger request is scored in a worker thread (torch releases the GIL), so that
health checks and small requests are answered meanwhile. Scale out with processes (`--workers`): they share the
memory-mapped item-state table through the page cache. The OpenAPI schema is at /openapi.json;
the interactive /docs page (its scripts come from a CDN) only with `docs`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from prerank import __version__
from prerank.serve.artifact import UnverifiedArtifactWarning, verify_artifact
from prerank.serve.scorer import RequestError, Scorer, UnknownItemsError

# Request limits: a body is refused (413) before it is parsed; these bound what a parsed one holds.
MAX_BODY_BYTES = 4 << 20
MAX_STRING_LENGTH = 1_000
MAX_BEHAVIOUR = 10_000
# Requests with more candidates are scored off the event loop (module docstring).
OFFLOAD_CANDIDATES = 5_000


Text = Annotated[str, Field(max_length=MAX_STRING_LENGTH)]
RawId = Union[StrictInt, Text]
# StrictBool keeps true/false from becoming 1.0/0.0, so a boolean sent for a dense feature is refused.
RawValue = Union[StrictInt, StrictBool, float, Text, None]


class PrerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_features: dict[Text, Union[RawValue, list[RawValue]]] = Field(
        default_factory=dict,
        description="raw user and context features by schema name (see GET /v1/model); null or an unseen value is "
                    "out-of-vocabulary; dense features are raw numbers (the service applies the scaler), null if missing",
        examples=[{"user_id": 1, "gender": "F", "age": 1, "occupation": 10}],
    )
    behaviour: list[RawId] = Field(
        default_factory=list, max_length=MAX_BEHAVIOUR, description="raw ids of the user's earlier positive items, oldest first",
        examples=[[1193, 661, 914]]
    )
    candidates: list[RawId] = Field(..., min_length=1, description="raw ids of the items to rank", examples=[[1, 2, 3, 1193]])
    k: int = Field(100, ge=1, description="how many of the best candidates to return")
    on_unknown: Literal["error", "skip"] = Field(
        "error", description="candidates not in the catalogue: 'error' (422 listing them) or 'skip' (listed in `unknown`)"
    )

    @field_validator("candidates")
    @classmethod
    def _each_once(cls, candidates: list) -> list:
        """A candidate sent twice would be scored and returned twice."""
        if len(set(candidates)) < len(candidates):
            seen: dict = {}
            for position, item in enumerate(candidates):
                if item in seen:
                    raise ValueError(f"candidate {item!r} appears twice (positions {seen[item]} and {position}); "
                                     "send each candidate once")
                seen[item] = position
        return candidates


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


class RequestMetrics:
    """ASGI middleware: Prometheus counts of every request by path and status, and its latency,
    into the app's metrics (one registry per app; with several --workers each process keeps its own)."""

    def __init__(self, app, requests, latency) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def watched(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            path = scope.get("path", "")
            known = path if path in KNOWN_PATHS else "other"  # unbounded label values would grow the registry
            self.requests.labels(known, str(status)).inc()
            self.latency.labels(known).observe(time.perf_counter() - started)


KNOWN_PATHS = ("/v1/prerank", "/v1/model", "/healthz", "/metrics", "/openapi.json")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before any of it is parsed,
    by its Content-Length or, for a chunked body, as soon as the bytes received pass the limit
    (the body is read here, at most `max_bytes` of it, and handed on whole)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        response = JSONResponse({"detail": f"request body over this service's limit of {self.max_bytes:,} bytes"}, 413)
        await response(scope, receive, send)


def read_api_key(path: str | Path) -> str:
    """The bearer token in `path` (surrounding whitespace stripped): a missing or empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: API key file not found")
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path}: the API key file is empty")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def create_app(scorer: Scorer, max_candidates: int = 100_000, max_body_bytes: int = MAX_BODY_BYTES,
               api_key: str | None = None, docs: bool = False, request_timeout: float | None = 30.0) -> FastAPI:
    """The app over `scorer`; with `api_key`, /v1/* and /metrics answer only requests with the
    header `Authorization: Bearer <api_key>` (401 otherwise); /healthz stays open. `docs` serves
    the interactive /docs page, whose scripts the browser fetches from a CDN (off by default: the
    schema is at /openapi.json either way). A request scored off the event loop that takes longer
    than `request_timeout` seconds is answered 503 with Retry-After (its thread finishes in the
    background: torch cannot be interrupted); None waits for it."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    manifest = scorer.manifest
    registry = CollectorRegistry()
    requests = Counter("prerank_requests", "HTTP requests by path and status", ["path", "status"], registry=registry)
    latency = Histogram("prerank_request_seconds", "HTTP request latency (wall seconds)", ["path"], registry=registry,
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0))
    candidates_seen = Histogram("prerank_candidates", "candidates per scored request", registry=registry,
                                buckets=(1, 10, 100, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000))

    # async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request.
    async def authorized(authorization: Optional[str] = Header(None, include_in_schema=False)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="prerank",
        version=__version__,
        description=f"Pre-ranking service: {manifest['model']} version {manifest['version']}, {manifest['item_count']:,} items.",
        docs_url="/docs" if docs else None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, requests=requests, latency=latency)

    @app.get("/metrics", dependencies=[Depends(authorized)], include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error: RequestValidationError) -> JSONResponse:
        # Where and what, without echoing the input: it can be a million candidates, or a string
        # (a lone surrogate) that JSON admits and UTF-8 cannot encode, which made the 422 a 500.
        def printable(part) -> Any:
            return part if isinstance(part, int) else str(part).encode("utf-8", "backslashreplace").decode("utf-8")

        return JSONResponse({"detail": [{"loc": [printable(p) for p in e["loc"]], "msg": printable(e["msg"]), "type": e["type"]}
                                        for e in error.errors()]}, 422)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok", model=manifest["model"], version=manifest["version"], item_count=manifest["item_count"])

    @app.get("/v1/model", dependencies=[Depends(authorized)])
    def model_info() -> dict[str, Any]:
        return {**scorer.info(), "max_candidates": max_candidates}

    @app.post("/v1/prerank", response_model=PrerankResponse, dependencies=[Depends(authorized)],
              responses={401: {"description": "no or a wrong API key (when the service has one)"},
                         422: {"description": "a request the model cannot answer"}})
    async def prerank(request: PrerankRequest) -> PrerankResponse:
        if len(request.candidates) > max_candidates:
            raise HTTPException(422, f"{len(request.candidates)} candidates exceed this service's limit of {max_candidates}")
        try:
            call = (request.user_features, request.candidates, request.k, request.behaviour, request.on_unknown)
            if len(request.candidates) > OFFLOAD_CANDIDATES:
                try:
                    result = await asyncio.wait_for(run_in_threadpool(scorer.topk, *call), request_timeout)
                except asyncio.TimeoutError:
                    raise HTTPException(503, f"scoring {len(request.candidates):,} candidates took longer than this "
                                             f"service's {request_timeout:g} s limit; send fewer", headers={"Retry-After": "1"}) from None
            else:
                result = scorer.topk(*call)
            candidates_seen.observe(len(request.candidates))
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
    with warnings.catch_warnings():
        if settings["verified_by_server"]:  # checked once by `serve` before the workers started
            warnings.simplefilter("ignore", UnverifiedArtifactWarning)
        scorer = Scorer.load(settings["artifact"], device=settings["device"], verify=False,
                             backend=settings["backend"], threads=settings["threads"] or 1)
    api_key = read_api_key(settings["api_key_file"]) if settings["api_key_file"] else None
    return create_app(scorer, max_candidates=settings["max_candidates"], max_body_bytes=settings["max_body_bytes"],
                      api_key=api_key, docs=settings["docs"], request_timeout=settings["request_timeout"])


def serve(artifact: str, host: str = "127.0.0.1", port: int = 8000, threads: Optional[int] = 1, device: str = "cpu",
          verify: bool = True, max_candidates: int = 100_000, log_level: str = "info", workers: int = 1,
          max_body_bytes: int = MAX_BODY_BYTES, api_key_file: str | None = None, allow_anyone: bool = False,
          docs: bool = False, request_timeout: float | None = 30.0, backend: str = "torch") -> None:
    """Run the service. Off loopback it needs an API key (`api_key_file`) or the explicit waiver
    `allow_anyone`: whoever reaches the port could otherwise score and read the model."""
    import uvicorn

    if api_key_file:
        read_api_key(api_key_file)  # a bad key file fails here, once
    elif not is_loopback(host) and not allow_anyone:
        raise ValueError(f"--host {host} serves beyond this machine: give --api-key-file (clients send "
                         "'Authorization: Bearer <key>'), or --no-auth to serve anyone who can reach the port")
    if verify:  # once, here, so that a bad artifact is one clear message rather than one per worker
        verify_artifact(artifact)
    os.environ[ENV_SETTINGS] = json.dumps({"artifact": str(artifact), "threads": threads, "device": device,
                                           "verified_by_server": verify, "max_candidates": max_candidates,
                                           "max_body_bytes": max_body_bytes,
                                           "api_key_file": str(api_key_file) if api_key_file else None, "docs": docs,
                                           "request_timeout": request_timeout, "backend": backend})
    if workers > 1:
        uvicorn.run("prerank.serve.app:app_from_env", factory=True, host=host, port=port, log_level=log_level, workers=workers)
    else:
        uvicorn.run(app_from_env(), host=host, port=port, log_level=log_level)
