"""Recording links: file path -> public URL, token check, safe path resolution, MP3 cache.

A link looks like ``{public_url}/{token}/recording/{relative path}`` (spec §6). The
token is, by default (``signed``), an HMAC-SHA256 of the relative path with a secret,
so a leaked link exposes one recording, not all of them; in ``shared`` mode it is the
web API token itself.

The same rules decide which relative paths are acceptable when building a link and
when serving one: every segment is a plain name (no ``.``/``..``, no hidden or temp
files, no backslash, NUL, control or format characters, no ``%`` left after the one
decoding, NFC only) and the file type is a known audio type. Resolution then follows
symlinks and refuses anything whose real path leaves the recordings directory.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import posixpath
import shutil
import stat
import tempfile
import unicodedata
from pathlib import Path
from urllib.parse import quote, unquote

import gevent.lock
from gevent import subprocess as gsubprocess

from fs_cc360.errors import ConfigError, FsCc360Error

log = logging.getLogger(__name__)

#: The file types served, by extension. Anything else under the directory is not.
CONTENT_TYPES = {
    ".mp3": "audio/mpeg",
    ".wav": "audio/wav",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
    ".webm": "audio/webm",
}

#: Characters of the signature kept in links (32 hex = 128 bits).
SIGNATURE_CHARS = 32
#: Longest acceptable relative path / path segment (bytes of UTF-8).
MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255

MODES = ("signed", "shared")


class RecordingError(FsCc360Error):
    """A recording could not be prepared for serving (e.g. MP3 conversion failed)."""


def content_type(path: str | os.PathLike[str]) -> str | None:
    """The Content-Type for a served recording, ``None`` for a type we do not serve."""
    return CONTENT_TYPES.get(os.path.splitext(os.fspath(path))[1].lower())


def safe_relpath(relpath: str) -> bool:
    """True when ``relpath`` (already decoded) is a plain relative path we may serve."""
    if not relpath or len(relpath.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return False
    if relpath.startswith("/") or "\\" in relpath or "%" in relpath:
        return False
    if any(unicodedata.category(ch).startswith("C") for ch in relpath):
        return False  # NUL, newlines, bidi overrides, zero-width, surrogates...
    if unicodedata.normalize("NFC", relpath) != relpath:
        return False
    for segment in relpath.split("/"):
        if not segment or segment.startswith(".") or segment.endswith((" ", ".")):
            return False
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return False
    return content_type(relpath) is not None


def decode_request_path(raw: str) -> str | None:
    """The relative path of a request, percent-decoded exactly once, or ``None``.

    ``raw`` is the path as it came on the request line (after ``/recording/``). A
    ``%`` that survives the decoding (``%252e``) means double encoding and is refused,
    as is invalid UTF-8 and anything :func:`safe_relpath` refuses.
    """
    if not raw or "\\" in raw or "\x00" in raw:
        return None
    try:
        decoded = unquote(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        return None
    return decoded if safe_relpath(decoded) else None


class RecordingLinks:
    """Builds and checks recording links for one recordings directory."""

    def __init__(
        self,
        public_url: str,
        recordings_dir: str,
        *,
        mode: str = "signed",
        secret: bytes = b"",
        shared_token: str = "",
        mp3: bool = False,
        domains: tuple[str, ...] = (),
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"recording_auth must be one of {MODES}, not {mode!r}",
                              key="recording_auth")
        if mode == "signed" and not secret:
            raise ConfigError("recording_auth = signed needs a secret", key="recording_secret")
        if mode == "shared" and not shared_token:
            raise ConfigError("recording_auth = shared needs the web API token", key="token")
        if not recordings_dir:
            raise ConfigError("recordings_dir is empty", key="recordings_dir")
        self.public_url = public_url.rstrip("/")  #: e.g. ``https://pbx.example.com``
        self.recordings_dir = recordings_dir  #: as configured (may be a symlink)
        self.mode = mode  #: ``signed`` (HMAC per file) or ``shared`` (the API token)
        self.mp3 = mp3  #: link ``.mp3`` for a ``.wav`` (served by converting on demand)
        self._secret = secret
        self._shared = shared_token
        #: A tenant's connector links and serves only ``<recordings_dir>/<domain>/...``
        #: of its own domains (FusionPBX: ``<recordings>/<domain>/archive/YYYY/Mon/DD``).
        self.domains = tuple(d.lower() for d in domains)

    # -- building links ----------------------------------------------------------------

    def relative_path(self, file_path: str) -> str | None:
        """``file_path`` relative to the recordings directory, or ``None`` when outside.

        FreeSWITCH reports absolute paths; either the configured spelling of the
        directory or its real path (symlinks resolved) is accepted as the prefix.
        """
        if not file_path or "\x00" in file_path or "\\" in file_path:
            return None
        if posixpath.isabs(file_path):
            norm = posixpath.normpath(file_path)
            for root in self._roots():
                if norm.startswith(root + "/"):
                    rel = norm[len(root) + 1:]
                    break
            else:
                return None
        else:
            rel = posixpath.normpath(file_path)
        return rel if safe_relpath(rel) and self._tenant_may(rel) else None

    def _tenant_may(self, rel: str) -> bool:
        """Whether ``rel`` lies under one of this tenant's domain directories."""
        return not self.domains or rel.split("/", 1)[0].lower() in self.domains

    def url_for(self, file_path: str) -> str | None:
        """The public link of a recording FreeSWITCH wrote, ``None`` (caller logs) when the
        file is outside the recordings directory or not a servable audio file."""
        rel = self.relative_path(file_path)
        if rel is None:
            return None
        if self.mp3 and rel.lower().endswith(".wav"):
            rel = rel[:-4] + ".mp3"
        quoted = "/".join(quote(seg, safe="") for seg in rel.split("/"))
        token = quote(self.token_for(rel), safe="")
        return f"{self.public_url}/{token}/recording/{quoted}"

    def token_for(self, relpath: str) -> str:
        if self.mode == "shared":
            return self._shared
        digest = hmac.new(self._secret, relpath.encode("utf-8"), hashlib.sha256).hexdigest()
        return digest[:SIGNATURE_CHARS]

    # -- serving -----------------------------------------------------------------------

    def verify(self, token: str, relpath: str) -> bool:
        """Constant-time check of a link's token for ``relpath`` (decoded)."""
        expected = self.token_for(relpath).encode("utf-8")
        given = token.encode("utf-8", "replace")
        return hmac.compare_digest(given, expected)

    def resolve(self, relpath: str) -> Path | None:
        """The real path of a servable file for ``relpath`` (decoded), or ``None``.

        ``None`` for unsafe paths, missing files, directories, and symlinks whose target
        leaves the recordings directory or is not an audio file. The caller answers 404
        for all of these alike.
        """
        if not safe_relpath(relpath) or not self._tenant_may(relpath):
            return None
        try:
            root = Path(self.recordings_dir).resolve(strict=True)
            real = (root / relpath).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, permission, symlink loop
            return None
        if not real.is_relative_to(root) or content_type(real) is None:
            return None
        if self.domains and not any(real.is_relative_to(root / d) for d in self.domains):
            return None  # a symlink into another tenant's directory
        try:
            if not stat.S_ISREG(real.stat().st_mode):
                return None
        except OSError:
            return None
        return real

    def _roots(self) -> list[str]:
        roots = [posixpath.normpath(self.recordings_dir)]
        real = os.path.realpath(self.recordings_dir)
        if real not in roots:
            roots.append(real)
        return roots


class _KeyLock:
    """A per-file lock and the number of greenlets using it (to drop it when unused)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = gevent.lock.Semaphore()
        self.users = 0


class Mp3Converter:
    """Converts a ``.wav`` recording to ``.mp3`` next to it, once, on demand.

    The encoder (``lame`` or ``ffmpeg``) is found at construction, so a missing one
    is a start-up error rather than a failure on the first request. Conversions run as
    gevent subprocesses (the hub keeps serving), at most ``max_parallel`` at a time;
    the result is written to a hidden temp file in the same directory and renamed into
    place, so a reader never sees half an MP3.
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        bitrate_kbps: int = 32,
        timeout: float = 300.0,
        max_parallel: int = 2,
    ) -> None:
        candidates = [binary] if binary else ["lame", "ffmpeg"]
        found = None
        for candidate in candidates:
            found = shutil.which(candidate)
            if found:
                break
        if not found:
            raise ConfigError(
                "convert_to_mp3 is on but no MP3 encoder was found "
                f"(looked for {', '.join(candidates)}): install lame or ffmpeg, "
                "or turn convert_to_mp3 off",
                key="convert_to_mp3",
            )
        self.binary = found  #: absolute path of the encoder
        self.kind = "ffmpeg" if "ffmpeg" in os.path.basename(found).lower() else "lame"
        self.bitrate_kbps = bitrate_kbps
        self.timeout = timeout  #: seconds before a conversion is killed
        self._slots = gevent.lock.BoundedSemaphore(max_parallel)
        self._locks: dict[str, _KeyLock] = {}

    def command(self, src: Path, dst: Path) -> list[str]:
        if self.kind == "ffmpeg":
            return [
                self.binary, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                "-i", str(src), "-codec:a", "libmp3lame", "-b:a", f"{self.bitrate_kbps}k",
                "-f", "mp3", str(dst),
            ]
        return [self.binary, "--quiet", "-b", str(self.bitrate_kbps), str(src), str(dst)]

    def target_for(self, wav: Path) -> Path:
        return wav.with_suffix(".mp3")

    def convert(self, wav: Path) -> Path:
        """The ``.mp3`` for ``wav``, converting when it is missing or older than ``wav``.

        Raises :class:`RecordingError` when the encoder fails or times out.
        """
        dst = self.target_for(wav)
        key = str(dst)
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = _KeyLock()
        entry.users += 1
        try:
            with entry.lock:
                if self._fresh(wav, dst):
                    return dst
                with self._slots:
                    self._run(wav, dst)
                return dst
        finally:
            entry.users -= 1
            if entry.users == 0:
                self._locks.pop(key, None)

    @staticmethod
    def _fresh(src: Path, dst: Path) -> bool:
        try:
            d = dst.stat()
            return d.st_size > 0 and d.st_mtime_ns >= src.stat().st_mtime_ns
        except FileNotFoundError:
            return False

    def _run(self, src: Path, dst: Path) -> None:
        src_stat = src.stat()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            log.info("recordings.convert src=%s encoder=%s", src.name, self.kind)
            try:
                proc = gsubprocess.run(
                    self.command(src, tmp),
                    stdin=gsubprocess.DEVNULL,
                    stdout=gsubprocess.DEVNULL,
                    stderr=gsubprocess.PIPE,
                    timeout=self.timeout,
                    check=False,
                )
            except gsubprocess.TimeoutExpired as exc:
                raise RecordingError(f"{self.kind} timed out on {src.name}") from exc
            if proc.returncode != 0 or tmp.stat().st_size == 0:
                err = (proc.stderr or b"").decode("utf-8", "replace").strip()[-300:]
                raise RecordingError(
                    f"{self.kind} failed on {src.name}: rc={proc.returncode} {err}"
                )
            os.chmod(tmp, stat.S_IMODE(src_stat.st_mode))
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
