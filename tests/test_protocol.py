"""The wire format against literal bytes, and every malformed frame rejected with a ProtocolError."""

import json
import struct

import numpy as np
import pytest

from splitinfer import protocol
from splitinfer.protocol import ProtocolError

SID = "0123456789abcdef0123456789abcdef"

# The worked example of docs/protocol.md: a 1-token forward on a toy model (hidden 4, head_dim 2).
HEADER = (
    b'{"v":2,"op":"forward","session":"0123456789abcdef0123456789abcdef","step":7,"tensors":['
    b'{"name":"hidden","dtype":"float16","shape":[1,1,4],"offset":0,"nbytes":8},'
    b'{"name":"cos","dtype":"float16","shape":[1,1,2],"offset":8,"nbytes":4},'
    b'{"name":"sin","dtype":"float16","shape":[1,1,2],"offset":12,"nbytes":4},'
    b'{"name":"mask","dtype":"bool","shape":[1,1],"offset":16,"nbytes":1}]}'
)
PAYLOAD = (
    b"\x00\x3c" b"\x00\xc0" b"\x00\x38" b"\xff\x7b"  # hidden: 1.0, -2.0, 0.5, 65504 (float16, little-endian)
    b"\x00\x3c" b"\x00\x00"  # cos: 1.0, 0.0
    b"\x00\x00" b"\x00\x3c"  # sin: 0.0, 1.0
    b"\x01"  # mask: True
)
FRAME = b"\x00\x00\x01\x75" + HEADER + PAYLOAD  # 0x175 = 373 header bytes


def example_tensors():
    return {
        "hidden": np.array([[[1.0, -2.0, 0.5, 65504.0]]], np.float16),
        "cos": np.array([[[1.0, 0.0]]], np.float16),
        "sin": np.array([[[0.0, 1.0]]], np.float16),
        "mask": np.array([[True]]),
    }


def test_encode_matches_literal_bytes():
    assert len(HEADER) == 0x175
    assert protocol.encode({"op": "forward", "session": SID, "step": 7}, example_tensors()) == FRAME


def test_decode_literal_bytes():
    frame = protocol.decode(FRAME)
    assert frame.op == "forward" and frame.session == SID and frame.step == 7
    assert frame.tensors["hidden"].dtype == np.float16
    assert frame.tensors["hidden"].tolist() == [[[1.0, -2.0, 0.5, 65504.0]]]
    assert frame.tensors["mask"].tolist() == [[True]]
    assert protocol.check_forward(frame, hidden_size=4, head_dim=2, max_tokens=8) == 1


def test_float32_input_goes_on_the_wire_as_float16():
    data = protocol.encode({"op": "forward", "session": SID, "step": 1}, {"hidden": np.ones((1, 2, 3), np.float32)})
    frame = protocol.decode(data)
    assert frame.header["tensors"][0]["dtype"] == "float16" and frame.tensors["hidden"].dtype == np.float16


def test_reply_ops_only_when_decoding_replies():
    data = protocol.encode({"op": "result", "session": SID, "step": 1, "cloud_ms": 1.5})
    with pytest.raises(ProtocolError) as e:
        protocol.decode(data)
    assert e.value.code == "unknown_op"
    assert protocol.decode(data, replies=True).header["cloud_ms"] == 1.5


def test_error_reply_shape():
    frame = protocol.decode(protocol.error("limit", "too many", step=3), replies=True)
    assert frame.header["code"] == "limit" and frame.header["message"] == "too many" and frame.step == 3


# What a version-1 peer gets back for its frame: an error frame of version 1 (the layout of docs/protocol.md, v1).
V1_VERSION_ERROR = (
    b'{"v":1,"op":"error","session":null,"step":null,"code":"version",'
    b'"message":"the peer speaks protocol version 1, this side speaks version 2","tensors":[]}'
)


def test_a_peer_of_another_version_is_answered_in_its_own():
    with pytest.raises(ProtocolError) as e:
        protocol.decode(with_header({**BASE, "v": 1, "tensors": []}))
    assert e.value.code == "version" and e.value.peer_version == 1
    reply = protocol.error(e.value.code, e.value.message, version=e.value.peer_version)
    assert reply == struct.pack(">I", len(V1_VERSION_ERROR)) + V1_VERSION_ERROR
    assert protocol.decode(reply, replies=True, version=1).header["code"] == "version"
    # A version whose error frame is unknown (or no version at all) is answered in ours.
    for v in (7, "2", None):
        with pytest.raises(ProtocolError) as e:
            protocol.decode(with_header({**BASE, "v": v, "tensors": []}))
        reply = protocol.error(e.value.code, e.value.message, version=e.value.peer_version)
        assert protocol.decode(reply, replies=True).header["code"] == "version"


def with_header(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw + payload


def hidden_entry(**over):
    entry = {"name": "hidden", "dtype": "float16", "shape": [1, 1, 4], "offset": 0, "nbytes": 8}
    return {**entry, **over}


BASE = {"v": 2, "op": "forward", "session": SID, "step": 1}


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "truncated"),
        (b"\x00\x00", "truncated"),
        (b"\x00\x00\x00\x10{}", "truncated"),
        (b"\xff\xff\xff\xff" + b"x" * 10, "too_large"),
        (b"\x00\x00\x00\x03abc", "bad_header"),
        (b"\x00\x00\x00\x02\xff\xfe", "bad_header"),
        (with_header([1, 2]), "bad_header"),  # type: ignore[arg-type]
        (with_header({**BASE, "v": 1, "tensors": []}), "version"),
        (with_header({**BASE, "v": 3, "tensors": []}), "version"),
        (with_header({**BASE, "v": "2", "tensors": []}), "version"),
        (with_header({**BASE, "op": "explode", "tensors": []}), "unknown_op"),
        (with_header({**BASE, "session": "../etc", "tensors": []}), "bad_header"),
        (with_header({**BASE, "step": -1, "tensors": []}), "bad_header"),
        (with_header({**BASE, "step": True, "tensors": []}), "bad_header"),
        (with_header({**BASE}), "bad_header"),
        (with_header({**BASE, "tensors": [hidden_entry()]}, b"\x00" * 7), "truncated"),
        (with_header({**BASE, "tensors": [hidden_entry()]}, b"\x00" * 9), "bad_length"),
        (with_header({**BASE, "tensors": [hidden_entry(nbytes=6)]}, b"\x00" * 6), "bad_length"),
        (with_header({**BASE, "tensors": [hidden_entry(offset=2)]}, b"\x00" * 10), "bad_length"),
        (with_header({**BASE, "tensors": [hidden_entry(dtype="float64")]}, b"\x00" * 8), "bad_dtype"),
        (with_header({**BASE, "tensors": [hidden_entry(shape=[1, -1, 4])]}, b""), "bad_shape"),
        (with_header({**BASE, "tensors": [hidden_entry(shape="1x4")]}, b""), "bad_shape"),
        (with_header({**BASE, "tensors": [hidden_entry(name="token_ids")]}, b"\x00" * 8), "bad_tensor"),
        (with_header({**BASE, "tensors": [hidden_entry(), hidden_entry(offset=8)]}, b"\x00" * 16), "bad_tensor"),
        (with_header({**BASE, "tensors": [hidden_entry()]}, b"\x00\x7e" + b"\x00" * 6), "not_finite"),  # NaN
        (with_header({**BASE, "tensors": [hidden_entry()]}, b"\x00\x7c" + b"\x00" * 6), "not_finite"),  # +Inf
        (b"\x00\x00\x00\x0b" + b'{"v":NaN}' + b"  ", "bad_header"),
    ],
)
def test_malformed_frames(data, code):
    with pytest.raises(ProtocolError) as e:
        protocol.decode(data)
    assert e.value.code == code
    assert e.value.message  # a human-readable reason, not just a code


def test_frame_size_limit_checked():
    with pytest.raises(ProtocolError) as e:
        protocol.decode(FRAME, max_frame_bytes=100)
    assert e.value.code == "too_large"


def forward_frame(hidden_shape=(1, 2, 4), rope_shape=(1, 2, 2), mask=None, edits=None):
    tensors = {
        "hidden": np.zeros(hidden_shape, np.float16),
        "cos": np.zeros(rope_shape, np.float16),
        "sin": np.zeros(rope_shape, np.float16),
    }
    if mask is not None:
        tensors["mask"] = np.array(mask, bool)
    header = {"op": "forward", "session": SID, "step": 1}
    if edits is not None:
        header["edits"] = edits
    return protocol.decode(protocol.encode(header, tensors))


@pytest.mark.parametrize(
    "kwargs, code",
    [
        (dict(hidden_shape=(1, 2, 5)), "bad_shape"),
        (dict(hidden_shape=(2, 2, 4)), "bad_shape"),
        (dict(hidden_shape=(1, 0, 4), rope_shape=(1, 0, 2)), "bad_shape"),
        (dict(rope_shape=(1, 3, 2)), "bad_shape"),
        (dict(hidden_shape=(1, 9, 4), rope_shape=(1, 9, 2)), "limit"),
        (dict(mask=[[1, 0]]), "bad_shape"),
        (dict(mask=[[1, 0], [1, 0]]), "bad_mask"),
        (dict(edits=[{"op": "crop", "length": -1}]), "bad_edit"),
        (dict(edits=[{"op": "relocate", "start": 0, "indices": [1, "x"]}]), "bad_edit"),
        (dict(edits=[{"op": "shred"}]), "bad_edit"),
        (dict(edits={"op": "crop"}), "bad_edit"),
    ],
)
def test_forward_checks_against_the_model(kwargs, code):
    with pytest.raises(ProtocolError) as e:
        protocol.check_forward(forward_frame(**kwargs), hidden_size=4, head_dim=2, max_tokens=8)
    assert e.value.code == code


def test_forward_accepts_block_and_full_masks():
    assert protocol.check_forward(forward_frame(mask=[[1, 0], [1, 1]]), 4, 2, 8) == 2
    assert protocol.check_forward(forward_frame(mask=[[1, 1, 1, 0], [1, 1, 1, 1]]), 4, 2, 8) == 2
