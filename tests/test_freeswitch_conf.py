"""freeswitch_conf/ and the deployment files: well-formed, the expected shape, and a source
for every channel variable the connector reads.

FreeSWITCH runs a preprocessor over its files before parsing them, line by line and blind to
XML comments (``preprocessor_lines`` reads text the same way): the shipped files must hold
no directive at all, and the README snippets only lone, complete ones. The event list the
docs give must be what the service subscribes to (:data:`fs_cc360.service.SUBSCRIBED_EVENTS`).

The cross-check (``test_every_channel_variable_read_has_a_source``) reads the package's
code, not a list someone keeps: every ``event.var("name")`` call (a literal name, a name
bound by a ``for`` over literal names, or a module constant), every ``"variable_<name>"``
string and every module-level ``*VARIABLE*`` collection of names. Each name must be set
by FreeSWITCH itself (``FREESWITCH_VARIABLES`` below, each entry checked against the real
capture it names), by the shipped FreeSWITCH files (an action, a ``<variable>`` or a dial
string in freeswitch_conf/, or an XML example in freeswitch_conf/README.md), or by the
click-to-call originate (read from :class:`fs_cc360.makecall.MakeCall` itself). A name
the test cannot work out statically fails too, unless it comes from the configuration
(``self.config.<key>``: a variable the admin names, e.g. ``[calls] recording_variable``).
"""

from __future__ import annotations

import ast
import configparser
import copy
import pathlib
import re
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pytest

from fs_cc360.events import parse_event
from fs_cc360.makecall import MakeCall
from fs_cc360.numbers import NumberRules
from fs_cc360.service import SUBSCRIBED_EVENTS
from tests.fakes.captures import SCENARIOS, capture_frames

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONF = ROOT / "freeswitch_conf"
PACKAGE = ROOT / "fs_cc360"
SCRIPTS = ROOT / "scripts"
CAPTURES = ROOT / "tests" / "captures"

XML_FILES = sorted(CONF.rglob("*.xml"))
SNIPPETS = sorted(CONF.rglob("*.snippet"))
CONTEXT_DIRS = ("default", "public")

# Variables FreeSWITCH sets by itself, with a capture (tests/captures/<scenario>.esl) and
# an event of it that carries the variable; test_documented_freeswitch_variables checks
# each claim. Add a variable here when the connector starts reading it.
A = "a_inbound_answered_caller_hangup"
C = "c_click_to_call_101_to_external"
G = "g_internal_102_to_101_answered"
H = "h_ring_group_102_answers"
M = "m_attended_transfer"
Q = "q1_queue_first_agent_no_answer"
R = "r1_loopback_ring_group_102_answers"
FREESWITCH_VARIABLES: dict[str, tuple[str, str]] = {
    # Who the leg is: the user/ endpoint on legs it dials (a: 101's leg), sofia on the
    # legs an authenticated phone places (g: 102's leg).
    "dialed_user": (A, "CHANNEL_CREATE"),
    "dialed_extension": (A, "CHANNEL_PROGRESS_MEDIA"),
    "dialed_domain": (A, "CHANNEL_CREATE"),
    "user_name": (G, "CHANNEL_CREATE"),
    "domain_name": (G, "CHANNEL_CREATE"),
    "number_alias": (G, "CHANNEL_CREATE"),
    "sip_authorized": (G, "CHANNEL_CREATE"),
    "user_context": (A, "CHANNEL_HANGUP"),
    "sip_from_user": (A, "CHANNEL_CREATE"),
    "sip_to_user": (A, "CHANNEL_CREATE"),
    "sip_req_user": (A, "CHANNEL_CREATE"),
    "direction": (A, "CHANNEL_CREATE"),
    "is_outbound": (A, "CHANNEL_CREATE"),
    "channel_name": (A, "CHANNEL_CREATE"),
    "sofia_profile_name": (A, "CHANNEL_CREATE"),
    # Which legs make one call (a: 101's leg names the caller's; the caller's lists 101's).
    "uuid": (A, "CHANNEL_CREATE"),
    "call_uuid": (A, "CHANNEL_CREATE"),
    "originator": (A, "CHANNEL_CREATE"),
    "originating_leg_uuid": (A, "CHANNEL_CREATE"),
    "originated_legs": (A, "CHANNEL_ANSWER"),
    "signal_bond": (A, "CHANNEL_CREATE"),
    "bridge_uuid": (A, "CHANNEL_HANGUP"),
    "bridge_to": (A, "CHANNEL_HANGUP"),
    "last_bridge_to": (A, "CHANNEL_HANGUP"),
    "transfer_history": (C, "RECORD_START"),
    "transfer_source": (C, "RECORD_START"),
    "att_xfer_result": (M, "CHANNEL_BRIDGE"),
    "call_completed_elsewhere": (H, "CHANNEL_HANGUP_COMPLETE"),
    "group_dial_status": (H, "CHANNEL_HANGUP"),
    # Caller IDs.
    "effective_caller_id_number": (A, "CHANNEL_HANGUP"),
    "effective_caller_id_name": (A, "CHANNEL_HANGUP"),
    "original_caller_id_number": (M, "CHANNEL_UNBRIDGE"),
    "pre_transfer_caller_id_number": (C, "RECORD_START"),
    "last_sent_callee_id_number": (A, "CHANNEL_HANGUP"),
    "presence_id": (A, "CHANNEL_CREATE"),
    # CDR figures: from CHANNEL_HANGUP_COMPLETE on (a).
    "billsec": (A, "CHANNEL_HANGUP_COMPLETE"),
    "billmsec": (A, "CHANNEL_HANGUP_COMPLETE"),
    "answersec": (A, "CHANNEL_HANGUP_COMPLETE"),
    "duration": (A, "CHANNEL_HANGUP_COMPLETE"),
    "waitsec": (A, "CHANNEL_HANGUP_COMPLETE"),
    "progresssec": (A, "CHANNEL_HANGUP_COMPLETE"),
    "progress_mediasec": (A, "CHANNEL_HANGUP_COMPLETE"),
    "start_epoch": (A, "CHANNEL_HANGUP_COMPLETE"),
    "answer_epoch": (A, "CHANNEL_HANGUP_COMPLETE"),
    "answer_uepoch": (A, "CHANNEL_HANGUP_COMPLETE"),
    "bridge_epoch": (A, "CHANNEL_HANGUP_COMPLETE"),
    "progress_epoch": (A, "CHANNEL_HANGUP_COMPLETE"),
    "progress_uepoch": (A, "CHANNEL_HANGUP_COMPLETE"),
    "progress_media_uepoch": (A, "CHANNEL_HANGUP_COMPLETE"),
    "progress_media_epoch": (A, "CHANNEL_HANGUP_COMPLETE"),
    "end_epoch": (A, "CHANNEL_HANGUP_COMPLETE"),
    "hangup_cause": (A, "CHANNEL_HANGUP_COMPLETE"),
    "hangup_cause_q850": (A, "CHANNEL_HANGUP_COMPLETE"),
    "sip_hangup_disposition": (A, "CHANNEL_UNBRIDGE"),
    "originate_disposition": (A, "CHANNEL_ANSWER"),
    "DIALSTATUS": (A, "CHANNEL_ANSWER"),
    "endpoint_disposition": (A, "CHANNEL_CREATE"),
    "last_app": (A, "CHANNEL_HANGUP_COMPLETE"),
    "last_arg": (A, "CHANNEL_HANGUP_COMPLETE"),
    "current_application": (A, "CHANNEL_PROGRESS_MEDIA"),
    "current_application_data": (A, "CHANNEL_PROGRESS_MEDIA"),
    # Recordings (a: the caller leg's RECORD_STOP).
    "record_seconds": (A, "RECORD_STOP"),
    "record_ms": (A, "RECORD_STOP"),
    "record_file_size": (A, "RECORD_STOP"),
    "record_completion_cause": (A, "RECORD_STOP"),
    "record_stereo": (A, "CHANNEL_HANGUP"),
    # mod_callcenter: an agent leg's only link to the caller's leg (q1: 101's leg).
    "cc_member_session_uuid": (Q, "CHANNEL_CREATE"),
    # mod_loopback pairs (r1: the -a half names the leg it was placed from and its -b half;
    # the -b half names the -a half and the caller's leg).
    "loopback_leg": (R, "CHANNEL_CREATE"),
    "loopback_from_uuid": (R, "CHANNEL_CREATE"),
    "other_loopback_leg_uuid": (R, "CHANNEL_CREATE"),
    "other_loopback_from_uuid": (R, "CHANNEL_CREATE"),
}
# Set by FreeSWITCH where no capture shows it (the PBX of the captures had no such leg).
FREESWITCH_VARIABLES_NOT_CAPTURED: dict[str, str] = {}

# Variables the shipped dialplan uses for itself only: fs-cc360 need not read them.
DIALPLAN_OWN_VARIABLES = {"cc360_record", "cc360_record_ext", "cc360_recording"}

# The docs that list what fs-cc360 subscribes to, after SUBSCRIPTION_PHRASE; the list must
# be fs_cc360.service.SUBSCRIBED_EVENTS, the one `fs-cc360 run` sends.
EVENT_LIST_DOCS = (CONF / "README.md", CONF / "autoload_configs" / "switch.conf.xml.snippet")
SUBSCRIPTION_PHRASE = "subscribes to these events:"
PRINT_SUBSCRIPTION = (
    "python -c 'from fs_cc360.service import SUBSCRIBED_EVENTS; print(*SUBSCRIBED_EVENTS)'")
WITHOUT_VARIABLES = ("CHANNEL_STATE", "CHANNEL_CALLSTATE", "CHANNEL_OUTGOING")


# -- reading the files ---------------------------------------------------------------------


def parse_xml(path: pathlib.Path) -> ET.Element:
    return ET.parse(path).getroot()


def readme_xml_blocks() -> list[str]:
    text = (CONF / "README.md").read_text()
    return re.findall(r"```xml\n(.*?)```", text, flags=re.S)


def readme_xml_roots() -> list[ET.Element]:
    # A block may hold several elements and comments: wrap it to parse it.
    return [ET.fromstring(f"<example>{block}</example>") for block in readme_xml_blocks()]


def actions(root: ET.Element) -> Iterator[ET.Element]:
    for element in root.iter():
        if element.tag in ("action", "anti-action"):
            yield element


def names_set_by(root: ET.Element) -> set[str]:
    """Channel variables an XML tree sets: set/export/multiset actions, <variable>
    elements, and {a=b}/[a=b] blocks of dial strings."""
    names: set[str] = set()
    for element in actions(root):
        app, data = element.get("application", ""), element.get("data", "")
        if app in ("set", "export"):
            data = data.removeprefix("nolocal:")
            names.add(data.split("=", 1)[0].strip())
        elif app == "multiset":
            names.update(_assignments(data.removeprefix("^^")))
        elif app in ("bridge", "originate"):
            for block in re.findall(r"[{\[<]([^}\]>]*)[}\]>]", data):
                names.update(_assignments(block))
    for element in root.iter("variable"):
        if element.get("name"):
            names.add(element.get("name", ""))
    return names


def _assignments(text: str) -> set[str]:
    return {part.split("=", 1)[0].strip() for part in re.split(r"[,:\s]+", text) if "=" in part}


def conf_variables() -> set[str]:
    names: set[str] = set()
    for path in XML_FILES:
        names |= names_set_by(parse_xml(path))
    for root in readme_xml_roots():
        names |= names_set_by(root)
    return names


def originate_variables() -> set[str]:
    """The variables fs-cc360's click-to-call puts on the agent's leg."""
    makecall = MakeCall(lambda command, job: job or "job", is_extension=str.isdigit,
                        rules=NumberRules())
    call_id = "d9c7a0b2-0c8e-4f4e-8d7a-1b2c3d4e5f60"
    command = makecall.originate_string("101", "79991234567", call_id)
    block = re.match(r"\{([^}]*)\}", command)
    assert block, command
    return _assignments(block.group(1))


def unit(path: pathlib.Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


# -- finding the variables the code reads ----------------------------------------------------


@dataclass(frozen=True)
class Read:
    where: str  #: module:line
    name: str | None  #: the variable, when known statically
    configured: str | None = None  #: the configuration key naming it, e.g. "recording_variable"


def variable_reads() -> list[Read]:
    reads: list[Read] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        reads.extend(_reads_in(path))
    return reads


def _reads_in(path: pathlib.Path) -> list[Read]:
    return _reads_in_source(path.read_text(), path.relative_to(ROOT).as_posix())


def _reads_in_source(source: str, module: str) -> list[Read]:
    tree = ast.parse(source, filename=module)
    constants: dict[str, ast.expr] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        for target in targets:
            if isinstance(target, ast.Name):
                constants[target.id] = value
    reads: list[Read] = []
    for name, value in constants.items():  # VARIABLES_READ = ("dialed_user", ...)
        if "VARIABLE" in name.upper() and _literal_strings(value) is not None:
            for var in _literal_strings(value) or ():
                reads.append(Read(f"{module}:{value.lineno}", var))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(r"variable_([A-Za-z0-9_]+)", node.value)
            if match:
                reads.append(Read(f"{module}:{node.lineno}", match.group(1)))
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        local = _local_bindings(function)
        for node in ast.walk(function):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "var" and node.args):
                where = f"{module}:{node.lineno}"
                reads.extend(_resolve(node.args[0], local, constants, where))
    return reads


def _local_bindings(function: ast.AST) -> dict[str, list[ast.expr]]:
    """Names a function binds: ``x = ...`` and ``for x in ...`` (the iterable, marked)."""
    bound: dict[str, list[ast.expr]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    bound.setdefault(target.id, []).append(node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            bound.setdefault(node.target.id, []).append(node.value)
        elif isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            bound.setdefault(node.target.id, []).append(ast.Starred(value=node.iter))
    return bound


def _literal_strings(node: ast.expr) -> list[str] | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args and (
        node.func.id in ("frozenset", "set", "tuple", "list")
    ):
        node = node.args[0]
    if isinstance(node, ast.Tuple | ast.List | ast.Set) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]  # type: ignore[attr-defined]
    return None


def _resolve(node: ast.expr, local: dict[str, list[ast.expr]], constants: dict[str, ast.expr],
             where: str, depth: int = 0) -> list[Read]:
    if depth > 5:
        return [Read(where, None)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [Read(where, node.value)]
    if isinstance(node, ast.Starred):  # the iterable of a for loop
        names = _literal_strings(node.value)
        if names is None and isinstance(node.value, ast.Name) and node.value.id in constants:
            names = _literal_strings(constants[node.value.id])
        return [Read(where, name) for name in names] if names is not None else [Read(where, None)]
    configured = _config_key(node)
    if configured:
        return [Read(where, None, configured)]
    if isinstance(node, ast.Name):
        sources = local.get(node.id) or ([constants[node.id]] if node.id in constants else [])
        if sources:
            out: list[Read] = []
            for source in sources:
                out.extend(_resolve(source, local, constants, where, depth + 1))
            return out
    return [Read(where, None)]


def _config_key(node: ast.expr) -> str | None:
    """``self.config.recording_variable`` or ``config.recording_variable`` -> its key."""
    if not isinstance(node, ast.Attribute):
        return None
    base = node.value
    if isinstance(base, ast.Attribute) and base.attr == "config":
        return node.attr
    if isinstance(base, ast.Name) and base.id in ("config", "settings"):
        return node.attr
    return None


# -- well-formed, and shaped as FreeSWITCH expects ------------------------------------------


def test_there_are_files_to_check() -> None:
    relative = {p.relative_to(CONF).as_posix() for p in XML_FILES}
    assert {
        "autoload_configs/event_socket.conf.xml", "autoload_configs/acl.conf.xml",
        "autoload_configs/json_cdr.conf.xml", "dialplan/default/00_cc360_record.xml",
        "dialplan/public/00_cc360_record.xml",
    } <= relative
    assert (CONF / "README.md").is_file()
    assert [p.name for p in SNIPPETS] == ["switch.conf.xml.snippet"]


@pytest.mark.parametrize("path", XML_FILES + SNIPPETS, ids=lambda p: p.relative_to(CONF).as_posix())
def test_xml_is_well_formed(path: pathlib.Path) -> None:
    # FreeSWITCH's preprocessor lines (<X-PRE-PROCESS .../>) are ordinary XML elements,
    # and $${global} / ${variable} references are ordinary text.
    root = parse_xml(path)
    assert root.tag in ("configuration", "include")


def test_readme_xml_examples_are_well_formed() -> None:
    roots = readme_xml_roots()
    assert len(roots) >= 3


# -- FreeSWITCH's preprocessor: what runs before the XML parser ------------------------------

# The commands preprocess() in src/switch_xml.c runs (FreeSWITCH 1.10); any other does nothing.
PREPROCESSOR_COMMANDS = ("set", "exec-set", "stun-set", "env-set", "include", "exec")
# The directives each shipped file is meant to run, by path below freeswitch_conf/: none. A
# drop-in file that set globals or pulled in files would do it on every reloadxml, on every
# server it is copied to (a set in a comment pinned cc360_record_ext=wav for everyone).
INTENDED_DIRECTIVES: dict[str, list[tuple[str, str]]] = {}
# What the README snippets may run: an include of one shipped context file by name, and the
# optional vars.xml pin of the recording format.
README_INCLUDES = {"default/00_cc360_record.xml", "public/00_cc360_record.xml"}
README_SETS = {"cc360_record_ext"}
README_FILES = (ROOT / "README.md", CONF / "README.md")


@dataclass(frozen=True)
class PreprocessorLine:
    """A line FreeSWITCH's preprocessor acts on instead of handing it to the XML parser."""

    number: int
    #: "directive": <X-PRE-PROCESS cmd="..." data="..."/>; "hash": <!--#cmd "arg"-->;
    #: "dropped": X-PRE-PROCESS without "<" before it (the line vanishes);
    #: "ignored": a directive on a line with <include>, </include> or <? (never runs).
    kind: Literal["directive", "hash", "dropped", "ignored"]
    text: str
    cmd: str | None = None
    data: str | None = None
    in_comment: bool = False  #: inside <!-- --> as an XML parser reads the text


def preprocessor_lines(text: str) -> list[PreprocessorLine]:
    """The lines of ``text`` FreeSWITCH's preprocessor acts on, found the way preprocess()
    in src/switch_xml.c (FreeSWITCH 1.10) reads a file, line by line and blind to comments:

    * a line holding ``<include>``, ``</include>`` or ``<?`` is skipped, unread;
    * a line holding ``X-PRE-PROCESS`` (any case): when ``<`` precedes the first one, its
      ``cmd="..."`` and ``data="..."`` (the first of each after it) run and the whole line
      is dropped; otherwise the line is just dropped;
    * else ``<!--#cmd "arg"-->`` (the older form) runs the same way; when its ``-->`` is on
      a later line, the lines up to that one are dropped.

    The ``$${global}`` expansion done first is left out: the files here add no directive
    through it.
    """
    comments = [m.span() for m in re.finditer(r"<!--.*?-->", text, flags=re.S)]
    found: list[PreprocessorLine] = []
    waiting_for_end = False  # inside a multi-line <!--#...-->
    line_start = 0
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        start, line_start = line_start, line_start + len(line)
        if any(mark in line for mark in ("<include>", "</include>", "<?")):
            if "x-pre-process" in line.lower() or "<!--#" in line:
                found.append(PreprocessorLine(number, "ignored", line.strip()))
            continue
        rest = line
        if waiting_for_end:
            if "-->" not in line:
                continue
            waiting_for_end = False
            rest = line[line.index("-->") + 3:]
        at = rest.lower().find("x-pre-process")
        if at >= 0:
            if at == 0 or rest[at - 1] != "<":
                found.append(PreprocessorLine(number, "dropped", line.strip()))
                continue
            position = start + len(line) - len(rest) + at - 1
            inside = any(begin <= position < end for begin, end in comments)
            cmd, data = _directive_attributes(rest[at:])
            found.append(PreprocessorLine(number, "directive", line.strip(), cmd, data, inside))
            continue
        at = rest.find("<!--#")
        if at >= 0:
            end = rest.find("-->", at)
            waiting_for_end = end < 0
            cmd, data = _hash_directive(rest[at + 5:end if end >= 0 else len(rest)])
            found.append(PreprocessorLine(number, "hash", line.strip(), cmd, data, True))
    return found


def _directive_attributes(tag: str) -> tuple[str | None, str | None]:
    """cmd and data as preprocess() finds them: the first ``cmd``, then ``=``, then a
    quoted value; then the same for ``data`` after it. None where it finds none."""
    cmd = re.search(r'cmd[^=]*=[^"]*"([^"]*)"?', tag, flags=re.I)
    if not cmd:
        return None, None
    data = re.search(r'data[^=]*=[^"]*"([^"]*)', tag[cmd.end():], flags=re.I)
    return cmd.group(1), data.group(1) if data else None


def _hash_directive(body: str) -> tuple[str, str | None]:
    """``cmd "arg"`` of a ``<!--#cmd "arg"-->`` line."""
    cmd, _, arg = body.strip("\r\n").partition(" ")
    quoted = re.search(r'"([^"]*)"', arg)
    return cmd, quoted.group(1) if quoted else (arg or None)


def preprocessor_problems(text: str) -> list[str]:
    """Every preprocessor line of ``text`` that would not do what its author meant: one in
    a comment (it runs all the same), one FreeSWITCH drops or never runs, one that is not a
    lone, complete ``<X-PRE-PROCESS cmd="..." data="..."/>`` with a known command."""
    problems: list[str] = []
    for line in preprocessor_lines(text):
        where = f"line {line.number}: {line.text}"
        if line.kind == "ignored":
            problems.append(f"{where}: on a line with <include>, </include> or <?, never runs")
        elif line.kind == "dropped":
            problems.append(f"{where}: X-PRE-PROCESS without '<': FreeSWITCH drops this line")
        elif line.kind == "hash":
            problems.append(f"{where}: <!--#...--> is a preprocessor directive, not a comment")
        elif line.in_comment:
            problems.append(f"{where}: runs although inside <!-- -->")
        elif line.cmd not in PREPROCESSOR_COMMANDS or not line.data or not re.fullmatch(
                r'<X-PRE-PROCESS\s+cmd="[^"]+"\s+data="[^"]+"\s*/>', line.text, flags=re.I):
            problems.append(f"{where}: not one complete directive with a known cmd")
    return problems


def preprocessor_directives(text: str) -> list[tuple[str, str]]:
    """(cmd, data) of every directive FreeSWITCH would run from ``text``."""
    return [(line.cmd, line.data) for line in preprocessor_lines(text)
            if line.kind in ("directive", "hash") and line.cmd and line.data]


def readme_preprocessor_snippets(path: pathlib.Path) -> list[str]:
    """What an admin pastes from a README that FreeSWITCH's preprocessor would act on: the
    ``xml`` code blocks and the inline code spans that mention it."""
    text = path.read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```xml\n(.*?)```", text, flags=re.S)]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    snippets = blocks + spans
    return [s for s in snippets if "x-pre-process" in s.lower() or "<!--#" in s]


@pytest.mark.parametrize("path", XML_FILES + SNIPPETS, ids=lambda p: p.relative_to(CONF).as_posix())
def test_shipped_files_run_only_intended_preprocessor_lines(path: pathlib.Path) -> None:
    # FreeSWITCH's preprocessor does not know XML comments: an example directive in a
    # comment runs on every reloadxml (issue 13: a "set" in the default dialplan's comments
    # pinned cc360_record_ext=wav, so the mp3 choice never ran, and an "include" in them
    # logged "Error including .../dialplan/default/default/*.xml").
    text = path.read_text()
    relative = path.relative_to(CONF).as_posix()
    assert preprocessor_problems(text) == []
    assert preprocessor_directives(text) == INTENDED_DIRECTIVES.get(relative, [])


@pytest.mark.parametrize("path", README_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_readme_preprocessor_snippets_are_lone_directives_of_shipped_files(
        path: pathlib.Path) -> None:
    for snippet in readme_preprocessor_snippets(path):
        assert preprocessor_problems(snippet) == [], snippet
        for cmd, data in preprocessor_directives(snippet):
            if cmd == "include":
                # One shipped file by name, never a directory's glob (see test below).
                assert data in README_INCLUDES and (CONF / "dialplan" / data).is_file(), data
            else:
                assert cmd == "set" and data.split("=", 1)[0] in README_SETS, (cmd, data)


def test_readme_gives_the_include_line_of_each_context_file() -> None:
    snippets = readme_preprocessor_snippets(CONF / "README.md")
    included = {data for snippet in snippets
                for cmd, data in preprocessor_directives(snippet) if cmd == "include"}
    assert included == README_INCLUDES
    assert {f"{context}/00_cc360_record.xml" for context in CONTEXT_DIRS} == README_INCLUDES
    assert {name.split("=", 1)[0] for snippet in snippets
            for cmd, name in preprocessor_directives(snippet) if cmd == "set"} == README_SETS
    assert README_SETS <= DIALPLAN_OWN_VARIABLES


def test_preprocessor_reading_runs_what_comments_hide() -> None:
    # The model above, on the mistakes it exists to catch (the first two were in the
    # default dialplan file of git history before issue 13).
    text = (
        "<!--\n"
        "  your default.xml includes this directory with\n"
        '      <X-PRE-PROCESS cmd="include" data="default/*.xml"/>\n'
        "  pin the format in vars.xml:\n"
        '      <x-pre-process CMD="set" DATA="cc360_record_ext=wav"/>\n'
        "  mentioned as X-PRE-PROCESS, the line vanishes\n"
        "-->\n"
        "<include>\n"
        '<!--#set "old_style=1"-->\n'
        '<include><X-PRE-PROCESS cmd="set" data="never=1"/>\n'
        '  <X-PRE-PROCESS cmd="set" data="a=1"/>\n'
        '  <X-PRE-PROCESS cmd="set" data="b=1"/><extension name="lost"/>\n'
        '  <X-PRE-PROCESS cmd="sett" data="c=1"/>\n'
        "</include>\n"
    )
    kinds = [(line.number, line.kind, line.in_comment) for line in preprocessor_lines(text)]
    assert kinds == [(3, "directive", True), (5, "directive", True), (6, "dropped", False),
                     (9, "hash", True), (10, "ignored", False), (11, "directive", False),
                     (12, "directive", False), (13, "directive", False)]
    assert preprocessor_directives(text) == [
        ("include", "default/*.xml"), ("set", "cc360_record_ext=wav"), ("set", "old_style=1"),
        ("set", "a=1"), ("set", "b=1"), ("sett", "c=1")]
    problems = preprocessor_problems(text)
    assert [p.split(":", 1)[0] for p in problems] == [
        "line 3", "line 5", "line 6", "line 9", "line 10", "line 12", "line 13"]
    assert preprocessor_problems('<X-PRE-PROCESS cmd="include" data="default/x.xml"/>') == []


@pytest.mark.parametrize("path", sorted((CONF / "autoload_configs").glob("*.xml")),
                         ids=lambda p: p.name)
def test_autoload_config_names_itself_after_its_file(path: pathlib.Path) -> None:
    # FreeSWITCH finds a module's configuration by <configuration name="x.conf">,
    # conventionally in autoload_configs/x.conf.xml.
    root = parse_xml(path)
    assert root.tag == "configuration"
    assert root.get("name") == path.name.removesuffix(".xml")
    assert len(root) >= 1


@pytest.mark.parametrize("context", CONTEXT_DIRS)
def test_context_snippets_hold_extensions_that_let_routing_continue(context: str) -> None:
    files = sorted((CONF / "dialplan" / context).glob("*.xml"))
    assert files
    for path in files:
        root = parse_xml(path)
        assert root.tag == "include", path
        extensions = list(root)
        assert extensions and all(e.tag == "extension" for e in extensions), path
        for extension in extensions:
            assert extension.get("name", "").startswith("cc360_"), path
            # continue="true": the admin's own routing must still run after ours.
            assert extension.get("continue") == "true", (path, extension.get("name"))
            assert extension.findall("condition"), (path, extension.get("name"))


def test_context_files_define_contexts() -> None:
    for path in sorted((CONF / "dialplan").glob("*.xml")):
        root = parse_xml(path)
        assert root.tag == "include"
        contexts = root.findall("context")
        assert contexts and len(contexts) == len(root), path
        for context in contexts:
            assert context.get("name", "").startswith("cc360_")
            assert context.findall("extension")


def test_click_to_call_context_refuses_legs_that_are_not_click_to_call() -> None:
    root = parse_xml(CONF / "dialplan" / "cc360_click_to_call.xml")
    guard = root.find("context/extension/condition")
    assert guard is not None and guard.get("field") == "${cc360_direction}"
    assert "cc360_direction" in originate_variables()
    refusal = [a.get("application") for a in guard if a.tag == "anti-action"]
    assert "hangup" in refusal


# -- event socket, ACL, CDR --------------------------------------------------------------------


def _params(path: pathlib.Path) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in parse_xml(path).iter("param")}


def test_event_socket_is_local_with_its_own_password_and_an_acl() -> None:
    params = _params(CONF / "autoload_configs" / "event_socket.conf.xml")
    assert params["listen-ip"] == "127.0.0.1"
    assert params["listen-port"] == "8021"
    assert params["password"] and params["password"].lower() != "cluecon"
    acl = params["apply-inbound-acl"]
    lists = {lst.get("name"): lst for lst in
             parse_xml(CONF / "autoload_configs" / "acl.conf.xml").iter("list")}
    assert acl in lists, "apply-inbound-acl must name a list acl.conf.xml defines"
    assert lists[acl].get("default") == "deny"
    allowed = {node.get("cidr") for node in lists[acl].iter("node") if node.get("type") == "allow"}
    assert "127.0.0.1/32" in allowed


def test_example_ini_points_at_the_same_event_socket() -> None:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(SCRIPTS / "fs-cc360.ini")
    params = _params(CONF / "autoload_configs" / "event_socket.conf.xml")
    assert ini["freeswitch"]["host"] == params["listen-ip"]
    assert ini["freeswitch"]["port"] == params["listen-port"]


def test_json_cdr_writes_every_leg_as_the_backfill_reads_them() -> None:
    params = _params(CONF / "autoload_configs" / "json_cdr.conf.xml")
    assert params["log-dir"].endswith("/json_cdr")
    assert params["log-b-leg"] == "true"  # the agents' legs are B-legs
    assert params["prefix-a-leg"] == "false"
    assert params["rotate"] == "false"
    assert "url" not in params and "queue-capacity" not in params
    # The captured CDR files were written that way: <uuid>.cdr.json, URL-encoded values.
    files = sorted((CAPTURES / "json_cdr").rglob("*"))
    cdrs = [p for p in files if p.is_file()]
    assert cdrs and all(re.fullmatch(r"[0-9a-f-]{36}\.cdr\.json", p.name) for p in cdrs)
    assert params["encode-values"] == "true"
    assert any("%20" in p.read_text() for p in cdrs)


def test_switch_conf_note_does_not_turn_on_verbose_events() -> None:
    (snippet,) = SNIPPETS
    root = parse_xml(snippet)
    assert root.get("name") == "switch.conf"
    assert not list(root.iter("param")), "a note: it must not set anything"


# -- the recording dialplan -----------------------------------------------------------------


def _extension(context: str, name: str) -> ET.Element:
    root = parse_xml(CONF / "dialplan" / context / "00_cc360_record.xml")
    found = [e for e in root.iter("extension") if e.get("name") == name]
    assert len(found) == 1, (context, name)
    return found[0]


@pytest.mark.parametrize("context", CONTEXT_DIRS)
def test_recording_once_per_channel_into_recordings_dir(context: str) -> None:
    record = _extension(context, "cc360_record")
    conditions = record.findall("condition")
    assert conditions[0].get("field") == "${cc360_recording}"
    assert conditions[0].get("expression") == "^$"
    steps = [(a.get("application"), a.get("data", ""), a.get("inline")) for a in actions(record)]
    assert ("set", "RECORD_STEREO=true", None) in steps
    set_path = [s for s in steps if s[1].startswith("cc360_recording=")]
    assert len(set_path) == 1
    path = set_path[0][1].split("=", 1)[1]
    assert path.startswith("$${recordings_dir}/")
    assert "${uuid}" in path and path.endswith(".${cc360_record_ext}")
    # Inline: set while FreeSWITCH hunts, so the guard above sees it at once.
    assert set_path[0][2] == "true"
    assert steps[-1] == ("record_session", "${cc360_recording}", None)
    # The format is chosen inline too: the inline path above expands it while hunting.
    chooser = _extension(context, "cc360_record_format")
    formats = {a.get("data") for a in actions(chooser) if a.get("inline") == "true"}
    assert formats == {"cc360_record_ext=mp3", "cc360_record_ext=wav"}
    assert "${module_exists(mod_shout)}" in {c.get("field") for c in chooser.iter("condition")}
    names = [e.get("name") for e in parse_xml(
        CONF / "dialplan" / context / "00_cc360_record.xml").iter("extension")]
    assert names.index("cc360_record_format") < names.index("cc360_record")


def test_public_and_default_record_the_same_way() -> None:
    for name in ("cc360_record", "cc360_record_format", "cc360_ringback"):
        public, default = _extension("public", name), _extension("default", name)
        assert _canonical(public) == _canonical(default), name


def _canonical(element: ET.Element) -> str:
    element = copy.deepcopy(element)
    element.tail = None
    return ET.canonicalize(ET.tostring(element, encoding="unicode"), strip_text=True)


@pytest.mark.parametrize("context", CONTEXT_DIRS)
def test_a_second_copy_of_a_context_file_changes_nothing(context: str) -> None:
    # The README has the admin include the file by name near the top of the context, and
    # the stock "<context>/*.xml" include further down reads it again: that copy must be
    # harmless. Each extension either first checks a variable it sets inline (the first
    # copy set it while FreeSWITCH hunted, so the copy's condition fails), or only sets
    # fixed values (the copy sets the same ones again).
    for extension in parse_xml(CONF / "dialplan" / context / "00_cc360_record.xml"):
        name = extension.get("name")
        first = extension.findall("condition")[0]
        guard = re.fullmatch(r"\$\{(\w+)\}", first.get("field", ""))
        inline = {a.get("data", "").split("=", 1)[0] for a in actions(extension)
                  if a.get("application") == "set" and a.get("inline") == "true"}
        if guard and first.get("expression") == "^$" and guard.group(1) in inline:
            continue
        steps = [(a.get("application"), a.get("data", "")) for a in actions(extension)]
        assert all(app == "set" and "$" not in data for app, data in steps), (context, name)


def test_carrier_leg_tag_is_set_never_exported() -> None:
    # An exported variable is copied to the legs the channel calls: cc360_trunk exported
    # from the caller's leg would turn the agents' phones into "carrier" legs.
    trunk = _extension("public", "cc360_trunk")
    assert [(a.tag, a.get("application"), a.get("data")) for a in actions(trunk)] == [
        ("anti-action", "set", "cc360_trunk=true")]
    for path in XML_FILES:
        for action in actions(parse_xml(path)):
            if action.get("application") == "export":
                assert "cc360_" not in action.get("data", ""), path


# -- channel variables: every one the code reads has a source ---------------------------------


def test_every_channel_variable_read_has_a_source() -> None:
    reads = variable_reads()
    assert any(r.name == "dialed_user" for r in reads), "the scan found no tracker reads"
    from_freeswitch = set(FREESWITCH_VARIABLES) | set(FREESWITCH_VARIABLES_NOT_CAPTURED)
    from_conf = conf_variables()
    from_originate = originate_variables()
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(SCRIPTS / "fs-cc360.ini")
    ini_keys = {key for section in ini.sections() for key in ini[section]}

    unresolved = [r.where for r in reads if r.name is None and r.configured is None]
    assert not unresolved, (
        f"channel variables read with a name the test cannot work out: {unresolved}; use a "
        "literal, a module constant, or a configuration key (self.config.<key>)")
    unknown_keys = sorted({r.configured for r in reads if r.configured} - ini_keys)
    assert not unknown_keys, f"variable names taken from undocumented settings: {unknown_keys}"
    missing = sorted(
        {f"{r.name} ({r.where})" for r in reads
         if r.name and r.name not in from_freeswitch | from_conf | from_originate})
    assert not missing, (
        "channel variables fs-cc360 reads that nothing sets: " + ", ".join(missing)
        + ". Set them in freeswitch_conf/ (and document them in its README), or add them to"
        " FREESWITCH_VARIABLES with the capture that shows FreeSWITCH setting them.")


def test_cc360_variables_the_conf_sets_for_the_connector_are_read() -> None:
    # The converse: a cc360_* variable the files set (or tell the admin to set) for fs-cc360
    # must be one it reads, or the documentation promises an effect that does not happen.
    read = {r.name for r in variable_reads() if r.name}
    offered = {n for n in conf_variables() if n.startswith("cc360_")} - DIALPLAN_OWN_VARIABLES
    assert offered, "the conf sets no cc360_* variable for the connector"
    assert sorted(offered - read) == []


def test_variable_scan_resolves_loops_constants_and_config() -> None:
    source = (
        "NAMES = ('a_const', 'b_const')\n"
        "VARIABLES_USED = frozenset({'listed'})\n"
        "def f(event, self):\n"
        "    event.var('literal')\n"
        "    for key in ('loop_1', 'loop_2'):\n"
        "        event.var(key)\n"
        "    for key2 in NAMES:\n"
        "        event.var(key2)\n"
        "    name = self.config.recording_variable\n"
        "    event.var(name)\n"
        "    event.get('variable_header')\n"
        "    event.var(make_name())\n"
    )
    reads = _reads_in_source(source, "probe.py")
    assert {r.name for r in reads if r.name} == {
        "a_const", "b_const", "listed", "literal", "loop_1", "loop_2", "header"}
    assert {r.configured for r in reads if r.configured} == {"recording_variable"}
    unresolved = [r.where for r in reads if r.name is None and r.configured is None]
    assert unresolved == ["probe.py:12"]


def test_documented_freeswitch_variables_appear_in_their_capture() -> None:
    seen: dict[str, dict[str, set[str]]] = {}
    for scenario in {capture for capture, _ in FREESWITCH_VARIABLES.values()}:
        by_event: dict[str, set[str]] = {}
        for body in capture_frames(scenario):
            event = parse_event(body)
            names = {k.removeprefix("variable_") for k in event.headers()
                     if k.startswith("variable_")}
            by_event.setdefault(event.name, set()).update(names)
        seen[scenario] = by_event
    wrong = [name for name, (scenario, event) in FREESWITCH_VARIABLES.items()
             if name not in seen[scenario].get(event, set())]
    assert not wrong, f"not in the capture and event named for them: {wrong}"
    assert not set(FREESWITCH_VARIABLES) & set(FREESWITCH_VARIABLES_NOT_CAPTURED)


# -- verbose-channel-events is not needed ----------------------------------------------------


def documented_subscriptions(text: str) -> list[list[str]]:
    """The event lists a doc gives after SUBSCRIPTION_PHRASE: the run of upper-case names
    that follows, across line breaks, comment indentation and Markdown fences or backticks."""
    lists: list[list[str]] = []
    for match in re.finditer(re.escape(SUBSCRIPTION_PHRASE), text):
        names: list[str] = []
        for token in text[match.end():].split():
            name = token.strip("`")
            if not name:  # a fence: the one that opens the list, or the one that closes it
                if names:
                    break
                continue
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                break
            names.append(name)
            if token.endswith("`") and not token.endswith("```"):
                break  # the end of an inline code span
        lists.append(names)
    return lists


@pytest.mark.parametrize("path", EVENT_LIST_DOCS, ids=lambda p: p.name)
def test_documented_event_list_is_what_the_service_subscribes_to(path: pathlib.Path) -> None:
    # Compared with the constant at run time: when the tracker reads a new event, this
    # fails until the docs are regenerated.
    lists = documented_subscriptions(path.read_text())
    assert lists and all(lists), f"{path.name}: no list after {SUBSCRIPTION_PHRASE!r}"
    expected = list(SUBSCRIBED_EVENTS)
    for names in lists:
        assert names == expected, (
            f"{path.relative_to(ROOT)} lists {' '.join(names)}; `fs-cc360 run` subscribes to "
            f"{' '.join(expected)}. Paste the output of {PRINT_SUBSCRIPTION} there.")


def test_documented_event_lists_are_found_as_written() -> None:
    text = (
        "x subscribes to these events:\n```\nCHANNEL_A CHANNEL_B\nBACKGROUND_JOB\n```\nCHANNEL_X\n"
        "y subscribes to these events: `CHANNEL_A\nCHANNEL_B` and CHANNEL_X\n"
        "<!-- z subscribes to these events:\n      CHANNEL_A\n      and not CHANNEL_X -->\n")
    assert documented_subscriptions(text) == [
        ["CHANNEL_A", "CHANNEL_B", "BACKGROUND_JOB"], ["CHANNEL_A", "CHANNEL_B"], ["CHANNEL_A"]]


def test_subscribed_channel_events_carry_variables_without_verbose_events() -> None:
    # The captures were made with verbose-channel-events off (the stock setting).
    counts: dict[str, list[int]] = {}
    for scenario in SCENARIOS:
        for body in capture_frames(scenario):
            event = parse_event(body)
            variables = sum(1 for k in event.headers() if k.startswith("variable_"))
            counts.setdefault(event.name, []).append(variables)
    subscribed = set(SUBSCRIBED_EVENTS)
    channel_events = {e for e in subscribed if e.startswith(("CHANNEL_", "RECORD_"))}
    assert channel_events == subscribed - {"BACKGROUND_JOB"}, "a subscribed event of a new kind"
    for name in sorted(channel_events):
        assert counts.get(name), f"{name}: no such event in the captures"
        assert min(counts[name]) > 0, f"{name} arrived without variables"
    for name in WITHOUT_VARIABLES:
        assert counts.get(name) and max(counts[name]) == 0, name
        assert name not in subscribed


# -- systemd units -------------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "true",
    "ProtectSystem": "strict",
    "ProtectHome": "true",
    "PrivateTmp": "true",
}


def test_service_unit() -> None:
    parsed = unit(SCRIPTS / "fs-cc360.service")
    service = parsed["Service"]
    assert service["User"] == service["Group"] == "fs-cc360"
    assert service["SupplementaryGroups"] == "freeswitch"
    assert service["ExecStart"] == (
        "/opt/fs-cc360/venv/bin/fs-cc360 --config /etc/fs-cc360/fs-cc360.ini run")
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "fs-cc360"
    assert service["WorkingDirectory"] == "/var/lib/fs-cc360"
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"] == "30"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/fs-cc360/fs-cc360.env"
    assert "/var/lib/freeswitch/recordings" in service["ReadOnlyPaths"]
    for key, value in HARDENING.items():
        assert service[key] == value, key
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


def test_service_reads_the_recordings_the_connector_serves() -> None:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(SCRIPTS / "fs-cc360.ini")
    recordings = ini["webapi"]["recordings_dir"]
    assert recordings in unit(SCRIPTS / "fs-cc360.service")["Service"]["ReadOnlyPaths"]


def test_replay_service_and_timer() -> None:
    service = unit(SCRIPTS / "fs-cc360-replay.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["User"] == "fs-cc360"
    assert service["ExecStart"].startswith("/opt/fs-cc360/scripts/replay ")
    assert "--config /etc/fs-cc360/fs-cc360.ini" in service["ExecStart"]
    assert service["WorkingDirectory"] == "/var/lib/fs-cc360"
    for key, value in HARDENING.items():
        assert service[key] == value, key
    timer = unit(SCRIPTS / "fs-cc360-replay.timer")
    assert timer["Timer"]["OnCalendar"]
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


@pytest.mark.parametrize("name", ["fs-cc360.service", "fs-cc360-replay.service",
                                  "fs-cc360-replay.timer"])
def test_unit_values_have_no_trailing_comments(name: str) -> None:
    # systemd has no end-of-line comments: "Restart=on-failure  # why" is a bad value.
    for number, line in enumerate((SCRIPTS / name).read_text().splitlines(), 1):
        if line and not line.startswith(("#", ";", "[")):
            assert "#" not in line.split("=", 1)[1], f"{name}:{number}: {line}"


# -- nginx ---------------------------------------------------------------------------------------


def test_nginx_site() -> None:
    text = (SCRIPTS / "nginx-fs-cc360.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert code.count("{") == code.count("}")
    assert re.search(r"listen 443 ssl;", code)
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(SCRIPTS / "fs-cc360.ini")
    assert re.search(rf"server {re.escape(ini['webapi']['listen'])};", code)
    assert "location ^~ /webapi/" in code
    assert "location = /healthz" in code and "deny all;" in code
    recording = _block(code, "location ~ ^/[^/]+/recording/")
    assert "proxy_buffering off;" in recording and "$http_range" in recording
    # The access log never holds a token: no $request / $request_uri / $uri in the format.
    log_format = code[code.index("log_format fs_cc360"):]
    log_format = log_format[:log_format.index(";")]
    assert not re.search(r"\$(request|request_uri|uri)\b", log_format)
    assert "$fs_cc360_uri" in log_format


def _block(code: str, opening: str) -> str:
    """The text of the ``{...}`` block that follows ``opening``, nested blocks included."""
    start = code.index(opening)
    depth = 0
    for index in range(code.index("{", start), len(code)):
        depth += {"{": 1, "}": -1}.get(code[index], 0)
        if depth == 0:
            return code[start:index + 1]
    raise AssertionError(f"unclosed block: {opening}")


def test_nginx_log_map_masks_tokens() -> None:
    text = (SCRIPTS / "nginx-fs-cc360.conf").read_text()
    block = text[text.index("map $request_uri $fs_cc360_uri"):]
    block = block[:block.index("}")]
    rules = re.findall(r'"~(.+?)"\s+"(.+?)";', block)
    assert len(rules) == 2

    def masked(uri: str) -> str:
        for pattern, value in rules:
            found = re.match(pattern.replace("(?<", "(?P<"), uri)
            if found:
                for name, text in found.groupdict().items():
                    value = value.replace("$" + name, text)
                return value
        return uri

    assert masked("/webapi/s3cr3t/makecall?first=101&second=79991234567") == (
        "/webapi/***/makecall?first=101&second=79991234567")
    assert masked("/5f0e1d2c3b4a/recording/2026-11-27/abc.mp3") == (
        "/***/recording/2026-11-27/abc.mp3")
    assert masked("/healthz") == "/healthz"
