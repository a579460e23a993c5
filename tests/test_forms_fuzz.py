"""The strict multipart parser (`lb.objects.forms`) against generated forms: whatever the body and its
Content-Type, reading it gives the call's ids or a 4xx of the balancer's own, never another exception
(an IndexError was a 500 and a traceback per request, tests/test_redteam_round2.py).

Forms are built from fragments that reach the parser's branches (parameters in RFC 2231's form,
empty and bracketed names, filenames, charsets, JSON that Python refuses, boundaries inside parts,
bare LFs), then some bytes are cut, repeated or changed. Each is read on two routes: a container's
files (a form's fields only) and `POST /files` (a batch input file's lines too, with purpose=batch).
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lb.errors import ProxyError
from lb.objects import forms, routes
from lb.objects.routes import ObjectCall

BOUNDARY = "fz"
FILE = "file-" + "a" * 32
CONTAINER_FILES = f"/openai/v1/containers/cntr_{'b' * 32}/files"

NAMES = st.one_of(
    *[st.sampled_from(["file_id", "tools", "purpose", "file", "tools[0][file_ids][]", "s[type]", "s[id]"])] * 3,
    st.sampled_from(["", ".", "[]", "..", "[][]", "a[]", "file_id", "FILE_ID", "tools", "purpose", "file"]),
    st.sampled_from(["tools[0][file_ids][]", "a.b", "s[type]", "s[id]", "x[", "]", "a[b]c", "file\\_id"]),
    st.text(alphabet="ab[]._*\"'\\ ;=", max_size=8),
)
PARAMS = st.sampled_from(
    [
        *[""] * 8,
        *['; filename="x.txt"'] * 4,
        '; filename=""',
        "; filename*=utf-8''x.txt",
        "; filename*=utf-8''",
        "; filename=\"x\"; filename*=utf-8''",
        '; name*0="file_id"',
        "; name*0*=utf-8''file_id",
        "; name*=utf-8''file_id",
        '; name="file_id"',
        ";",
        "; x",
        '; a="b\\"c"',
        "; NAME=file_id",
    ]
)
HEADER_LINES = st.sampled_from(
    [
        "Content-Type: text/plain",
        "Content-Type: text/plain; charset=utf-16",
        "Content-Type: text/plain; charset=UTF-8",
        "Content-Type: text/plain; charset*=utf-8''utf-16",
        "Content-Type: text/plain; charset=utf-8; charset=latin-1",
        "Content-Type: ;",
        "Content-Transfer-Encoding: base64",
        "Content-Transfer-Encoding: binary",
        " folded",
        "no colon",
        "X-Other: 1",
    ]
)
VALUES = st.one_of(
    st.sampled_from(
        [
            b"",
            FILE.encode(),
            b"batch",
            b"file_id",
            b'{"file_id": "' + FILE.encode() + b'"}',
            b'[{"type": "file_search", "vector_store_ids": ["vs_' + b"a" * 32 + b'"],}]',
            b'/* c */ [{"file_ids": ["' + FILE.encode() + b'"]}]',
            b'\xef\xbb\xbf{"file_id": "' + FILE.encode() + b'"}',
            b'[\x00{\x00"\x00f\x00',
            b'{"file\\u005fid": "x"}',
            b"[Audio transcript of a conversation]",
            b'{"type": "item_reference", "id": "msg_1"}',
            b"[" * 2000 + b'"file_id"',
            b'{"url": "/v1/responses", "body": {"previous_response_id": "resp_1"}}\n{"url": 1}',
            b'{"file_id": "' + FILE.encode() + b'", "FILE_ID": "x"}',
            b"\xff\xfe",
            f"--{BOUNDARY}".encode(),
            b"\n--" + BOUNDARY.encode(),
        ]
    ),
    st.binary(max_size=24),
)


@st.composite
def part(draw: st.DrawFn) -> bytes:
    lines = []
    if draw(st.integers(0, 7)):  # a Content-Disposition, but not always
        name = draw(NAMES)
        quoted = f'"{name}"' if draw(st.booleans()) else name
        lines.append(f"Content-Disposition: form-data; name={quoted}{draw(PARAMS)}")
    lines += draw(st.lists(HEADER_LINES, max_size=2)) if not draw(st.integers(0, 3)) else []
    if draw(st.booleans()):
        lines.reverse()
    head = "\r\n".join(lines).encode("latin-1")
    return f"--{BOUNDARY}\r\n".encode() + head + b"\r\n\r\n" + draw(VALUES) + b"\r\n"


@st.composite
def body(draw: st.DrawFn) -> bytes:
    data = b"".join(draw(st.lists(part(), max_size=4)))
    if draw(st.integers(0, 3)):
        data += f"--{BOUNDARY}--\r\n".encode()
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 3]))):  # cut, repeat or change a few bytes
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 4))
        data = (
            data[:at] + draw(st.sampled_from([b"", b"\r", b"\n", b'"', b";", b"--", data[at : at + cut]])) + data[at:]
        )
        if draw(st.booleans()):
            data = data[:at] + data[at + cut :]
    return data


FORM = f"multipart/form-data; boundary={BOUNDARY}"
OTHER_CONTENT_TYPES = st.sampled_from(
    [
        f'multipart/form-data; boundary="{BOUNDARY}"',
        f"Multipart/Form-Data;boundary={BOUNDARY};",
        f"multipart/form-data; boundary={BOUNDARY}; boundary*=utf-8''other",
        f"multipart/form-data; boundary*0={BOUNDARY}",
        f"multipart/form-data; boundary={BOUNDARY}; boundary=other",
        f"multipart/form-data; charset=utf-8; boundary={BOUNDARY}",
        f"multipart/form-datax; boundary={BOUNDARY}",
        "multipart/form-data",
        "multipart/form-data; boundary=",
    ]
)


@st.composite
def content_type(draw: st.DrawFn) -> str:
    """Mostly the form's own (its parts are what is fuzzed), else a variant, or text after it."""
    choice = draw(st.integers(0, 7))
    if choice == 0:
        return draw(OTHER_CONTENT_TYPES)
    if choice == 1:
        return FORM + draw(st.text(max_size=30))
    return FORM


def call(path: str) -> ObjectCall:
    objects = routes.classify("POST", path, b"", f"multipart/form-data; boundary={BOUNDARY}", True)
    assert objects is not None
    return objects


CALLS = (call(CONTAINER_FILES), call("/openai/v1/files"))


def read_or_refuse(data: bytes, content_type: str) -> None:
    for objects in CALLS:
        try:
            read = forms.read_now("POST", objects, data, content_type)
        except ProxyError as exc:
            assert 400 <= exc.status < 500, (exc.status, exc.message)
        else:
            assert read.ids[: len(objects.ids)] == objects.ids  # what the path names is kept


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(body(), content_type())
@example(
    b'--fz\r\nContent-Disposition: form-data; name=""\r\n\r\n{"file_id": "x"}\r\n--fz--\r\n',
    "multipart/form-data; boundary=fz",
)
@example(
    b'--fz\r\nContent-Disposition: form-data; name="[]"\r\n\r\n["file_id"]\r\n--fz--\r\n',
    "multipart/form-data; boundary=fz",
)
def test_any_form_is_read_or_refused_with_a_4xx(data, content_type):
    read_or_refuse(data, content_type)


@settings(max_examples=200)
@given(st.binary(max_size=200), st.text(max_size=40))
def test_any_bytes_with_any_content_type_are_read_or_refused_with_a_4xx(data, content_type):
    read_or_refuse(data, "multipart/form-data" + content_type)
    read_or_refuse(f"--{BOUNDARY}\r\n".encode() + data, f"multipart/form-data; boundary={BOUNDARY}")
