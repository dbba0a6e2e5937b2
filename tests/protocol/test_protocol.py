"""Wire format: safetensors bodies, message validation, one route table, the OpenAPI doc."""

from __future__ import annotations

import contextlib

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fedclient
from fedclient._exceptions import ApiError, error_from_status
from fedclient.protocol import (
    ROUTES,
    CheckinResponse,
    RetryLater,
    check_weights,
    decode_tensors,
    encode_tensors,
    openapi_document,
)
from tests.conftest import Server

arrays = hnp.arrays(
    np.float32, hnp.array_shapes(max_dims=3, max_side=5), elements=st.floats(-1e6, 1e6, width=32)
)


@given(
    st.dictionaries(
        st.from_regex(r"[a-z]{1,8}\.(weight|bias)", fullmatch=True), arrays, max_size=4
    ),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)
def test_tensors_round_trip_exactly(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    decoded, got_meta = decode_tensors(encode_tensors(tensors, meta))
    assert decoded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert decoded[name].dtype == value.dtype
        assert np.array_equal(decoded[name], value)
    assert got_meta == meta


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_decode_to_anything_but_invalid_request(body: bytes) -> None:
    with contextlib.suppress(fedclient.InvalidRequest):
        decode_tensors(body)


def test_body_is_not_pickle() -> None:
    body = encode_tensors({"w": np.ones(3, np.float32)})
    header_len = int.from_bytes(body[:8], "little")
    assert body[8:9] == b"{" and b'"w"' in body[8 : 8 + header_len]


def test_check_weights_names_the_problem() -> None:
    ref = {"a": np.zeros((2, 3), np.float32)}
    check_weights({"a": np.ones((2, 3), np.float32)}, ref)
    for bad, text in [
        ({}, "missing"),
        ({"a": np.zeros(6, np.float32)}, "shape"),
        ({"a": np.zeros((2, 3), np.float16)}, "dtype"),
        ({"a": np.full((2, 3), np.inf, np.float32)}, "NaN or Inf"),
    ]:
        with pytest.raises(fedclient.InvalidRequest, match=text):
            check_weights(bad, ref)


def test_checkin_answers_are_a_tagged_union() -> None:
    wire = msgspec.json.encode(RetryLater(3.0, "full"))
    assert msgspec.json.decode(wire) == {"status": "retry", "retry_after": 3.0, "reason": "full"}
    assert msgspec.json.decode(wire, type=CheckinResponse) == RetryLater(3.0, "full")


def test_every_api_error_code_maps_back_to_its_class() -> None:
    classes = [
        c
        for c in vars(fedclient).values()
        if isinstance(c, type) and issubclass(c, ApiError) and c is not ApiError
    ]
    assert len(classes) >= 9
    for cls in classes:
        error = error_from_status(cls.status, cls.code, "m")
        assert type(error) is cls
    assert isinstance(error_from_status(503, None, "m"), fedclient.ServerError)
    assert isinstance(error_from_status(418, "teapot", "m"), ApiError)


def test_openapi_document_lists_every_route() -> None:
    doc = openapi_document("test")
    for route in ROUTES:
        assert route.method.lower() in doc["paths"][route.path]
    checkin = doc["paths"]["/v1/jobs/{job}/checkin"]["post"]
    assert checkin["responses"]["401"]["content"]["application/json"]
    answers = checkin["responses"]["200"]["content"]
    assert answers["application/msgpack"] == answers["application/json"]
    assert "RoundPlan" in doc["components"]["schemas"]


@pytest.mark.anyio
async def test_the_server_serves_the_openapi_document(server: Server) -> None:
    async with server.http() as http:
        served = [(await http.get("/openapi.json")).json() for _ in range(2)]
    expected = msgspec.json.decode(msgspec.json.encode(openapi_document(fedclient.__version__)))
    assert served[0] == served[1] == expected


def test_a_plan_cannot_ask_for_a_model_no_server_could_hold() -> None:
    # Found by the admin routes' fuzzing: a plan with 182,400,917,250 classes made the
    # server try to allocate 85 TiB (a 500). It is a 400 now, before anything is made.
    from fedclient.server import plan_from_dict

    with pytest.raises(fedclient.InvalidInput, match="over the limit"):
        plan_from_dict({"job": {"name": "x"}, "model": {"classes": 182_400_917_250}})
    with pytest.raises(fedclient.InvalidInput, match="over the limit"):
        plan_from_dict({"job": {"name": "x"}, "model": {"kind": "cnn", "inputs": 2**24}})
    assert plan_from_dict({"job": {"name": "x"}}).model.parameter_count() == 4_810
