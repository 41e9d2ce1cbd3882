"""The OpenAPI contract of both services: what /openapi.json and /docs show, checked against the
routes and the models they parse with, and the error codes of unknown routes and methods.

Both apps are the real ones (reward over the FakeBackend, judge over the scripted fake judge),
driven in process. Every documented route has a 200 body schema (JSON bodies by ``$ref`` to a
component, ``/metrics`` as text), every POST route a required request body whose component *is* the
JSON Schema of the model the route validates with, every ``$ref`` resolves, and every example in the
schema parses with its model and, sent to the live app, answers 200 with a body that the documented
200 schema accepts. The schema fuzzer run over the served schemas is in ``test_openapi_fuzz.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import jsonschema_rs
import orjson
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from services.common.auth import OPEN_HTTP_PATHS
from services.common.errors import ERROR_TABLE, ErrorCode
from services.common.http_support import (
    ERROR_STATUS_TEXT,
    PROBE_DOCUMENTED,
    BodyParser,
    DocumentedRoute,
    OrjsonResponse,
    add_probe_routes,
    create_edge_app,
    document_bodies,
)
from services.common.wire import StrictModel
from services.judge.backends.scripted import ScriptedBackend
from services.judge.transports.batches import BATCH_DOCUMENTED
from services.judge.transports.http import DOCUMENTED as JUDGE_DOCUMENTED
from services.judge.transports.http import create_http_app as create_judge_app
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.grpc import create_grpc_server
from services.reward.transports.http import DOCUMENTED as REWARD_DOCUMENTED
from services.reward.transports.http import create_http_app as create_reward_app
from services.reward.transports.pooling import POOLING_DOCUMENTED
from services.runtime.backends.fake import FakeBackend
from tests.support.judge import judge_engine, judge_settings

pytestmark = pytest.mark.timeout(60)

REF = "#/components/schemas/"
KEY = "s3cret"
ERROR_STATUSES = {str(s) for s in ERROR_STATUS_TEXT}


@dataclass
class Svc:
    name: str
    app: FastAPI
    client: httpx.AsyncClient
    documented: Mapping[str, DocumentedRoute]

    async def doc(self) -> dict[str, Any]:
        r = await self.client.get("/openapi.json")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        return dict(r.json())


@pytest_asyncio.fixture(params=["reward", "judge"])
async def svc(request: pytest.FixtureRequest) -> AsyncIterator[Svc]:
    """The service's real app over its fake backend, started (ready), without an API key."""
    documented: Mapping[str, DocumentedRoute]
    if request.param == "reward":
        settings = RewardSettings(max_wait_ms=0)
        engine: Any = RewardEngine(lambda: FakeBackend(), settings.engine_config())
        app = create_reward_app(engine, settings, api_key=None)
        documented = {**REWARD_DOCUMENTED, **POOLING_DOCUMENTED}
    else:
        jsettings = judge_settings()
        engine = judge_engine(ScriptedBackend(), jsettings)
        app = create_judge_app(engine, jsettings, api_key=None)
        documented = {**JUDGE_DOCUMENTED, **BATCH_DOCUMENTED}
    await engine.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc.test") as client:
        yield Svc(request.param, app, client, documented)
    await engine.stop()


def refs_in(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {str(v) for k, v in node.items() if k == "$ref"}
        for v in node.values():
            found |= refs_in(v)
        return found
    if isinstance(node, list):
        return set().union(*(refs_in(v) for v in node)) if node else set()
    return set()


def validator(doc: Mapping[str, Any], schema: Mapping[str, Any]) -> Any:
    """A JSON Schema validator for ``schema`` whose ``#/components/...`` refs resolve in ``doc``."""
    return jsonschema_rs.validator_for({**schema, "components": doc["components"]})


def json_body(operation: Mapping[str, Any], status: str = "200") -> Mapping[str, Any]:
    return dict(operation["responses"][status]["content"]["application/json"])


# -- every route, documented ------------------------------------------------------------------------


async def test_every_route_is_in_the_schema_with_a_200_body(svc: Svc) -> None:
    doc = await svc.doc()
    routes = {
        (route.path, method.lower())
        for route in svc.app.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods or ()
    }
    operations = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes == operations
    assert {p for p, m in operations if m == "post"} == {p for p, (m, _, _) in svc.documented.items() if m == "post"}
    for path, method in sorted(operations):
        ok = doc["paths"][path][method]["responses"]["200"]
        if path == "/metrics":
            assert ok["content"] == {"text/plain": {"schema": {"type": "string"}}}
            continue
        schema = json_body(doc["paths"][path][method])["schema"]
        shapes = schema.get("anyOf", [schema])
        assert shapes and all(set(s) == {"$ref"} and s["$ref"].startswith(REF) for s in shapes), (path, schema)
        assert all(doc["components"]["schemas"][s["$ref"].removeprefix(REF)]["type"] == "object" for s in shapes)


async def test_every_post_route_documents_the_body_it_validates_with(svc: Svc) -> None:
    doc = await svc.doc()
    schemas = doc["components"]["schemas"]
    posts = {p: r for p, r in svc.documented.items() if r[0] == "post"}
    assert len(posts) == (3 + len(POOLING_DOCUMENTED) if svc.name == "reward" else 3 + 1)  # judge: + /v1/batches
    for path, (_, model, shapes) in posts.items():
        assert model is not None
        operation = doc["paths"][path]["post"]
        body = operation["requestBody"]
        assert body["required"] is True
        media = body["content"]["application/json"]
        assert media["schema"] == {"$ref": f"{REF}{model.__name__}"}
        # The component is the JSON Schema of the very model the route parses with (strict, no extra keys).
        own = model.model_json_schema(ref_template=REF + "{model}")
        own.pop("$defs", None)
        own.pop("x-example-names", None)
        assert schemas[model.__name__] == own
        assert "X-Request-Timeout" in {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        ok = json_body(operation)["schema"]
        assert [s["$ref"] for s in ok.get("anyOf", [ok])] == [f"{REF}{s.__name__}" for s in shapes]
    if svc.name == "reward":
        assert schemas["ScoreRequest"]["additionalProperties"] is False
        assert schemas["ScoreRequest"]["properties"]["inputs"]["minItems"] == 1
        assert {r["$ref"] for r in schemas["ScoreRequest"]["properties"]["inputs"]["items"]["oneOf"]} == {
            f"{REF}TextItem",
            f"{REF}MessagesItem",
            f"{REF}PairItem",
        }
        scores = doc["paths"]["/get_reward"]["post"]["parameters"]
        assert {"name": "scores", "in": "query"}.items() <= scores[0].items()
        assert scores[0]["schema"]["enum"] == ["raw", "sigmoid"]


async def test_every_error_status_is_the_error_body_and_every_ref_resolves(svc: Svc) -> None:
    doc = await svc.doc()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert statuses == ERROR_STATUSES | {"200"}, (path, method)
            for status in ERROR_STATUSES:
                assert json_body(operation, status)["schema"] == {"$ref": f"{REF}ErrorBody"}
            assert operation["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    refs = refs_in(doc)
    assert len(refs) > 10
    assert {r.removeprefix(REF) for r in refs} <= set(doc["components"]["schemas"])
    assert all(r.startswith(REF) for r in refs)
    # no API key on this server: nothing to authorize
    assert "securitySchemes" not in doc["components"]


async def test_docs_page_is_swagger_ui_over_the_schema(svc: Svc) -> None:
    r = await svc.client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in r.text and "/openapi.json" in r.text


# -- examples ---------------------------------------------------------------------------------------


def _examples(media: Mapping[str, Any]) -> dict[str, Any]:
    return {name: ex["value"] for name, ex in media.get("examples", {}).items()}


async def test_request_examples_parse_and_answer_200_with_a_documented_body(svc: Svc) -> None:
    doc = await svc.doc()
    sent = 0
    for path, (method, model, _) in svc.documented.items():
        if model is None:
            continue
        operation = doc["paths"][path][method]
        examples = _examples(operation["requestBody"]["content"]["application/json"])
        assert examples, path
        ok = validator(doc, json_body(operation)["schema"])
        for name, value in examples.items():
            model.model_validate_json(orjson.dumps(value))  # the route's own (strict) parse
            r = await svc.client.post(path, json=value)
            if path == "/v1/batches":  # the scripted judge has no provider batch API: the documented 400
                assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT", r.text
                assert "batch" in r.json()["error"]["message"]
                continue
            assert r.status_code == 200, (path, name, r.text)
            ok.validate(r.json())
            assert "abstain" not in r.json(), (path, name, r.text)
            sent += 1
    # reward: score (3), compare (2), get_reward (2) and the pooling routes' own; judge: 2 + 1 + 2
    assert sent >= (7 if svc.name == "reward" else 5)


async def test_response_examples_match_their_schema_and_model(svc: Svc) -> None:
    doc = await svc.doc()
    checked = 0
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if path == "/metrics":
                continue
            media = json_body(operation)
            check = validator(doc, media["schema"])
            examples = _examples(media)
            for value in examples.values():
                check.validate(value)
                checked += 1
            if svc.name == "reward" and method == "post":
                assert examples, path
    models: list[type[BaseModel]] = [s for _, _, shapes in svc.documented.values() for s in shapes]
    for model in models:
        for value in model.model_json_schema().get("examples", []):
            model.model_validate(value)
    # at least: reward's score (2), compare (1), get_reward (2) and the two probes; the judge's probes
    assert checked >= (7 if svc.name == "reward" else 2)


# -- unknown routes and methods ---------------------------------------------------------------------


async def test_unknown_route_is_404_not_found_and_wrong_method_405(svc: Svc) -> None:
    for r in (await svc.client.get("/v1/nope"), await svc.client.post("/v2/score", json={})):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "NOT_FOUND" == ErrorCode.NOT_FOUND.value
        assert "/openapi.json" in r.json()["error"]["message"]
    r = await svc.client.get("/v1/compare")
    assert r.status_code == 405, r.text
    assert r.json()["error"]["code"] == "NOT_FOUND"
    assert r.headers["allow"] == "POST" and "POST" in r.json()["error"]["message"]
    r = await svc.client.post("/v1/models", json={})
    assert (r.status_code, r.json()["error"]["code"], r.headers["allow"]) == (405, "NOT_FOUND", "GET")


async def test_the_grpc_side_of_not_found_is_unimplemented() -> None:
    """The error table's row for an unknown route or method: 404 over HTTP, UNIMPLEMENTED over gRPC
    (grpc's own answer for an unknown method, which the services leave as it is)."""
    assert ERROR_TABLE[ErrorCode.NOT_FOUND].http_status == 404
    assert ERROR_TABLE[ErrorCode.NOT_FOUND].grpc_code == grpc.StatusCode.UNIMPLEMENTED
    assert not ERROR_TABLE[ErrorCode.NOT_FOUND].retryable
    settings = RewardSettings(max_wait_ms=0)
    engine = RewardEngine(lambda: FakeBackend(), settings.engine_config())
    await engine.start()
    handle = create_grpc_server(engine, settings, api_key=None)
    port = await handle.start(port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(
                    "/rlhf.v1.RewardService/Nope", request_serializer=None, response_deserializer=None
                )(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await handle.stop(0)
        await engine.stop()


# -- auth in the schema ------------------------------------------------------------------------------


async def test_with_an_api_key_every_closed_route_declares_bearer_auth() -> None:
    settings = RewardSettings(max_wait_ms=0)
    app = create_reward_app(RewardEngine(lambda: FakeBackend(), settings.engine_config()), settings, api_key=KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc.test") as client:
        doc = (await client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})).json()
        # routing comes after auth: an unknown route without the key is a 401, not a 404
        assert (await client.get("/v1/nope")).json()["error"]["code"] == "UNAUTHENTICATED"
    assert doc["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "The server's --api-key."}
    }
    secured = {p for p, item in doc["paths"].items() for op in item.values() if op.get("security") == [{"bearer": []}]}
    assert secured == set(doc["paths"]) - OPEN_HTTP_PATHS
    assert {"/v1/score", "/v1/compare", "/get_reward", "/v1/models"} <= secured


# -- more documented routes (another API on the same app) ------------------------------------------------


class EchoIn(StrictModel):
    text: str


class EchoOut(BaseModel):
    text: str
    length: int


class ClassifyIn(StrictModel):
    input: list[str]


class ClassifyOut(BaseModel):
    probs: list[float]


class Probe:
    live = True
    ready = True


def _toy(*documented: Mapping[str, DocumentedRoute]) -> FastAPI:
    app = create_edge_app(title="toy", api_key=None, metrics=_NoMetrics(), route_names={}, parser=BodyParser())

    @app.post("/v1/echo")
    async def echo(request: Request) -> Response:
        return OrjsonResponse({})

    @app.post("/classify")
    async def classify(request: Request) -> Response:
        return OrjsonResponse({})

    add_probe_routes(app, Probe(), CollectorRegistry(), state=lambda: "ready")
    document_bodies(app, *documented)
    return app


class _NoMetrics:
    def on_request(self, transport: str, method: str, status: str) -> None:
        pass


def test_several_documented_mappings_merge() -> None:
    ours: dict[str, DocumentedRoute] = {"/v1/echo": ("post", EchoIn, (EchoOut,))}
    theirs: dict[str, DocumentedRoute] = {"/classify": ("post", ClassifyIn, (ClassifyOut,))}
    doc = _toy(ours, theirs).openapi()
    for path, model, out in (("/v1/echo", "EchoIn", "EchoOut"), ("/classify", "ClassifyIn", "ClassifyOut")):
        operation = doc["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"] == {"$ref": REF + model}
        assert json_body(operation)["schema"] == {"$ref": REF + out}
    for path in PROBE_DOCUMENTED:
        assert json_body(doc["paths"][path]["get"])["schema"] == {"$ref": REF + "HealthOut"}
    assert {"EchoIn", "EchoOut", "ClassifyIn", "ClassifyOut", "HealthOut", "ErrorBody"} <= set(
        doc["components"]["schemas"]
    )


def test_a_documented_route_the_app_lacks_is_an_error() -> None:
    app = _toy({"/v1/missing": ("post", EchoIn, (EchoOut,))})
    with pytest.raises(RuntimeError, match="/v1/missing"):
        app.openapi()
