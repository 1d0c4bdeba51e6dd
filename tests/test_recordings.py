"""Recording links and the recording route over real HTTP on 127.0.0.1.

Hostile paths go on the wire exactly as written (http.client, which does not normalise
``..`` the way requests/urllib3 do), each signed with the *real* secret for the path it
decodes to, so the tests show that no token, however valid, gets a file from outside.
"""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterator
from email.utils import formatdate
from urllib.parse import quote, unquote

import pytest

from fs_cc360.errors import ConfigError
from fs_cc360.recordings import (
    Mp3Converter,
    RecordingLinks,
    content_type,
    decode_request_path,
    safe_relpath,
)
from fs_cc360.webapi import CHUNK_BYTES, parse_range
from tests.test_webapi import SECRET, TOKEN, Stack, running_stack

DATA = bytes(range(256)) * 4 + b"END!"  # 1028 bytes, every offset recognisable
OUTSIDE = b"OUTSIDE-SECRET-CONTENT"


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
    """A recordings dir with files, a subdir, symlinks in and out, and a secret outside."""
    root = tmp_path / "recordings"
    (root / "2026" / "11").mkdir(parents=True)
    (root / "2026" / "11" / "call.wav").write_bytes(DATA)
    (root / "a.wav").write_bytes(DATA)
    (root / "b.wav").write_bytes(b"B" * 10)
    (root / "voice.mp3").write_bytes(b"ID3" + DATA)
    (root / "voice.ogg").write_bytes(b"OggS" + DATA)
    (root / "with space é.wav").write_bytes(DATA)
    (root / "notes.txt").write_bytes(b"not audio")
    (root / ".hidden.wav").write_bytes(OUTSIDE)
    (root / "dir.wav").mkdir()
    (tmp_path / "secret.wav").write_bytes(OUTSIDE)
    (root / "passwd.wav").symlink_to("/etc/passwd")
    (root / "escape.wav").symlink_to(tmp_path / "secret.wav")
    (root / "escape_dir").symlink_to(tmp_path)
    (root / "inside.wav").symlink_to(root / "a.wav")
    return root


@pytest.fixture
def stack(tree: pathlib.Path) -> Iterator[Stack]:
    with running_stack(tree) as s:
        yield s


def link_path(links: RecordingLinks, rel: str) -> str:
    """The path part of the link ``links`` would publish for ``rel``."""
    url = links.url_for(rel)
    assert url is not None, rel
    return url[len(links.public_url):]


# -- links -------------------------------------------------------------------------------

def test_url_for_absolute_and_relative_paths(tree: pathlib.Path) -> None:
    links = RecordingLinks("https://pbx.example.com/", str(tree), secret=SECRET)
    url = links.url_for(str(tree / "2026" / "11" / "call.wav"))
    assert url is not None
    token = links.token_for("2026/11/call.wav")
    assert len(token) == 32 and all(c in "0123456789abcdef" for c in token)
    assert url == f"https://pbx.example.com/{token}/recording/2026/11/call.wav"
    assert links.url_for("2026/11/call.wav") == url
    assert links.url_for(str(tree) + "/2026/./11/call.wav") == url
    spaced = links.url_for(str(tree / "with space é.wav"))
    assert spaced is not None and spaced.endswith("/recording/with%20space%20%C3%A9.wav")


@pytest.mark.parametrize("path", [
    "/etc/passwd", "/var/lib/freeswitch/recordings/x.wav", "../secret.wav", "",
    "{root}/../secret.wav", "{root}", "{root}/", "{root}/notes.txt", "{root}/.hidden.wav",
    "{root}x/a.wav", "{root}/a.wav\x00", "{root}\\a.wav",
])
def test_url_for_refuses_outside_or_unservable(tree: pathlib.Path, path: str) -> None:
    links = RecordingLinks("https://pbx", str(tree), secret=SECRET)
    assert links.url_for(path.format(root=tree)) is None


def test_url_for_through_a_symlinked_recordings_dir(tmp_path: pathlib.Path,
                                                    tree: pathlib.Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(tree)
    links = RecordingLinks("https://pbx", str(alias), secret=SECRET)
    # FreeSWITCH may report either spelling of the directory.
    assert links.url_for(str(alias / "a.wav")) == links.url_for(str(tree / "a.wav"))
    assert links.resolve("a.wav") == (tree / "a.wav").resolve()


def test_url_for_mp3_links_for_wav(tree: pathlib.Path) -> None:
    links = RecordingLinks("https://pbx", str(tree), secret=SECRET, mp3=True)
    assert links.url_for(str(tree / "a.wav")) == (
        f"https://pbx/{links.token_for('a.mp3')}/recording/a.mp3")
    assert links.url_for(str(tree / "voice.ogg")).endswith("/recording/voice.ogg")


def test_shared_mode_links_carry_the_token(tree: pathlib.Path) -> None:
    links = RecordingLinks("https://pbx", str(tree), mode="shared", shared_token=TOKEN)
    assert links.url_for(str(tree / "a.wav")) == f"https://pbx/{TOKEN}/recording/a.wav"
    assert links.verify(TOKEN, "b.wav") and not links.verify("x", "b.wav")


def test_signature_is_per_file_and_constant_time_checked(tree: pathlib.Path) -> None:
    links = RecordingLinks("https://pbx", str(tree), secret=SECRET)
    other = RecordingLinks("https://pbx", str(tree), secret=b"another secret")
    token = links.token_for("a.wav")
    assert links.verify(token, "a.wav")
    assert not links.verify(token, "b.wav")
    assert not links.verify(token.upper(), "a.wav")
    assert not links.verify(token[:-1], "a.wav")
    assert not links.verify("é" * 32, "a.wav")
    assert not other.verify(token, "a.wav")


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"mode": "signed", "secret": b""}, "recording_secret"),
    ({"mode": "shared", "shared_token": ""}, "token"),
    ({"mode": "open", "secret": b"x"}, "recording_auth"),
])
def test_links_config_errors(tree: pathlib.Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RecordingLinks("https://pbx", str(tree), **kwargs)
    assert info.value.key == key


def test_resolve_rules(tree: pathlib.Path) -> None:
    links = RecordingLinks("https://pbx", str(tree), secret=SECRET)
    assert links.resolve("a.wav") == (tree / "a.wav").resolve()
    assert links.resolve("inside.wav") == (tree / "a.wav").resolve()  # symlink kept inside
    for bad in ("passwd.wav", "escape.wav", "escape_dir/secret.wav", "dir.wav", "missing.wav",
                "notes.txt", ".hidden.wav", "../secret.wav", "2026/../a.wav", "/etc/passwd",
                "2026//11/call.wav", "a.wav/", "%2e%2e/secret.wav", "a\x00.wav", "a\\b.wav"):
        assert links.resolve(bad) is None, bad


@pytest.mark.parametrize(("raw", "decoded"), [
    ("a.wav", "a.wav"),
    ("2026/11/call.wav", "2026/11/call.wav"),
    ("with%20space%20%C3%A9.wav", "with space é.wav"),
    ("2026%2F11%2Fcall.wav", "2026/11/call.wav"),  # an encoded / is still just a separator
    ("..%2fsecret.wav", None),
    ("%2e%2e/secret.wav", None),
    ("%252e%252e/secret.wav", None),
    ("a%2500.wav", None),
    ("%C0%AE%C0%AE/secret.wav", None),
    ("e%CC%81.wav", None),  # not NFC
    ("a%E2%80%8B.wav", None),  # zero-width space
    ("a.wav%00", None),
    ("%zz.wav", None),
])
def test_decode_request_path(raw: str, decoded: str | None) -> None:
    assert decode_request_path(raw) == decoded


def test_safe_relpath_limits() -> None:
    assert safe_relpath("x" * 200 + ".wav")
    assert not safe_relpath("x" * 300 + ".wav")
    assert not safe_relpath("/".join(["d" * 200] * 6) + ".wav")
    assert not safe_relpath("a.wav ")
    assert content_type("X.MP3") == "audio/mpeg" and content_type("a.txt") is None


# -- serving: headers, HEAD, Range -------------------------------------------------------

def test_get_whole_file_with_headers(stack: Stack, tree: pathlib.Path) -> None:
    resp = stack.get(link_path(stack.links, "2026/11/call.wav"))
    assert resp.status_code == 200
    assert resp.content == DATA
    assert resp.headers["Content-Type"] == "audio/wav"
    assert resp.headers["Content-Length"] == str(len(DATA))
    assert resp.headers["Accept-Ranges"] == "bytes"
    mtime = (tree / "2026" / "11" / "call.wav").stat().st_mtime
    assert resp.headers["Last-Modified"] == formatdate(mtime, usegmt=True)
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(("rel", "ctype"), [
    ("voice.mp3", "audio/mpeg"), ("voice.ogg", "audio/ogg"), ("a.wav", "audio/wav"),
    ("with space é.wav", "audio/wav"), ("inside.wav", "audio/wav"),
])
def test_content_types(stack: Stack, rel: str, ctype: str) -> None:
    resp = stack.get(link_path(stack.links, rel))
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == ctype


def test_head_has_headers_and_no_body(stack: Stack) -> None:
    status, headers, body = stack.raw("HEAD", link_path(stack.links, "a.wav"))
    assert status == 200
    assert body == b""
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Content-Type"] == "audio/wav"
    assert "Last-Modified" in headers


@pytest.mark.parametrize(("header", "status", "content_range", "body"), [
    ("bytes=0-99", 206, "bytes 0-99/1028", DATA[:100]),
    ("bytes=0-0", 206, "bytes 0-0/1028", DATA[:1]),
    ("bytes=-100", 206, "bytes 928-1027/1028", DATA[-100:]),
    ("bytes=-5000", 206, "bytes 0-1027/1028", DATA),
    ("bytes=1000-", 206, "bytes 1000-1027/1028", DATA[1000:]),
    ("bytes=500-99999", 206, "bytes 500-1027/1028", DATA[500:]),
    ("bytes = 10 - 19", 206, "bytes 10-19/1028", DATA[10:20]),
    ("bytes=1028-", 416, "bytes */1028", b""),
    ("bytes=5000-6000", 416, "bytes */1028", b""),
    ("bytes=-0", 416, "bytes */1028", b""),
    ("bytes=0-1,5-6", 200, None, DATA),  # several ranges: we send it all
    ("bytes=20-10", 200, None, DATA),  # invalid: ignored
    ("items=0-10", 200, None, DATA),
    ("bytes=abc", 200, None, DATA),
    ("bytes=" + "9" * 5000 + "-", 200, None, DATA),
])
def test_ranges(stack: Stack, header: str, status: int, content_range: str | None,
                body: bytes) -> None:
    resp = stack.get(link_path(stack.links, "a.wav"), headers={"Range": header})
    assert resp.status_code == status
    assert resp.headers.get("Content-Range") == content_range
    assert resp.content == body
    assert resp.headers["Content-Length"] == str(len(body))


def test_if_range_and_conditional_get(stack: Stack) -> None:
    path = link_path(stack.links, "a.wav")
    full = stack.get(path)
    etag, last_modified = full.headers["ETag"], full.headers["Last-Modified"]
    assert stack.get(path, headers={"Range": "bytes=0-9", "If-Range": etag}).status_code == 206
    assert stack.get(path, headers={"Range": "bytes=0-9", "If-Range": last_modified}
                     ).status_code == 206
    stale = stack.get(path, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == DATA
    assert stack.get(path, headers={"If-None-Match": etag}).status_code == 304
    assert stack.get(path, headers={"If-Modified-Since": last_modified}).status_code == 304
    assert stack.get(path, headers={"If-Modified-Since": "yesterday"}).status_code == 200


def test_large_file_is_streamed_in_chunks(tree: pathlib.Path, stack: Stack) -> None:
    big = os.urandom(CHUNK_BYTES * 5 + 123)
    (tree / "big.wav").write_bytes(big)
    resp = stack.get(link_path(stack.links, "big.wav"))
    assert resp.content == big
    resp = stack.get(link_path(stack.links, "big.wav"), headers={"Range": "bytes=70000-"})
    assert resp.status_code == 206 and resp.content == big[70000:]

    # The app hands the server an iterator of bounded chunks, not the file in one piece.
    app = stack.server.application
    seen: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": link_path(stack.links, "big.wav"),
               "QUERY_STRING": ""}
    body = app(environ, lambda status, headers: seen.append(status))
    assert seen == ["200 OK"] and not isinstance(body, list)
    chunks = list(body)
    body.close()
    assert max(len(c) for c in chunks) <= CHUNK_BYTES and b"".join(chunks) == big


def test_parse_range_unit() -> None:
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=-1", 0) == "unsatisfiable"
    assert parse_range("bytes=-", 10) is None
    assert parse_range("bytes=3-3", 10) == (3, 3)


def test_methods_on_recordings(stack: Stack) -> None:
    path = link_path(stack.links, "a.wav")
    assert stack.request("POST", path).status_code == 405
    assert stack.request("DELETE", path).status_code == 405
    assert stack.request("OPTIONS", path).status_code == 204


# -- serving: authorisation and hostile paths --------------------------------------------

def test_bad_token_on_a_safe_path_is_403(stack: Stack) -> None:
    good = stack.links.token_for("a.wav")
    for token in ("x" * 32, good.upper(), good[:-1], TOKEN, stack.links.token_for("b.wav"), ""):
        status, _, body = stack.raw("GET", f"/{token}/recording/a.wav")
        assert status == 403, token
        assert body == b'{"error": "forbidden"}'
    # Same answer whether the file exists or not: no existence oracle without a token.
    assert stack.raw("GET", "/" + "x" * 32 + "/recording/missing.wav")[0] == 403


def test_valid_token_missing_file_is_404(stack: Stack) -> None:
    rel = "missing.wav"
    assert stack.raw("GET", f"/{stack.links.token_for(rel)}/recording/{rel}")[0] == 404


def _signed_target(links: RecordingLinks, raw: str) -> str:
    """``raw`` signed with the real secret for what it decodes to (best case for an attacker)."""
    try:
        decoded = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        decoded = raw
    return f"/{links.token_for(decoded)}/recording/{raw}"


def hostile_paths(tree: pathlib.Path) -> list[str]:
    outside = str(tree.parent / "secret.wav")
    return [
        "../secret.wav",
        "..%2fsecret.wav",
        "..%2Fsecret.wav",
        "%2e%2e/secret.wav",
        "%2E%2E%2Fsecret.wav",
        "%252e%252e/secret.wav",
        "%252e%252e%252fsecret.wav",
        "..%252fsecret.wav",
        "%%32%65%%32%65/secret.wav",
        "2026/../../secret.wav",
        "2026/%2e%2e/%2e%2e/secret.wav",
        "./a.wav",
        "%2e/a.wav",
        "/" + outside.lstrip("/"),
        quote(outside, safe=""),
        "..\\secret.wav",
        "..%5csecret.wav",
        "%5c..%5csecret.wav",
        "a.wav%00.txt",
        "secret.wav%00",
        "a.wav%0d%0aSet-Cookie:%20x=1",
        "passwd.wav",
        "escape.wav",
        "escape_dir/secret.wav",
        "dir.wav",
        "dir.wav/",
        ".",
        "%2e",
        "",
        ".hidden.wav",
        "notes.txt",
        "a" * 4000 + ".wav",
        "%EF%BC%8E%EF%BC%8E/secret.wav",  # fullwidth dots
        "%E2%80%AEvaw.a",  # right-to-left override
        "%C0%AE%C0%AE/secret.wav",  # overlong UTF-8 dots
        "e%CC%81.wav",  # decomposed, not NFC
        "a.wav/",
        "2026//11/call.wav",
        "a.wav%3Fx=1",
    ]


def test_hostile_paths_never_serve_outside(stack: Stack, tree: pathlib.Path) -> None:
    passwd = pathlib.Path("/etc/passwd").read_bytes()[:20]
    paths = hostile_paths(tree)
    assert len(paths) >= 20
    for raw in paths:
        status, headers, body = stack.raw("GET", _signed_target(stack.links, raw))
        assert status == 404, (raw, status)
        assert OUTSIDE not in body and (not passwd or passwd not in body), raw
        assert headers.get("Content-Type") == "application/json", raw
        # Unsigned: an unsafe path stays 404 whatever the token; a well-formed one that
        # resolves outside (symlink, directory...) is 403 like any file without a token.
        expected = 404 if decode_request_path(raw) is None else 403
        assert stack.raw("GET", f"/nope/recording/{raw}")[0] == expected, raw


def test_hostile_paths_with_head(stack: Stack, tree: pathlib.Path) -> None:
    for raw in hostile_paths(tree)[:10]:
        assert stack.raw("HEAD", _signed_target(stack.links, raw))[0] == 404, raw


def test_absolute_form_request_target(stack: Stack) -> None:
    good = link_path(stack.links, "a.wav")
    status, _, body = stack.raw("GET", f"http://127.0.0.1:{stack.port}{good}")
    assert status == 200 and body == DATA
    status, _, _ = stack.raw("GET", f"http://127.0.0.1:{stack.port}/x/recording/../secret.wav")
    assert status == 404


def test_signed_vs_shared_mode(tree: pathlib.Path) -> None:
    with running_stack(tree, mode="shared") as shared:
        assert shared.raw("GET", f"/{TOKEN}/recording/a.wav")[0] == 200
        assert shared.raw("GET", f"/{TOKEN}/recording/2026/11/call.wav")[0] == 200
        signature = RecordingLinks("https://pbx", str(tree), secret=SECRET).token_for("a.wav")
        assert shared.raw("GET", f"/{signature}/recording/a.wav")[0] == 403
        assert shared.raw("GET", f"/{TOKEN}/recording/../secret.wav")[0] == 404
    with running_stack(tree, mode="signed") as signed:
        assert signed.raw("GET", f"/{TOKEN}/recording/a.wav")[0] == 403
        assert signed.raw("GET", link_path(signed.links, "a.wav"))[0] == 200


# -- MP3 conversion ----------------------------------------------------------------------

def _fake_encoder(bin_dir: pathlib.Path, name: str = "lame", *, fail: bool = False
                  ) -> pathlib.Path:
    """A stand-in for lame: ``lame [opts] SRC DST`` writes ``MP3:`` + SRC to DST and
    appends a line to ``runs.log`` so tests can count conversions."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    action = 'echo "bad input" >&2; exit 3' if fail else (
        'printf "MP3:" > "$last"; cat "$prev" >> "$last"')
    script.write_text(
        "#!/bin/sh\n"
        f'echo run >> "{bin_dir}/runs.log"\n'
        'prev=""; last=""\n'
        'for a in "$@"; do prev="$last"; last="$a"; done\n'
        f"{action}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_missing_encoder_is_a_clear_startup_error() -> None:
    with pytest.raises(ConfigError) as info:
        Mp3Converter("no-such-encoder-fs-cc360")
    assert info.value.key == "convert_to_mp3"
    assert "lame or ffmpeg" in str(info.value)


def test_encoder_command_lines(tmp_path: pathlib.Path) -> None:
    lame = Mp3Converter(str(_fake_encoder(tmp_path / "bin")))
    assert lame.kind == "lame"
    assert lame.command(pathlib.Path("a.wav"), pathlib.Path("a.mp3"))[1:] == [
        "--quiet", "-b", "32", "a.wav", "a.mp3"]
    ffmpeg = Mp3Converter(str(_fake_encoder(tmp_path / "bin", "ffmpeg")))
    assert ffmpeg.kind == "ffmpeg"
    cmd = ffmpeg.command(pathlib.Path("a.wav"), pathlib.Path("a.mp3"))
    assert cmd[-3:] == ["-f", "mp3", "a.mp3"] and "-nostdin" in cmd


def test_mp3_served_for_wav_and_cached(tmp_path: pathlib.Path, tree: pathlib.Path) -> None:
    encoder = _fake_encoder(tmp_path / "bin")
    with running_stack(tree, converter=Mp3Converter(str(encoder))) as s:
        links = RecordingLinks("https://pbx", str(tree), secret=SECRET, mp3=True)
        path = link_path(links, str(tree / "2026" / "11" / "call.wav"))
        assert path.endswith("/recording/2026/11/call.mp3")
        for _ in range(3):
            resp = s.get(path)
            assert resp.status_code == 200
            assert resp.headers["Content-Type"] == "audio/mpeg"
            assert resp.content == b"MP3:" + DATA
        ranged = s.get(path, headers={"Range": "bytes=0-3"})
        assert ranged.status_code == 206 and ranged.content == b"MP3:"
        assert (tree / "2026" / "11" / "call.mp3").read_bytes() == b"MP3:" + DATA
        assert (tmp_path / "bin" / "runs.log").read_text().count("run") == 1
        assert not list((tree / "2026" / "11").glob(".*"))  # no temp files left
        # a .mp3 without a .wav, and an unsigned .mp3, are not converted
        assert s.raw("GET", f"/{links.token_for('none.mp3')}/recording/none.mp3")[0] == 404
        assert s.raw("GET", "/x/recording/a.mp3")[0] == 403
        assert (tmp_path / "bin" / "runs.log").read_text().count("run") == 1


def test_mp3_reconverted_when_the_wav_is_newer(tmp_path: pathlib.Path,
                                               tree: pathlib.Path) -> None:
    converter = Mp3Converter(str(_fake_encoder(tmp_path / "bin")))
    wav = tree / "a.wav"
    first = converter.convert(wav)
    assert first.read_bytes() == b"MP3:" + DATA
    os.utime(first, ns=(1, 1))  # the mp3 is now older than the wav
    converter.convert(wav)
    assert (tmp_path / "bin" / "runs.log").read_text().count("run") == 2


def test_mp3_conversion_failure_is_404_and_leaves_nothing(tmp_path: pathlib.Path,
                                                          tree: pathlib.Path) -> None:
    encoder = _fake_encoder(tmp_path / "bin", fail=True)
    with running_stack(tree, converter=Mp3Converter(str(encoder))) as s:
        links = RecordingLinks("https://pbx", str(tree), secret=SECRET, mp3=True)
        resp = s.get(link_path(links, str(tree / "a.wav")))
        assert resp.status_code == 404
        assert not (tree / "a.mp3").exists()
        assert not [p for p in tree.iterdir() if p.name.endswith(".part")]


def test_make_app_without_converter_does_not_convert(tree: pathlib.Path) -> None:
    with running_stack(tree) as s:
        links = RecordingLinks("https://pbx", str(tree), secret=SECRET, mp3=True)
        assert s.get(link_path(links, str(tree / "a.wav"))).status_code == 404
