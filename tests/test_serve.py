"""Export and serving: the artifact, the scorer, the HTTP service, and parity with the training forward pass."""

import json
import warnings
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import prerank
from prerank.data.schema import FIRST_KNOWN_INDEX, OOV_INDEX, PAD_INDEX, Kind
from prerank.models import REGISTRY, create_model
from prerank.serve import ArtifactError, RequestError, Scorer, UnknownItemsError, export_artifact, load_artifact
from prerank.serve.app import create_app
from prerank.serve.loadtest import check_loopback
from prerank.train import Trainer, TrainConfig
from tests.test_contract import SMALL

MODELS = sorted(REGISTRY)
UNSEEN = "__never_seen__"


def trained(name, data):
    torch.manual_seed(0)
    model = create_model(name, data.schema, SMALL.get(name, {}))
    Trainer(model, TrainConfig(epochs=1, batch_size=256, progress=False)).fit(data.train, data.valid)
    return model.eval()


@pytest.fixture(scope="module")
def two_tower_artifact(small_data, tmp_path_factory):
    torch.set_num_threads(1)
    model = trained("two_tower", small_data)
    path = tmp_path_factory.mktemp("artifacts") / "two_tower"
    export_artifact(model, small_data, path)
    return model, path


def raw_value(data, feature, index):
    """The raw request value that the pipeline would encode as `index`."""
    if index == OOV_INDEX:
        return UNSEEN
    if index == PAD_INDEX:
        return None
    return data.vocabs[feature.vocab][index - FIRST_KNOWN_INDEX]


def raw_dense(feature, scaled):
    """The raw value that the feature's scaler maps to `scaled`: what a client sends."""
    scaler = feature.scaler
    return scaler.lo + float(scaled) * (scaler.hi - scaler.lo if scaler.hi > scaler.lo else 1.0)


def raw_request(data, table, row):
    """Raw user features and behaviour of sample `row`, decoded back through the vocabularies and scalers."""
    user_features, behaviour = {}, []
    for f in data.schema.user_features:
        value = table[f.name][row]
        if f.kind is Kind.SEQUENCE:
            behaviour = [raw_value(data, f, int(i)) for i in value if i != PAD_INDEX]
        elif f.kind is Kind.MULTI_CATEGORICAL:
            user_features[f.name] = [raw_value(data, f, int(i)) for i in value if i != PAD_INDEX]
        elif f.kind is Kind.CATEGORICAL:
            user_features[f.name] = raw_value(data, f, int(value))
        else:
            user_features[f.name] = raw_dense(f, value)
    return user_features, behaviour


def forward_logits(model, data, table, row, item_rows):
    """The training-time forward pass for one user (B = 1) and N catalogue items: logits [N]."""
    batch = {f.name: torch.as_tensor(table[f.name][row : row + 1]).long() if f.is_id else torch.as_tensor(table[f.name][row : row + 1])
             for f in data.schema.user_features}
    for f in data.schema.item_features:
        column = data.items[f.name][item_rows][None]
        batch[f.name] = torch.as_tensor(column).long() if f.is_id else torch.as_tensor(column).float()
    with torch.no_grad():
        return model(batch).logits[0]


@pytest.mark.parametrize("name", MODELS)
def test_http_scores_equal_the_training_forward_pass(name, small_data, tmp_path):
    model = trained(name, small_data)
    export_artifact(model, small_data, tmp_path / "artifact")
    client = TestClient(create_app(Scorer.load(tmp_path / "artifact")))
    rng = np.random.default_rng(0)
    table = small_data.test
    for row in (0, 7, 31):
        item_rows = rng.choice(len(small_data.item_raw_ids), size=25, replace=False)
        candidates = small_data.item_raw_ids[item_rows].tolist()
        user_features, behaviour = raw_request(small_data, table, row)
        response = client.post("/v1/prerank", json={"user_features": user_features, "behaviour": behaviour,
                                                    "candidates": candidates, "k": 25})
        assert response.status_code == 200, response.text
        body = response.json()
        served = dict(zip(body["items"], body["scores"]))
        expected = forward_logits(model, small_data, table, row, item_rows)
        torch.testing.assert_close(torch.tensor([served[c] for c in candidates]), expected, atol=1e-5, rtol=1e-5)
        assert body["scores"] == sorted(body["scores"], reverse=True) and body["candidates_scored"] == 25
        top3 = client.post("/v1/prerank", json={"user_features": user_features, "behaviour": behaviour,
                                                "candidates": candidates, "k": 3}).json()
        assert top3["items"] == body["items"][:3]


@pytest.mark.parametrize("name", MODELS)
def test_onnx_runtime_scores_equal_the_training_forward_pass(name, small_data, tmp_path):
    pytest.importorskip("onnxruntime")
    from prerank.serve.onnx import OnnxUnavailable

    model = trained(name, small_data)
    if name == "lttd":  # the TorchScript tracer freezes its attention's reshape to the traced list length
        with pytest.raises(OnnxUnavailable, match="lttd's ONNX graphs fail on 5 candidates"):
            export_artifact(model, small_data, tmp_path / "artifact", onnx=True)
        assert not (tmp_path / "artifact").exists()
        return
    export_artifact(model, small_data, tmp_path / "artifact", onnx=True)
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["onnx"]["candidates"]["outputs"] == ["logits"] and "onnx/candidates.onnx" in manifest["files"]
    onnx, torch_backend = (Scorer.load(tmp_path / "artifact", backend=b) for b in ("onnxruntime", "torch"))
    rng = np.random.default_rng(1)
    for row in (0, 7, 31):
        for size in (1, 25):  # the candidate axis is dynamic
            item_rows = rng.choice(len(small_data.item_raw_ids), size=size, replace=False)
            candidates = small_data.item_raw_ids[item_rows].tolist()
            user_features, behaviour = raw_request(small_data, small_data.test, row)
            served = onnx.score(user_features, candidates, behaviour).scores
            expected = forward_logits(model, small_data, small_data.test, row, item_rows)
            torch.testing.assert_close(torch.from_numpy(served), expected, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(served, torch_backend.score(user_features, candidates, behaviour).scores, atol=1e-5, rtol=1e-5)
    client = TestClient(create_app(onnx))
    user_features, behaviour = raw_request(small_data, small_data.test, 3)
    body = {"user_features": user_features, "behaviour": behaviour, "candidates": small_data.item_raw_ids[:9].tolist(), "k": 4}
    assert client.post("/v1/prerank", json=body).json()["items"] == TestClient(create_app(torch_backend)).post("/v1/prerank", json=body).json()["items"]


def test_onnx_export_leaves_the_model_in_eval_mode(small_data, tmp_path):
    pytest.importorskip("onnxruntime")
    from prerank.serve.artifact import compute_item_table
    from prerank.serve.onnx import export_onnx

    model = trained("fit", small_data)
    model.prepare_for_serving()
    export_onnx(model, compute_item_table(model, small_data.items.to_tensors()), tmp_path / "onnx")
    assert not model.training  # FIT's training-mode scorer differs: a model left training disagreed with its graph


def test_the_onnx_backend_needs_graphs_in_the_artifact(two_tower_artifact):
    _, path = two_tower_artifact
    with pytest.raises(ArtifactError, match="exported without ONNX graphs; re-export with `prerank export --onnx`"):
        Scorer.load(path, backend="onnxruntime")
    with pytest.raises(ValueError, match="backend must be"):
        Scorer.load(path, backend="tensorrt")


def test_artifact_holds_the_catalogue_table_and_a_manifest(two_tower_artifact, small_data):
    model, path = two_tower_artifact
    manifest = json.loads((path / "manifest.json").read_text())
    with torch.no_grad():
        expected = model.encode_catalogue(small_data.items.to_tensors())
    assert manifest["model"] == "two_tower" and manifest["item_count"] == len(small_data.item_raw_ids)
    assert manifest["bytes_per_item"] == sum(t[0].numel() * t.element_size() for t in expected.values())
    assert manifest["num_parameters"] == model.num_parameters() and len(manifest["checksum"]) == 64
    assert manifest["version"] == manifest["files"]["weights.pt"][:12]
    for name, tensor in expected.items():
        mapped = np.load(path / "items" / "state" / f"{name}.npy", mmap_mode="r")
        assert isinstance(mapped, np.memmap)
        np.testing.assert_allclose(mapped, tensor.numpy(), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(np.load(path / "items" / "ids.npy"), small_data.item_raw_ids)
    loaded = load_artifact(path)
    assert not loaded.model.training


def test_export_is_atomic_and_refuses_to_overwrite_by_default(two_tower_artifact, small_data, tmp_path):
    model, _ = two_tower_artifact
    out = tmp_path / "a"
    first = export_artifact(model, small_data, out, version="v1")
    with pytest.raises(ArtifactError, match="already exists"):
        export_artifact(model, small_data, out)
    second = export_artifact(model, small_data, out, version="v2", overwrite=True)
    assert (first["version"], second["version"]) == ("v1", "v2")
    assert json.loads((out / "manifest.json").read_text())["version"] == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directory left behind
    other = create_model("two_tower", small_data.schema.__class__(small_data.schema.features[:-1], small_data.schema.item_id,
                                                                   small_data.schema.user_id), SMALL["two_tower"])
    with pytest.raises(ArtifactError, match="schema differs"):
        export_artifact(other, small_data, tmp_path / "b")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_corrupted_or_missing_artifact_is_a_clear_error(two_tower_artifact, tmp_path):
    _, path = two_tower_artifact
    with pytest.raises(ArtifactError, match="not an artifact"):
        load_artifact(tmp_path)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(path), str(copy)], check=True)
    table = np.load(copy / "items" / "state" / "vector.npy")
    table[0, 0] += 1.0
    np.save(copy / "items" / "state" / "vector.npy", table)
    with pytest.raises(ArtifactError, match=r"vector\.npy: checksum mismatch"):
        load_artifact(copy)
    with pytest.warns(UserWarning, match="without checking checksums"):
        load_artifact(copy, verify=False)  # an explicit opt-out still loads, and says what it skipped


def copy_artifact(path, to):
    subprocess.run(["cp", "-r", str(path), str(to)], check=True)
    return to


@pytest.mark.parametrize("damage, where, message", [
    (lambda a: (a / "manifest.json").write_text("{not json"), "manifest.json", "not valid JSON"),
    (lambda a: (a / "manifest.json").write_text(json.dumps({**json.loads((a / "manifest.json").read_text()), "item_count": "many"})),
     "manifest.json", "'item_count' is missing or not a int"),
    (lambda a: (a / "manifest.json").write_text(json.dumps({**json.loads((a / "manifest.json").read_text()), "checksum": "0" * 64})),
     "manifest.json", "checksum does not match its file list"),
    (lambda a: (a / "weights.pt").write_bytes((a / "weights.pt").read_bytes()[:500]), "weights.pt", "cannot load the weights"),
    (lambda a: (a / "model.json").write_text("[]"), "model.json", "expected a JSON object"),
    (lambda a: np.save(a / "items" / "state" / "vector.npy", np.load(a / "items" / "state" / "vector.npy")[:-3]),
     "vector.npy", "rows for 60 catalogue items"),
    (lambda a: np.save(a / "items" / "state" / "vector.npy", np.load(a / "items" / "state" / "vector.npy")[:, :5]),
     "vector.npy", "but two_tower encodes float32 rows of shape"),
    (lambda a: np.save(a / "items" / "state" / "vector.npy", np.load(a / "items" / "state" / "vector.npy").astype(np.float64)),
     "vector.npy", "float64 rows"),
    (lambda a: np.save(a / "items" / "ids.npy", np.load(a / "items" / "ids.npy")[:10]), "ids.npy", "10 ids for 60"),
])
def test_every_artifact_load_failure_is_one_line_naming_the_file(two_tower_artifact, tmp_path, damage, where, message):
    _, path = two_tower_artifact
    copy = copy_artifact(path, tmp_path / "copy")
    damage(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # --no-verify's warning: the damage must be caught without the checksums
        with pytest.raises(ArtifactError, match=message) as caught:
            load_artifact(copy, verify=False)
    assert where in str(caught.value) and "\n" not in str(caught.value)


def test_a_non_finite_item_state_is_refused(two_tower_artifact, tmp_path):
    from prerank.serve.artifact import MANIFEST, combined_checksum, sha256_file

    _, path = two_tower_artifact
    copy = copy_artifact(path, tmp_path / "copy")
    table = np.load(copy / "items" / "state" / "vector.npy")
    table[7, 2] = np.nan
    np.save(copy / "items" / "state" / "vector.npy", table)
    # Re-sign the manifest, as an exporter that wrote NaN would have: the checksums pass, the values do not.
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["items/state/vector.npy"] = sha256_file(copy / "items" / "state" / "vector.npy")
    manifest["checksum"] = combined_checksum(manifest["files"])
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"vector\.npy: row 7 is not finite"):
        load_artifact(copy)


def test_unknown_candidates_are_an_error_or_skipped_by_option(two_tower_artifact, small_data):
    _, path = two_tower_artifact
    scorer = Scorer.load(path)
    user_features, behaviour = raw_request(small_data, small_data.test, 0)
    known = small_data.item_raw_ids[:5].tolist()
    with pytest.raises(UnknownItemsError, match=r"2 candidate id\(s\) not in the item catalogue: 999999, 'x'") as err:
        scorer.score(user_features, known + [999999, "x"], behaviour)
    assert err.value.ids == [999999, "x"]
    skipped = scorer.score(user_features, [999999] + known + ["x"], behaviour, on_unknown="skip")
    plain = scorer.score(user_features, known, behaviour)
    assert skipped.unknown == [999999, "x"] and skipped.item_ids == known
    np.testing.assert_array_equal(skipped.scores, plain.scores)
    all_unknown = scorer.topk(user_features, ["x"], 3, behaviour, on_unknown="skip")
    assert all_unknown.item_ids == [] and all_unknown.unknown == ["x"]
    as_strings = scorer.score(user_features, [str(i) for i in known], behaviour)  # "7" finds item 7
    np.testing.assert_array_equal(as_strings.scores, plain.scores)


def test_request_features_are_checked_and_unseen_values_are_oov(two_tower_artifact, small_data):
    _, path = two_tower_artifact
    scorer = Scorer.load(path)
    user_features, behaviour = raw_request(small_data, small_data.test, 0)
    candidates = small_data.item_raw_ids[:10].tolist()
    with pytest.raises(RequestError, match=r"missing user feature\(s\) \['segment'\]"):
        scorer.score({k: v for k, v in user_features.items() if k != "segment"}, candidates, behaviour)
    with pytest.raises(RequestError, match=r"unknown user feature\(s\) \['segmnt'\]"):
        scorer.score({**user_features, "segmnt": 1}, candidates, behaviour)
    with pytest.raises(RequestError, match="item-side features"):
        scorer.score({**user_features, "category": 1}, candidates, behaviour)
    with pytest.raises(RequestError, match="'segment' takes one value"):
        scorer.score({**user_features, "segment": [1, 2]}, candidates, behaviour)
    with pytest.raises(RequestError, match="k must be >= 1"):
        scorer.topk(user_features, candidates, 0, behaviour)
    # An unseen value and a null both encode as out-of-vocabulary, as the pipeline encodes them.
    unseen = scorer.encode_request({**user_features, "user_id": "no-such-user"}, behaviour)
    null = scorer.encode_request({**user_features, "user_id": None}, behaviour)
    assert unseen["user_id"].item() == null["user_id"].item() == OOV_INDEX
    # The behaviour sequence keeps its most recent max_len items, left-padded.
    seq = small_data.schema.sequence_feature
    long_history = small_data.item_raw_ids[: seq.max_len + 3].tolist()
    encoded = scorer.encode_request(user_features, long_history)[seq.name][0]
    expected = [raw for raw in long_history[3:]]
    assert encoded.tolist() == [scorer.vocab_index[seq.vocab].get(r) or OOV_INDEX for r in expected]
    short = scorer.encode_request(user_features, long_history[:2])[seq.name][0].tolist()
    assert short[:-2] == [PAD_INDEX] * (seq.max_len - 2)
    # The sequence may also come as a user feature under its schema name, but not both ways at once.
    by_name = scorer.encode_request({**user_features, seq.name: long_history[:2]})[seq.name][0].tolist()
    assert by_name == short
    with pytest.raises(RequestError, match="came twice"):
        scorer.encode_request({**user_features, seq.name: long_history[:2]}, long_history[:2])


def test_http_endpoints_and_validation(two_tower_artifact, small_data):
    _, path = two_tower_artifact
    client = TestClient(create_app(Scorer.load(path), max_candidates=50))
    user_features, behaviour = raw_request(small_data, small_data.test, 0)
    candidates = small_data.item_raw_ids[:10].tolist()
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["item_count"] == len(small_data.item_raw_ids)
    info = client.get("/v1/model").json()
    assert info["model"] == "two_tower" and info["behaviour_feature"] == "hist_items" and info["max_candidates"] == 50
    assert "/v1/prerank" in client.get("/openapi.json").json()["paths"]
    good = {"user_features": user_features, "behaviour": behaviour, "candidates": candidates, "k": 4}
    assert client.post("/v1/prerank", json=good).status_code == 200
    for bad, message in [
        ({k: v for k, v in good.items() if k != "candidates"}, "candidates"),
        ({**good, "candidates": []}, "at least 1"),
        ({**good, "k": 0}, "greater than or equal to 1"),
        ({**good, "candidates": "1,2"}, "list"),
        ({**good, "surprise": 1}, "surprise"),
        ({**good, "on_unknown": "ignore"}, "on_unknown"),
        ({**good, "user_features": {**user_features, "segmnt": 1}}, "segmnt"),
        ({**good, "candidates": candidates + [10**9]}, "not in the item catalogue"),
        ({**good, "candidates": small_data.item_raw_ids[:51].tolist()}, "exceed this service's limit of 50"),
    ]:
        response = client.post("/v1/prerank", json=bad)
        assert response.status_code == 422, (bad, response.text)
        assert message in response.text, (message, response.text)
    assert client.post("/v1/prerank", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    skipped = client.post("/v1/prerank", json={**good, "candidates": candidates + [10**9], "on_unknown": "skip"}).json()
    assert skipped["unknown"] == [10**9] and skipped["candidates_scored"] == 10


def test_bounded_requests_are_4xx_naming_the_field(two_tower_artifact, small_data):
    _, path = two_tower_artifact
    client = TestClient(create_app(Scorer.load(path), max_body_bytes=20_000))
    user_features, behaviour = raw_request(small_data, small_data.test, 0)
    candidates = small_data.item_raw_ids[:10].tolist()
    good = {"user_features": user_features, "behaviour": behaviour, "candidates": candidates, "k": 4}
    # A lone surrogate was a 500 (the unknown id could not be echoed); now a 422 naming the field.
    for on_unknown in ("error", "skip"):
        body = json.dumps({**good, "candidates": [candidates[0], "\ud800"], "on_unknown": on_unknown})
        response = client.post("/v1/prerank", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422 and "candidates" in response.text and "unicode string" in response.text
    for bad, field, message in [
        ({**good, "candidates": candidates[:3] + [candidates[1]]}, "candidates", "appears twice (positions 1 and 3)"),
        ({**good, "behaviour": ["x" * 1001]}, "behaviour", "at most 1000 characters"),
        ({**good, "behaviour": [1] * 10_001}, "behaviour", "at most 10000 items"),
    ]:
        response = client.post("/v1/prerank", json=bad)
        assert response.status_code in (413, 422), response.text
        if response.status_code == 422:
            assert field in response.text and message in response.text, response.text
    # Over the body limit: 413 before parsing, by Content-Length or by counting a chunked body.
    big = json.dumps({**good, "behaviour": list(range(5_000))}).encode()
    assert len(big) > 20_000
    response = client.post("/v1/prerank", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit of 20,000 bytes" in response.text
    response = client.post("/v1/prerank", content=iter([big[:15_000], big[15_000:]]), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert client.get("/healthz").status_code == 200


def test_an_api_key_guards_the_api_and_off_loopback_one_is_required(two_tower_artifact, small_data, tmp_path):
    from prerank.serve.app import serve

    _, path = two_tower_artifact
    client = TestClient(create_app(Scorer.load(path), api_key="s3cret"))
    user_features, behaviour = raw_request(small_data, small_data.test, 0)
    good = {"user_features": user_features, "behaviour": behaviour, "candidates": small_data.item_raw_ids[:5].tolist()}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = client.post("/v1/prerank", json=good, headers=headers)
        assert response.status_code == 401 and "Authorization: Bearer" in response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/model", headers=headers).status_code == 401
    assert client.post("/v1/prerank", json=good, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200
    with pytest.raises(ValueError, match="--host 0.0.0.0 serves beyond this machine: give --api-key-file"):
        serve(str(path), host="0.0.0.0")
    with pytest.raises(ValueError, match="API key file not found"):
        serve(str(path), host="0.0.0.0", api_key_file=str(tmp_path / "none"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="API key file is empty"):
        serve(str(path), host="0.0.0.0", api_key_file=str(tmp_path / "empty"))


def test_metrics_count_requests_by_status_and_docs_are_off_by_default(two_tower_artifact, small_data):
    _, path = two_tower_artifact
    client = TestClient(create_app(Scorer.load(path)))
    user_features, behaviour = raw_request(small_data, small_data.test, 0)
    good = {"user_features": user_features, "behaviour": behaviour, "candidates": small_data.item_raw_ids[:7].tolist()}
    for _ in range(3):
        assert client.post("/v1/prerank", json=good).status_code == 200
    assert client.post("/v1/prerank", json={**good, "k": 0}).status_code == 422
    assert client.get("/nowhere").status_code == 404
    text = client.get("/metrics").text
    assert 'prerank_requests_total{path="/v1/prerank",status="200"} 3.0' in text
    assert 'prerank_requests_total{path="/v1/prerank",status="422"} 1.0' in text
    assert 'prerank_requests_total{path="other",status="404"} 1.0' in text
    assert "prerank_candidates_count 3.0" in text and "prerank_candidates_sum 21.0" in text
    assert 'prerank_request_seconds_count{path="/v1/prerank"} 4.0' in text
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 200
    assert TestClient(create_app(Scorer.load(path), docs=True)).get("/docs").status_code == 200
    guarded = TestClient(create_app(Scorer.load(path), api_key="k"))
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_health_checks_answer_while_a_large_request_is_scored(two_tower_artifact, small_data, monkeypatch):
    import asyncio
    import time

    import httpx

    import prerank.serve.app as app_module

    _, path = two_tower_artifact
    scorer = Scorer.load(path)
    slow = scorer.topk

    def slow_topk(*args, **kwargs):
        time.sleep(0.5)  # a long scoring call, holding its thread as torch would
        return slow(*args, **kwargs)

    monkeypatch.setattr(scorer, "topk", slow_topk)
    monkeypatch.setattr(app_module, "OFFLOAD_CANDIDATES", 5)
    user_features, behaviour = raw_request(small_data, small_data.test, 0)
    big = {"user_features": user_features, "behaviour": behaviour, "candidates": small_data.item_raw_ids[:20].tolist()}

    async def race() -> list[str]:
        finished = []
        transport = httpx.ASGITransport(app=create_app(scorer))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async def score():
                assert (await client.post("/v1/prerank", json=big)).status_code == 200
                finished.append("score")

            async def health():
                await asyncio.sleep(0.1)
                assert (await client.get("/healthz")).status_code == 200
                finished.append("health")

            await asyncio.gather(score(), health())
        return finished

    assert asyncio.run(race()) == ["health", "score"]
    timed = TestClient(create_app(scorer, request_timeout=0.1))
    response = timed.post("/v1/prerank", json=big)
    assert response.status_code == 503 and "longer than this service's 0.1 s limit" in response.text
    assert response.headers["retry-after"] == "1"


def test_serving_never_imports_the_trainer(two_tower_artifact):
    _, path = two_tower_artifact
    code = ("import sys; import prerank.cli; from prerank.serve.app import create_app; from prerank.serve.scorer import Scorer; "
            f"create_app(Scorer.load({str(path)!r})); "
            "bad = sorted(m for m in sys.modules if m.startswith('prerank.train')); assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(Path(prerank.__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_load_test_accepts_loopback_only():
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        check_loopback("http://example.com:8000")


def test_dense_user_features_of_the_inttower_protocol_are_served_raw(tmp_path):
    """The inttower protocol adds a dense user feature (user mean rating), sent raw: HTTP still equals forward.
    (Its test rows are scaled by test statistics, as the paper's script does; `raw_request` unscales them
    with the schema's train scaler, the one serving applies.)"""
    from prerank.data.pipeline import ProtocolConfig
    from prerank.data.synthetic import load_synthetic

    data = load_synthetic(ProtocolConfig(name="inttower", seq_len=6), n_users=80, n_items=40, events_per_user=15, seed=5,
                          embed_dim=8)
    assert any(f.kind is Kind.DENSE for f in data.schema.user_features)
    model = trained("two_tower", data)
    export_artifact(model, data, tmp_path / "artifact")
    client = TestClient(create_app(Scorer.load(tmp_path / "artifact")))
    item_rows = np.arange(len(data.item_raw_ids))
    for row in (0, 5):
        user_features, behaviour = raw_request(data, data.test, row)
        body = client.post("/v1/prerank", json={"user_features": user_features, "behaviour": behaviour,
                                                "candidates": data.item_raw_ids.tolist(), "k": len(item_rows)}).json()
        served = dict(zip(body["items"], body["scores"]))
        expected = forward_logits(model, data, data.test, row, item_rows)
        torch.testing.assert_close(torch.tensor([served[c] for c in data.item_raw_ids.tolist()]), expected, atol=1e-5, rtol=1e-5)
    bad = client.post("/v1/prerank", json={"user_features": {**user_features, "user_mean_rating": "high"}, "candidates": [1]})
    assert bad.status_code == 422 and "user_mean_rating" in bad.text


@pytest.fixture(scope="module")
def raw_dense_data(tmp_path_factory):
    """Own data with raw dense features on every side: a user's income (one unknown), the hour of the
    event (context) and an item's price. Returns the prepared data and the raw tables."""
    import pandas as pd

    from prerank.data.owndata import load_own_data
    from prerank.data.pipeline import ProtocolConfig

    folder = tmp_path_factory.mktemp("raw_dense")
    n_users, n_items, events = 24, 12, 10
    users = pd.DataFrame({"u": [f"u{k}" for k in range(n_users)],
                          "income": [np.nan if k == 3 else 20_000.0 + 3_500.0 * k for k in range(n_users)]})
    items = pd.DataFrame({"i": [f"i{k}" for k in range(n_items)], "brand": list("abcd") * 3,
                          "price": [2.5 * k + 10 for k in range(n_items)]})
    log = pd.DataFrame([{"u": f"u{u}", "i": f"i{(u * 5 + e) % n_items}", "t": 3600 * (7 * u + e) + 60,
                         "hour": (7 * u + e) % 24, "y": int((u + 2 * e) % 3 == 0)}
                        for u in range(n_users) for e in range(events)])
    for name, frame in (("log", log), ("users", users), ("items", items)):
        frame.to_csv(folder / f"{name}.csv", index=False)
    (folder / "d.yaml").write_text("""
files: {log: log.csv, users: users.csv, items: items.csv}
columns: {user_id: u, item_id: i, timestamp: t, label: y}
embed_dim: 8
features:
  - {name: income, side: user, kind: dense}
  - {name: hour, side: context, kind: dense}
  - {name: brand, side: item, kind: categorical}
  - {name: price, side: item, kind: dense}
""")
    return load_own_data(folder / "d.yaml", ProtocolConfig(seq_len=4)), users.set_index("u")


def raw_dense_request(data, users, table, row):
    """Sample `row` as a client sends it: ids decoded, dense features RAW (not the scaled table values)."""
    user_features, behaviour = raw_request(data, table, row)
    raw_user = data.vocabs["user_id"][int(table["user_id"][row]) - FIRST_KNOWN_INDEX]
    income = users.loc[raw_user, "income"]
    user_features["income"] = None if np.isnan(income) else float(income)
    user_features["hour"] = int(table["timestamp"][row] // 3600 % 24)
    return user_features, behaviour


@pytest.mark.parametrize("name", MODELS)
def test_raw_dense_values_over_http_score_as_forward_on_the_scaled_table(name, raw_dense_data, tmp_path):
    data, users = raw_dense_data
    model = trained(name, data)
    export_artifact(model, data, tmp_path / "artifact")
    scorer = Scorer.load(tmp_path / "artifact")
    client = TestClient(create_app(scorer))
    table, item_rows = data.test, np.arange(len(data.item_raw_ids))
    rows = [0, len(table) // 2, len(table) - 1]
    for row in rows:
        user_features, behaviour = raw_dense_request(data, users, table, row)
        # The table holds scaled values; the request holds raw ones, and the scorer scales them alike.
        encoded = scorer.encode_request(user_features, behaviour)
        for f in ("income", "hour"):
            assert encoded[f].item() == table[f][row], (f, user_features[f])
        body = client.post("/v1/prerank", json={"user_features": user_features, "behaviour": behaviour,
                                                "candidates": data.item_raw_ids.tolist(), "k": len(item_rows)})
        assert body.status_code == 200, body.text
        served = dict(zip(body.json()["items"], body.json()["scores"]))
        expected = forward_logits(model, data, table, row, item_rows)
        torch.testing.assert_close(torch.tensor([served[c] for c in data.item_raw_ids.tolist()]), expected, atol=1e-5, rtol=1e-5)
    assert max(abs(raw_dense_request(data, users, table, r)[0]["income"] or 0) for r in rows) > 1_000  # really raw
    assert any(raw_dense_request(data, users, table, r)[0]["income"] is None for r in range(len(table)))


def test_bad_dense_values_are_422s_naming_the_field(raw_dense_data, tmp_path):
    data, users = raw_dense_data
    export_artifact(trained("two_tower", data), data, tmp_path / "artifact")
    scorer = Scorer.load(tmp_path / "artifact")
    client = TestClient(create_app(scorer))
    user_features, behaviour = raw_dense_request(data, users, data.test, 0)
    good = {"user_features": user_features, "behaviour": behaviour, "candidates": data.item_raw_ids[:3].tolist()}
    assert client.post("/v1/prerank", json=good).status_code == 200
    for value, message in [(float("nan"), "not finite"), (float("inf"), "not finite"), ("rich", "takes a number"),
                           ("35000", "takes a number"), (True, "takes a number"), ([1.0], "takes a number"),
                           (3e38, "training ranges outside the values the model was trained on")]:
        body = json.dumps({**good, "user_features": {**user_features, "income": value}})  # NaN/Infinity as JSON literals
        response = client.post("/v1/prerank", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, (value, response.text)
        assert "dense user feature 'income'" in response.text and message in response.text, (value, response.text)
    # Null is a missing value, scaled as the pipeline scales one.
    missing = scorer.encode_request({**user_features, "income": None}, behaviour)["income"].item()
    assert missing == data.schema["income"].scaler.missing
    info = client.get("/v1/model").json()
    assert {f["name"]: f.get("scaler") for f in info["user_features"]}["income"]["lo"] == users["income"].min()


def test_an_artifact_without_dense_scalers_fails_to_load(raw_dense_data, tmp_path):
    data, _ = raw_dense_data
    export_artifact(trained("two_tower", data), data, tmp_path / "artifact")
    spec = json.loads((tmp_path / "artifact" / "model.json").read_text())
    for f in spec["schema"]["features"]:
        f.pop("scaler")
    (tmp_path / "artifact" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match=r"model\.json: dense feature 'income' has no scaler .* re-export"):
        load_artifact(tmp_path / "artifact", verify=False)


@pytest.mark.parametrize("vocabulary", [[5, 3, 9, 3, 0], [10**12, 7, -4, 7], ["a", "7", "b"], [2, "x", 4]],
                         ids=["dense integer ids", "sparse integer ids", "strings", "mixed"])
def test_vectorised_value_index_agrees_with_the_per_value_lookup(vocabulary):
    from prerank.serve.scorer import ValueIndex

    index = ValueIndex(vocabulary, offset=FIRST_KNOWN_INDEX)
    queries = [[5, 3, 9, 0, 1, -4, 7, 10**12, 2**40], ["7", "a", "3", "x"], [7.0, 3.0, 2.5], [True, 2, 4], []]
    for values in queries:
        expected = [-1 if (found := index.get(v)) is None else found for v in values]
        assert index.indices(values).tolist() == expected, values
        assert index.indices(np.array(values, dtype=object)).tolist() == expected, values
    # The first occurrence of a repeated id wins, as in the dictionary.
    repeated = next((v for i, v in enumerate(vocabulary) if v in vocabulary[:i]), None)
    if repeated is not None:
        assert index.indices([repeated]).tolist() == [vocabulary.index(repeated) + FIRST_KNOWN_INDEX]
