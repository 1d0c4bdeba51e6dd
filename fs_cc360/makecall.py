"""Click-to-call (spec §5): validate ``first``/``second``, build the originate, send it.

The agent's phone rings first and shows the *client's* number
(``origination_caller_id_number``); when the agent answers, FreeSWITCH runs the
admin's dialplan for the client's number with the agent's caller ID
(``effective_caller_id_number``), so gateways and outbound caller-ID rules stay theirs.
The ``cc360_*`` variables tag the legs so the call tracker reports an *outgoing* call
from the agent to the client, and ``origination_uuid`` is the call id we answer with.

Nothing from the query string reaches FreeSWITCH unless it is ASCII digits, and every
value is checked once more against a tiny whitelist right before it is formatted
(:func:`originate_value`), so originate syntax (``{ } , ' ^ |``, spaces, newlines) can
never be injected, whatever the number rules or the extension check let through.
"""

from __future__ import annotations

import logging
import re
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fs_cc360.errors import ConfigError, EslCommandError, EslConnectionError, FsCc360Error
from fs_cc360.numbers import NumberRules

log = logging.getLogger(__name__)

#: ``str.format`` syntax, as ``[webapi] originate`` is validated by config.py: ``{vars}`` is
#: the whole ``{a=b,...}`` block, ``{agent}`` and ``{client}`` the bare values; literal
#: braces (an admin's own ``{{x=y}}``) are written doubled.
DEFAULT_TEMPLATE = "{vars}user/{agent} {client} XML default"

#: Longest ``first`` accepted (an extension is a few digits; spec §1: digits only).
MAX_EXTENSION_DIGITS = 15

TEMPLATE_FIELDS = ("vars", "agent", "client")
#: Optional: ``{domain}``, the tenant's directory domain (``[calls] domains``).
OPTIONAL_FIELDS = ("domain",)
#: What ``second`` may contain before normalisation: digits and the usual decoration (a
#: space too: an unencoded ``+`` in a query string arrives as one).
_PHONE_INPUT = re.compile(r"[0-9 ()+\-.]+")
MAX_PHONE_CHARS = 40
_ASCII_DIGITS = re.compile(r"[0-9]+")
_SAFE_VALUE = re.compile(r"[0-9A-Za-z-]+")
_REASON = re.compile(r"[A-Z0-9_]{1,48}")


class _MetricsLike(Protocol):
    def makecall(self, result: str, reason: str | None = None) -> None: ...


class MakeCallError(FsCc360Error):
    """A makecall request refused; ``status`` is the HTTP status the web API answers.

    ``param`` names the query parameter at fault (``None`` when it is not about one),
    ``problem`` says what is wrong in words safe to show the caller.
    """

    def __init__(
        self, param: str | None, problem: str, status: int = 400, *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{param}: {problem}" if param else problem)
        self.param = param
        self.problem = problem
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class MakeCallResult:
    call_id: str  #: the origination UUID: the agent leg's Unique-ID, the CC360 call id
    job_uuid: str  #: the bgapi Job-UUID whose BACKGROUND_JOB says how it ended


@dataclass
class _Placed:
    agent: str
    client: str
    call_id: str
    job_uuid: str
    placed_at: float
    done: bool = False


def originate_value(value: str) -> str:
    """``value`` if it can go into an originate string as it is, else ``ValueError``.

    A whitelist, not an escape: FreeSWITCH has no escaping that is reliable across a
    ``{var=value}`` block, a dial string and the dialplan arguments, so anything but
    letters, digits and ``-`` is refused outright.
    """
    if not isinstance(value, str) or not _SAFE_VALUE.fullmatch(value):
        raise ValueError(f"unsafe originate value: {value!r}")
    return value


class MakeCall:
    """Places click-to-call calls through an injected ``bgapi(command, job_uuid)``.

    ``bgapi`` returns the job UUID (raising ``EslConnectionError`` when FreeSWITCH is
    not connected); ``on_job_result`` must be called with each BACKGROUND_JOB so the
    outcome is logged and the agent is free again. One agent gets at most one call per
    ``per_agent_seconds``, and none while its previous originate is still pending (up to
    ``pending_seconds``, in case the BACKGROUND_JOB is lost with the connection).
    """

    def __init__(
        self,
        bgapi: Callable[[str, str | None], str],
        *,
        template: str = DEFAULT_TEMPLATE,
        is_extension: Callable[[str], bool],
        rules: NumberRules,
        per_agent_seconds: float = 10.0,
        pending_seconds: float = 60.0,
        originate_timeout: int = 30,
        clock: Callable[[], float] = time.monotonic,
        new_uuid: Callable[[], Any] = uuid.uuid4,
        metrics: _MetricsLike | None = None,
        domain: str | None = None,
    ) -> None:
        check_template(template, domain)
        #: The tenant's domain, for ``{domain}`` (None: a single-tenant switch).
        self.domain = domain
        self._bgapi = bgapi
        self.template = template
        self._is_extension = is_extension
        self._rules = rules
        self.per_agent_seconds = per_agent_seconds
        self.pending_seconds = max(pending_seconds, per_agent_seconds)
        self.originate_timeout = int(originate_timeout)
        self._clock = clock
        self._new_uuid = new_uuid
        self._metrics = metrics
        self._agents: dict[str, _Placed] = {}
        self._jobs: dict[str, _Placed] = {}

    # -- request side ------------------------------------------------------------------

    def place(self, first: str | None, second: str | None) -> MakeCallResult:
        """Validate, apply the per-agent limit, send ``bgapi originate``.

        Raises :class:`MakeCallError` (400 bad parameter, 429 limited, 503 ESL down,
        502 FreeSWITCH refused the command). Nothing is sent unless every check passed.
        """
        try:
            agent = self.check_agent(first)
            client = self.check_client(second)
        except MakeCallError:
            self._count("invalid")
            raise
        now = self._clock()
        self._forget_old(now)
        try:
            self._check_limit(agent, now)
        except MakeCallError:
            self._count("limited")
            raise
        call_id = str(self._new_uuid())
        job_uuid = str(self._new_uuid())
        command = "originate " + self.originate_string(agent, client, call_id)
        placed = _Placed(agent, client, call_id, job_uuid, now)
        # Registered before sending: the BACKGROUND_JOB may be handled before bgapi returns.
        self._agents[agent] = placed
        self._jobs[job_uuid] = placed
        try:
            returned = self._bgapi(command, job_uuid)
        except EslConnectionError as exc:
            self._drop(placed)
            self._count("unavailable")
            log.warning("makecall.esl_down call=%s agent=%s error=%s", call_id, agent, exc)
            raise MakeCallError(None, "FreeSWITCH is not connected", 503) from exc
        except EslCommandError as exc:
            self._drop(placed)
            self._count("error")
            log.warning("makecall.refused call=%s agent=%s error=%s", call_id, agent, exc)
            raise MakeCallError(None, "FreeSWITCH refused the command", 502) from exc
        except BaseException:
            self._drop(placed)
            self._count("error")
            raise
        if returned and returned != job_uuid:
            log.warning("makecall.job_uuid_changed call=%s sent=%s got=%s",
                        call_id, job_uuid, returned)
            self._jobs[str(returned)] = placed
            placed.job_uuid = str(returned)
        self._count("accepted")
        log.info("makecall.placed call=%s job=%s agent=%s client=%s",
                 call_id, placed.job_uuid, agent, client)
        return MakeCallResult(call_id, placed.job_uuid)

    def check_agent(self, first: str | None) -> str:
        if first is None or first == "":
            raise MakeCallError("first", "missing")
        if len(first) > MAX_EXTENSION_DIGITS or not _ASCII_DIGITS.fullmatch(first):
            raise MakeCallError("first", "not an extension (digits only)")
        if not self._is_extension(first):
            raise MakeCallError("first", "not a known extension")
        return first

    def check_client(self, second: str | None) -> str:
        if second is None or second == "":
            raise MakeCallError("second", "missing")
        if len(second) > MAX_PHONE_CHARS or not _PHONE_INPUT.fullmatch(second):
            # Stricter than phone_or_none, which strips (a trailing newline would pass).
            raise MakeCallError("second", "not a phone number")
        phone = self._rules.phone_or_none(second)
        if phone is None or not _ASCII_DIGITS.fullmatch(phone):
            raise MakeCallError("second", "not a phone number")
        return phone

    def originate_string(self, agent: str, client: str, call_id: str) -> str:
        """The argument of ``originate`` (without the word) for one call."""
        try:
            agent, client, call_id = (originate_value(v) for v in (agent, client, call_id))
        except ValueError as exc:  # unreachable after check_*; kept as the last guard
            raise MakeCallError(None, "unsafe value", 400) from exc
        variables = [
            ("origination_uuid", call_id),
            ("origination_caller_id_number", client),
            ("origination_caller_id_name", client),
            ("effective_caller_id_number", agent),
            ("cc360_direction", "outgoing"),
            ("cc360_agent", agent),
            ("cc360_client", client),
            ("ignore_early_media", "true"),
            ("originate_timeout", str(self.originate_timeout)),
        ]
        block = "{" + ",".join(f"{k}={originate_value(v)}" for k, v in variables) + "}"
        values = {"vars": block, "agent": agent, "client": client,
                  "domain": self.domain or ""}
        out: list[str] = []
        for literal, name, _spec, _conversion in string.Formatter().parse(self.template):
            out.append(literal)
            if name is not None:
                out.append(values[name])
        return "".join(out)

    # -- result side -------------------------------------------------------------------

    def on_job_result(self, job_uuid: str, body: str | bytes) -> bool:
        """Record a BACKGROUND_JOB's outcome; ``False`` when the job is not a makecall."""
        placed = self._jobs.get(job_uuid)
        if placed is None:
            return False
        self._forget_jobs(placed)
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
        line = text.strip().splitlines()[0].strip() if text.strip() else ""
        ok = line.startswith("+OK")
        placed.done = True
        if ok:
            self._count("originated")
            log.info("makecall.result call=%s job=%s agent=%s client=%s ok=true",
                     placed.call_id, job_uuid, placed.agent, placed.client)
        else:
            reason = job_failure_reason(line)
            self._count("failed", reason)
            log.warning("makecall.result call=%s job=%s agent=%s client=%s ok=false reason=%s",
                        placed.call_id, job_uuid, placed.agent, placed.client, reason)
        return True

    def pending(self) -> int:
        """Originate jobs sent and not answered yet."""
        return len({id(p) for p in self._jobs.values()})

    # -- internals ---------------------------------------------------------------------

    def _check_limit(self, agent: str, now: float) -> None:
        last = self._agents.get(agent)
        if last is None:
            return
        elapsed = now - last.placed_at
        if not last.done and elapsed < self.pending_seconds:
            raise MakeCallError("first", "a call for this agent is still being placed", 429,
                                retry_after=max(1.0, self.per_agent_seconds - elapsed))
        if elapsed < self.per_agent_seconds:
            raise MakeCallError("first", "too many calls for this agent, try again later", 429,
                                retry_after=max(1.0, self.per_agent_seconds - elapsed))

    def _forget_old(self, now: float) -> None:
        """Drop agents past their limit and jobs whose result never came."""
        for agent, placed in list(self._agents.items()):
            elapsed = now - placed.placed_at
            if not placed.done and elapsed >= self.pending_seconds:
                log.warning("makecall.no_result call=%s job=%s agent=%s after=%.0fs",
                            placed.call_id, placed.job_uuid, agent, elapsed)
                self._drop(placed)
            elif placed.done and elapsed >= self.per_agent_seconds:
                del self._agents[agent]

    def _drop(self, placed: _Placed) -> None:
        if self._agents.get(placed.agent) is placed:
            del self._agents[placed.agent]
        self._forget_jobs(placed)

    def _forget_jobs(self, placed: _Placed) -> None:
        """Remove every key of ``placed`` (the Job-UUID sent, and the one FreeSWITCH
        returned when it differs)."""
        for key in [k for k, v in self._jobs.items() if v is placed]:
            del self._jobs[key]

    def _count(self, result: str, reason: str | None = None) -> None:
        if self._metrics is not None:
            try:
                self._metrics.makecall(result, reason)
            except Exception:
                log.warning("makecall.metrics_failed", exc_info=True)


def job_failure_reason(line: str) -> str:
    """``-ERR USER_NOT_REGISTERED`` -> ``USER_NOT_REGISTERED``; anything odd -> ``UNKNOWN``."""
    words = line.split()
    if len(words) >= 2 and words[0] == "-ERR" and _REASON.fullmatch(words[1]):
        return words[1]
    return "UNKNOWN"


def check_template(template: str, domain: str | None = None) -> None:
    """Refuse, at start-up, a template we cannot expand or the tracker could not follow.

    Same rules as config.py's ``[webapi] originate`` check (``str.format`` syntax, exactly
    the fields ``vars``, ``agent``, ``client``, each present), repeated here because
    ``MakeCall`` may be built without config.py.
    """
    if "\n" in template or "\r" in template:
        raise ConfigError("[webapi] originate must be one line", key="originate")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"[webapi] originate: {exc} (write literal braces as {{{{ }}}})",
                          key="originate") from None
    seen: set[str] = set()
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS + OPTIONAL_FIELDS or spec or conversion:
            raise ConfigError(f"[webapi] originate: unknown placeholder {{{name}}}",
                              key="originate")
        seen.add(name)
    if domain and "domain" not in seen:
        raise ConfigError(
            "[webapi] originate must dial the agent inside the tenant's domain "
            "(user/{agent}@{domain}): [calls] domains is set", key="originate")
    if "domain" in seen and not domain:
        raise ConfigError("[webapi] originate uses {domain} but [calls] domains is empty",
                          key="originate")
    missing = [name for name in TEMPLATE_FIELDS if name not in seen]
    if missing:
        raise ConfigError(
            f"[webapi] originate lacks {', '.join('{' + m + '}' for m in missing)}: {{vars}} "
            "carries the call id and the cc360_* tags the call tracker needs",
            key="originate",
        )
