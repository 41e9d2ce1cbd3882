"""The judge's wire conversions (services/judge/wire.py): each engine result as its HTTP body (exact
JSON bytes) and as its protobuf message, field by field, abstains included; and the shapes that
/openapi.json documents."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import orjson
import pytest
from google.protobuf.message import Message
from pydantic import BaseModel

from protos.rlhf.v1 import judge_pb2 as pb
from services.judge.backends.scripted import ScriptedBackend
from services.judge.engine import JudgeEngineConfig, JudgeLimits
from services.judge.transports.http import create_http_app
from services.judge.types import Abstain, CompareResult, GradeResult, JudgeRef, RankResult, Usage
from services.judge.wire import (
    AbstainOut,
    CompareOut,
    GradeOut,
    JudgeOut,
    LimitsOut,
    RankOut,
    UsageOut,
    compare_body,
    compare_to_grpc,
    grade_body,
    grade_to_grpc,
    info_to_grpc,
    models_body,
    rank_body,
    rank_to_grpc,
)
from tests.support.judge import judge_engine, judge_settings

REF = JudgeRef("openai", "gpt-4o-mini", "3a995c30f80a")
USAGE = Usage(prompt_tokens=660, completion_tokens=2, cost_usd=0.000105, calls=2)
JUDGE_JSON = b'"judge":{"backend":"openai","model":"gpt-4o-mini","template_hash":"3a995c30f80a"}'
USAGE_JSON = b'"usage":{"prompt_tokens":660,"completion_tokens":2,"cost_usd":0.000105,"calls":2}'


def as_dict(msg: Message) -> dict[str, Any]:
    """A protobuf message's set fields (nested ones as dicts, repeated ones as lists)."""
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        if fd.is_repeated:
            out[fd.name] = list(value)
        else:
            out[fd.name] = as_dict(value) if fd.message_type is not None else value
    return out


def same(msg: Message, expected: dict[str, Any]) -> None:
    """``msg`` holds exactly ``expected``: a dict as a nested message, a list as a repeated field,
    None as an unset field, and no field that ``expected`` lacks."""
    for name, value in expected.items():
        if value is None:
            assert not msg.HasField(name), name
        elif isinstance(value, dict):
            assert msg.HasField(name), name
            same(getattr(msg, name), value)
        elif isinstance(value, list):
            assert list(getattr(msg, name)) == value, name
        else:
            assert getattr(msg, name) == value, name
    assert {fd.name for fd, _ in msg.ListFields()} <= set(expected), (msg, expected)


def assert_agree(body: dict[str, Any], msg: Message, outcome: str) -> None:
    """The proto carries exactly the body: a judgment's own fields in ``outcome``, ``judge``,
    ``usage`` and ``cached`` beside it; an abstain as it is."""
    assert msg.WhichOneof("outcome") == outcome
    if outcome == "abstain":
        same(msg, body)
        return
    judged = ("judge", "usage", "cached")
    same(msg, {outcome: {k: v for k, v in body.items() if k not in judged}, **{k: body[k] for k in judged}})


# -- compare ---------------------------------------------------------------------------------------


def test_compare_body_and_proto() -> None:
    result = CompareResult(0.25, 1, False, True, REF, USAGE, cached=True, rationale="B is right.")
    body = compare_body(result)
    assert orjson.dumps(body) == (
        b'{"preference":0.25,"winner":1,"consistent":false,"soft":true,"rationale":"B is right.",'
        + JUDGE_JSON
        + b","
        + USAGE_JSON
        + b',"cached":true}'
    )
    msg = compare_to_grpc(result)
    assert_agree(body, msg, "comparison")
    assert msg.comparison.winner == 1 and msg.comparison.HasField("winner")
    assert msg.comparison.rationale == "B is right." and msg.cached is True
    assert msg.usage.cost_usd == pytest.approx(0.000105) and msg.usage.calls == 2


def test_compare_tie_keeps_a_null_winner_and_leaves_out_a_missing_rationale() -> None:
    result = CompareResult(0.5, None, False, False, REF, Usage(), cached=False)
    body = compare_body(result)
    assert orjson.dumps(body) == (
        b'{"preference":0.5,"winner":null,"consistent":false,"soft":false,' + JUDGE_JSON
        + b',"usage":{"prompt_tokens":0,"completion_tokens":0,"cost_usd":0.0,"calls":0},"cached":false}'
    )  # fmt: skip
    msg = compare_to_grpc(result)
    assert_agree(body, msg, "comparison")
    assert not msg.comparison.HasField("winner") and not msg.comparison.HasField("rationale")
    assert msg.comparison.preference == 0.5


def test_winner_zero_is_set_not_absent() -> None:
    msg = compare_to_grpc(CompareResult(0.9, 0, True, True, REF, USAGE, cached=False))
    assert msg.comparison.HasField("winner") and msg.comparison.winner == 0
    assert compare_body(CompareResult(0.9, 0, True, True, REF, USAGE, cached=False))["winner"] == 0


# -- rank and grade --------------------------------------------------------------------------------


def test_rank_body_and_proto() -> None:
    result = RankResult([-1.5, 0.5, 1.0], [2, 1, 0], REF, USAGE, cached=False, consistent_rate=2 / 3)
    body = rank_body(result)
    assert orjson.dumps(body) == (
        b'{"scores":[-1.5,0.5,1.0],"ranking":[2,1,0],"consistent_rate":0.6666666666666666,'
        + JUDGE_JSON + b"," + USAGE_JSON + b',"cached":false}'
    )  # fmt: skip
    msg = rank_to_grpc(result)
    assert_agree(body, msg, "ranking")
    assert list(msg.ranking.scores) == [-1.5, 0.5, 1.0] and list(msg.ranking.ranking) == [2, 1, 0]


def test_grade_body_and_proto() -> None:
    result = GradeResult(0.8, 7.4, True, REF, USAGE, cached=False)
    body = grade_body(result)
    assert orjson.dumps(body) == (
        b'{"score":0.8,"raw":7.4,"soft":true,' + JUDGE_JSON + b"," + USAGE_JSON + b',"cached":false}'
    )
    msg = grade_to_grpc(result)
    assert_agree(body, msg, "grade")
    assert not msg.grade.HasField("rationale") and msg.grade.raw == 7.4
    with_rationale = grade_body(GradeResult(0.5, 3.0, False, REF, USAGE, cached=True, rationale="ok"))
    assert list(with_rationale) == ["score", "raw", "soft", "rationale", "judge", "usage", "cached"]


# -- abstains --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body_of", "proto_of"), [(compare_body, compare_to_grpc), (rank_body, rank_to_grpc), (grade_body, grade_to_grpc)]
)
def test_abstain_body_and_proto(body_of: Any, proto_of: Any) -> None:
    spent = Abstain(reason="upstream: 500 after 3 attempts", judge=REF, usage=USAGE)
    body = body_of(spent)
    assert orjson.dumps(body) == (
        b'{"abstain":{"reason":"upstream: 500 after 3 attempts"},' + JUDGE_JSON + b"," + USAGE_JSON + b"}"
    )
    msg = proto_of(spent)
    assert_agree(body, msg, "abstain")
    assert msg.abstain.reason == "upstream: 500 after 3 attempts" and msg.judge.model == "gpt-4o-mini"
    # no judge known: left out of the body, unset in the proto; usage is always there
    bare = Abstain(reason="deadline: passed during a provider call")
    body = body_of(bare)
    assert body == {
        "abstain": {"reason": "deadline: passed during a provider call"},
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "calls": 0},
    }
    msg = proto_of(bare)
    assert msg.WhichOneof("outcome") == "abstain" and not msg.HasField("judge") and msg.HasField("usage")


# -- model info and limits -------------------------------------------------------------------------

LIMITS = JudgeEngineConfig(rpm=600.0, max_items_per_request=6, max_text_bytes=4096).limits


def test_models_body_and_info_proto_agree() -> None:
    body = models_body(REF, LIMITS, max_body_bytes=65536, created=1700000000)
    assert orjson.dumps(body) == (
        b'{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":1700000000,'
        b'"owned_by":"rlhf-feedback","backend":"openai","model":"gpt-4o-mini","template_hash":"3a995c30f80a",'
        b'"limits":{"max_items_per_request":6,"max_body_bytes":65536,"max_text_bytes":4096,"max_queue_items":10000,'
        b'"max_concurrency":16,"rpm":600.0,"tpm":null,"max_tokens_total":null,"rank_max_pairs":64,'
        b'"grade_scale_bounds":[0,9],"max_prompt_chars":1000000}}]}'
    )
    info = info_to_grpc(REF, LIMITS, max_body_bytes=65536)
    (card,) = body["data"]
    assert as_dict(info.judge) == {k: card[k] for k in ("backend", "model", "template_hash")}
    limits = dict(card["limits"])
    lo, hi = limits.pop("grade_scale_bounds")
    assert (info.limits.grade_scale_bounds.lo, info.limits.grade_scale_bounds.hi) == (lo, hi) == (0, 9)
    for name, value in limits.items():
        if value is None:
            assert not info.limits.HasField(name), name  # null over HTTP: unset over gRPC
        else:
            assert getattr(info.limits, name) == value, name
    assert info.limits.rpm == 600.0 and not info.limits.HasField("tpm")


# -- one shape per type: the documentation models, the engine types and the protos name the same fields


def own(shape: type[BaseModel]) -> set[str]:
    return set(shape.model_fields) - {"judge", "usage", "cached"}


@pytest.mark.parametrize(
    ("shape", "engine_type", "proto"),
    [
        (CompareOut, CompareResult, pb.Comparison),
        (RankOut, RankResult, pb.Ranking),
        (GradeOut, GradeResult, pb.Grade),
        (JudgeOut, JudgeRef, pb.JudgeRef),
        (UsageOut, Usage, pb.JudgeUsage),
        (LimitsOut, JudgeLimits, pb.JudgeLimits),
    ],
)
def test_shapes_engine_types_and_protos_name_the_same_fields(shape: Any, engine_type: Any, proto: Any) -> None:
    names = own(shape)
    assert names == set(proto.DESCRIPTOR.fields_by_name)
    transport_only = {"max_body_bytes"}  # a transport limit, not the engine's
    assert names - transport_only <= {f.name for f in fields(engine_type)}


def test_every_response_is_an_outcome_beside_judge_usage_cached() -> None:
    for response in (pb.JudgeCompareResponse, pb.JudgeRankResponse, pb.JudgeGradeResponse):
        outcome = {f.name for f in response.DESCRIPTOR.oneofs_by_name["outcome"].fields}
        assert "abstain" in outcome and len(outcome) == 2
        assert set(response.DESCRIPTOR.fields_by_name) - outcome == {"judge", "usage", "cached"}
    assert set(AbstainOut.model_fields) == {"abstain", "judge", "usage"}


# -- what /openapi.json documents -------------------------------------------------------------------


def test_openapi_documents_request_and_response_bodies() -> None:
    settings = judge_settings()
    app = create_http_app(judge_engine(ScriptedBackend(), settings), settings, api_key=None)
    doc = app.openapi()
    schemas = doc["components"]["schemas"]

    def body(path: str, method: str) -> Any:
        return doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]

    def request(path: str) -> Any:
        return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    for path, req, out in (
        ("/v1/compare", "CompareRequest", "CompareOut"),
        ("/v1/rank", "RankRequest", "RankOut"),
        ("/v1/grade", "GradeRequest", "GradeOut"),
    ):
        assert request(path) == {"$ref": f"#/components/schemas/{req}"}
        assert body(path, "post") == {
            "anyOf": [{"$ref": f"#/components/schemas/{out}"}, {"$ref": "#/components/schemas/AbstainOut"}]
        }
    assert body("/v1/models", "get") == {"$ref": "#/components/schemas/ModelList"}
    compare = schemas["CompareRequest"]
    assert compare["additionalProperties"] is False and set(compare["required"]) == {"prompt", "responses"}
    assert (compare["properties"]["responses"]["minItems"], compare["properties"]["responses"]["maxItems"]) == (2, 2)
    assert compare["properties"]["protocol"]["enum"] == ["both_orders", "single"]
    assert schemas["RankRequest"]["properties"]["responses"]["minItems"] == 2
    assert "winner" in schemas["CompareOut"]["required"] and "rationale" not in schemas["CompareOut"]["required"]
    assert set(schemas["LimitsOut"]["properties"]) == set(pb.JudgeLimits.DESCRIPTOR.fields_by_name)
    # every reference resolves
    refs: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs and {r.rsplit("/", 1)[1] for r in refs} <= set(schemas)
