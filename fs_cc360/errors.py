"""The exception tree of fs-cc360.

Every error the project raises on purpose derives from :class:`FsCc360Error`, so a
caller can catch by phase (``EslError``) or by kind (``CrmUnavailable``). The CRM
errors carry what the delivery loop needs to decide (``status``, ``retry_after``).
"""

from __future__ import annotations


class FsCc360Error(Exception):
    """Root of every error fs-cc360 raises on purpose."""


class ConfigError(FsCc360Error):
    """A configuration value is missing or invalid; the message names the key and the file."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = source


class FrameError(FsCc360Error):
    """A malformed ESL frame: logged and skipped, never fatal."""


class EslError(FsCc360Error):
    """Something went wrong talking to FreeSWITCH's event socket."""


class EslConnectionError(EslError):
    """No usable connection to FreeSWITCH (down, refused, auth failed, dropped)."""


class EslCommandError(EslError):
    """FreeSWITCH answered a command with ``-ERR``."""


class OutboxError(FsCc360Error):
    """The durable outbox could not be read or written; ``orig`` keeps the driver error."""

    def __init__(self, message: str, orig: BaseException | None = None) -> None:
        super().__init__(message)
        self.orig = orig


class CrmError(FsCc360Error):
    """A CC360 request failed. ``status`` is the HTTP status when there was one."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class CrmUnavailable(CrmError):
    """Transient: connection refused, 5xx, 408, 429. Retry with backoff."""


class CrmTimeout(CrmUnavailable):
    """The CRM did not answer within the configured timeout. Retry with backoff."""


class CrmAuthError(CrmError):
    """The session is gone or the login failed: log in again once, then retry."""


class CrmRejected(CrmError):
    """A permanent 4xx: the request itself is wrong, retrying will not help (dead-letter)."""
