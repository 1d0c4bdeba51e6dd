"""Configuration: layering, typo protection, every validation rule, masking, example parity."""

from __future__ import annotations

import configparser
import dataclasses
import os
import pathlib
import re
import stat
import textwrap

import pytest

from fs_cc360.config import (
    DEFAULT_ORIGINATE,
    MASK,
    CrmSettings,
    Settings,
    SourceKind,
    WebapiSettings,
    defaults_table,
    load_settings,
    parse_listen,
    secret_keys,
    validate,
)
from fs_cc360.errors import ConfigError
from fs_cc360.numbers import NumberRules

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "fs-cc360.ini"

#: A complete, valid configuration for strict (require_crm=True) loading.
VALID = """\
[crm]
url = https://crm.example.com
login = robot
password = s3cret
token = 0f6e4c1a-who-calls
[webapi]
token = makecall-token-0123456789
"""


def write(tmp_path: pathlib.Path, text: str, extra: str = "") -> pathlib.Path:
    """Write ``text`` (and the dedented ``extra``) as the config file."""
    path = tmp_path / "fs-cc360.ini"
    path.write_text(textwrap.dedent(text) + textwrap.dedent(extra), encoding="utf-8")
    return path


def config_error(*args: object, **kwargs: object) -> ConfigError:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


# --------------------------------------------------------------------------- layering


def test_defaults_load_with_types() -> None:
    settings = load_settings(env={}, require_crm=False)
    assert settings.freeswitch.host == "127.0.0.1"
    assert settings.freeswitch.port == 8021
    assert settings.freeswitch.password == "ClueCon"
    assert settings.freeswitch.connect_timeout == 5.0
    assert settings.crm.auth == "forms"
    assert settings.crm.verify_tls is True
    assert settings.crm.ca_bundle is None
    assert settings.outbox.synchronous == "FULL"
    assert settings.delivery.concurrency == 8
    assert settings.calls.extension_pattern.pattern == r"^\d{2,7}$"
    assert settings.calls.summary_wait == 10.0
    assert settings.webapi.originate == DEFAULT_ORIGINATE
    assert DEFAULT_ORIGINATE == "{vars}user/{agent} {client} XML default"
    assert settings.webapi.recordings_dir == pathlib.Path("/var/lib/freeswitch/recordings")
    assert settings.webapi.cors_origins == ()
    assert settings.webapi.address == ("127.0.0.1", 8080)
    assert settings.logging.level == "INFO"
    assert dict(settings.extensions) == {}
    assert settings.source_of("crm.url").kind is SourceKind.DEFAULT
    assert settings == Settings()  # the dataclass defaults are the defaults table


def test_ini_overrides_defaults(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, VALID, """\
        [freeswitch]
        host = pbx.internal
        port = 8022
        [delivery]
        concurrency = 3
        [calls]
        outgoing_realtime = yes
        """)
    settings = load_settings(path, env={})
    assert settings.freeswitch.host == "pbx.internal"
    assert settings.freeswitch.port == 8022
    assert settings.delivery.concurrency == 3
    assert settings.calls.outgoing_realtime is True
    assert settings.crm.url == "https://crm.example.com"
    source = settings.source_of("freeswitch.port")
    assert source.kind is SourceKind.FILE and source.where == str(path)
    assert settings.source_of("freeswitch.password").kind is SourceKind.DEFAULT


def test_env_overrides_ini(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, VALID + "[freeswitch]\nport = 8022\n")
    env = {"FS_CC360_FREESWITCH_PORT": "9000", "FS_CC360_CRM_TIMEOUT": "2.5",
           "PATH": "/usr/bin", "FS_CC360_CONFIG": "/etc/elsewhere.ini"}
    settings = load_settings(path, env=env)
    assert settings.freeswitch.port == 9000
    assert settings.crm.timeout == 2.5
    assert str(settings.source_of("freeswitch.port")) == "env FS_CC360_FREESWITCH_PORT"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FS_CC360_LOGGING_LEVEL", "debug")
    assert load_settings(require_crm=False).logging.level == "DEBUG"


def test_overrides_win_over_env_and_file(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, VALID + "[freeswitch]\nport = 8022\n")
    settings = load_settings(
        path,
        env={"FS_CC360_FREESWITCH_PORT": "9000"},
        overrides={"freeswitch": {"port": "9001", "host": None}, "logging": {"level": "ERROR"}},
    )
    assert settings.freeswitch.port == 9001
    assert settings.freeswitch.host == "127.0.0.1"  # None = flag not given
    assert settings.logging.level == "ERROR"
    assert settings.source_of("freeswitch.port").kind is SourceKind.OVERRIDE
    assert settings.dump_sources()["freeswitch"]["port"] == "command line"
    assert settings.dump_sources()["crm"]["url"] == str(path)


def test_values_are_normalised(tmp_path: pathlib.Path) -> None:
    settings = load_settings(env={}, require_crm=False, overrides={
        "crm": {"url": "https://crm.example.com/prefix/", "auth": "Anonymous"},
        "outbox": {"synchronous": "normal"},
        "calls": {"default_region": "de"},
        "webapi": {"cors_origins": "https://a.example.com/, http://b.example.com:8080"},
    })
    assert settings.crm.url == "https://crm.example.com/prefix"
    assert settings.crm.auth == "anonymous"
    assert settings.outbox.synchronous == "NORMAL"
    assert settings.calls.default_region == "DE"
    assert settings.webapi.cors_origins == ("https://a.example.com", "http://b.example.com:8080")


# --------------------------------------------------------------------------- typo protection


def test_unknown_key_in_file_names_it(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, VALID + "[freeswitch]\nhots = x\n")
    error = config_error(path)
    assert error.key == "freeswitch.hots"
    assert error.source == str(path)
    assert "[freeswitch] hots" in str(error) and "did you mean host?" in str(error)


def test_unknown_section_in_file_names_it(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, VALID + "[freeswich]\nhost = x\n")
    error = config_error(path)
    assert "[freeswich]" in str(error) and "did you mean [freeswitch]?" in str(error)
    assert str(path) in str(error)


def test_default_section_is_not_magic(tmp_path: pathlib.Path) -> None:
    error = config_error(write(tmp_path, "[DEFAULT]\nhost = x\n"), require_crm=False)
    assert "[DEFAULT]" in str(error) and "unknown section" in str(error)


@pytest.mark.parametrize("variable, key", [
    ("FS_CC360_CRM_URLL", "crm.urll"),
    ("FS_CC360_WEBAPI_TOKENS", "webapi.tokens"),
])
def test_unknown_env_key_names_variable(variable: str, key: str) -> None:
    error = config_error(env={variable: "x"}, require_crm=False)
    assert error.key == key
    assert error.source == f"env {variable}"
    assert variable in str(error)


def test_unknown_env_section_names_variable() -> None:
    error = config_error(env={"FS_CC360_FOO_BAR": "1"}, require_crm=False)
    assert "FS_CC360_FOO_BAR" in str(error) and "unknown section" in str(error)


def test_env_extension_without_user() -> None:
    error = config_error(env={"FS_CC360_EXTENSIONS_": "101"}, require_crm=False)
    assert "FS_CC360_EXTENSIONS_" in str(error) and "names no SIP user" in str(error)


def test_unknown_override_names_it() -> None:
    error = config_error(overrides={"crm": {"tokn": "x"}}, require_crm=False)
    assert error.key == "crm.tokn" and "command line" in str(error)
    error = config_error(overrides={"nope": {"x": "1"}}, require_crm=False)
    assert "[nope]" in str(error)


def test_key_names_are_case_insensitive(tmp_path: pathlib.Path) -> None:
    settings = load_settings(write(tmp_path, "[FreeSWITCH]\nHost = pbx\n"), env={},
                             require_crm=False)
    assert settings.freeswitch.host == "pbx"


def test_missing_file_is_an_error(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.ini"
    error = config_error(missing, require_crm=False)
    assert str(missing) in str(error) and "not found" in str(error)
    assert error.source == str(missing)


@pytest.mark.parametrize("text, fragment", [
    ("host = x\n", "no section headers"),
    ("[freeswitch]\nhost = a\nhost = b\n", "already exists"),
    ("[freeswitch]\nhost = a\n[freeswitch]\nport = 1\n", "already exists"),
    ("[freeswitch]\nhost = a\nHOST = b\n", "given more than once"),
])
def test_malformed_file(tmp_path: pathlib.Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    error = config_error(path, require_crm=False)
    assert fragment in str(error) and str(path) in str(error)


def test_undecodable_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.ini"
    path.write_bytes(b"[freeswitch]\nhost = \xff\xfe\n")
    assert "UTF-8" in str(config_error(path, require_crm=False))


def test_percent_and_semicolon_are_literal(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[crm]\npassword = 50%off;#x\n")
    assert load_settings(path, env={}, require_crm=False).crm.password == "50%off;#x"


# --------------------------------------------------------------------------- validation rules

#: (section, key, bad value, fragment of the expectation). Every per-key rule fails once.
BAD_VALUES = [
    ("freeswitch", "host", "two words", "host name"),
    ("freeswitch", "port", "0", "from 1 to 65535"),
    ("freeswitch", "port", "65536", "from 1 to 65535"),
    ("freeswitch", "port", "80a", "whole number"),
    ("freeswitch", "password", "", "non-empty"),
    ("freeswitch", "connect_timeout", "0", "> 0"),
    ("freeswitch", "connect_timeout", "-1", "> 0"),
    ("freeswitch", "connect_timeout", "nan", "> 0"),
    ("freeswitch", "reconnect_max", "soon", "> 0"),
    ("crm", "url", "ftp://x", "expected an http:// or https:// URL"),
    ("crm", "url", "crm.example.com", "http:// or https://"),
    ("crm", "url", "https://crm.example.com/?a=1", "without ?query"),
    ("crm", "url", "https://u:p@crm.example.com", "without user:password@"),
    ("crm", "url", "https://crm.example.com:99999", "valid port"),
    ("crm", "auth", "oauth", "forms|anonymous"),
    ("crm", "token", "a/b", "OmniWhoCallsToken"),
    ("crm", "timeout", "0", "> 0"),
    ("crm", "verify_tls", "maybe", "true or false"),
    ("outbox", "database", "", "file path"),
    ("outbox", "database", "mysql://db/x", "sqlite"),
    ("outbox", "database", "postgresql://fs@db:port/cc360", "port is not a number"),
    ("outbox", "database", "postgresql://fs@db:5432/", "database name is missing"),
    ("outbox", "node", "fs 1", "short name"),
    ("outbox", "journal", "", "file path"),
    ("outbox", "synchronous", "FAST", "OFF|NORMAL|FULL|EXTRA"),
    ("outbox", "retention_days", "0", "days > 0"),
    ("delivery", "concurrency", "0", "from 1 to 256"),
    ("delivery", "concurrency", "257", "from 1 to 256"),
    ("delivery", "realtime_ttl", "-5", "> 0"),
    ("delivery", "backoff_initial", "0", "> 0"),
    ("delivery", "backoff_max", "inf", "> 0"),
    ("delivery", "max_rejections", "0", "from 1"),
    ("delivery", "lease_seconds", "0", "> 0"),
    ("calls", "extension_pattern", "^(\\d+$", "valid regular expression"),
    ("calls", "missed_calls", "some", "first|all|none"),
    ("calls", "outgoing_realtime", "2", "true or false"),
    ("calls", "internal_calls", "drop", "skip|report"),
    ("calls", "number_format", "e.164", "digits|e164|raw"),
    ("calls", "default_region", "XX", "ISO country"),
    ("calls", "national_prefix", "8-7", "digits:digits"),
    ("calls", "recording_variable", "variable name", "channel variable"),
    ("calls", "summary_wait", "-1", ">= 0"),
    ("calls", "domains", "tenant one.example.com", "directory domains"),
    ("calls", "domains", "bad_domain!", "directory domains"),
    ("backfill", "margin", "-5", ">= 0"),
    ("webapi", "enabled", "sure", "true or false"),
    ("webapi", "listen", "8080", "host:port"),
    ("webapi", "listen", "::1:8080", "IPv6 addresses go in []"),
    ("webapi", "listen", "0.0.0.0:70000", "port 0..65535"),
    ("webapi", "token", "has space", "part of a URL path"),
    ("webapi", "token", "a/b", "part of a URL path"),
    ("webapi", "public_url", "pbx.example.com", "http:// or https://"),
    ("webapi", "recordings_dir", "", "expected a path"),
    ("webapi", "recording_auth", "none", "signed|shared"),
    ("webapi", "originate", "user/{agent} {client}", "missing {vars}"),
    ("webapi", "originate", "{vars}user/{agent} {client} {who}", "unknown placeholder {who}"),
    ("webapi", "originate", "{vars}user/{agent!r} {client}", "unknown placeholder"),
    ("webapi", "originate", "{vars}user/{agent} {client} }", "literal braces"),
    ("webapi", "cors_origins", "crm.example.com", "origins"),
    ("webapi", "cors_origins", "https://crm.example.com/page", "origins"),
    ("webapi", "convert_to_mp3", "mp3", "true or false"),
    ("webapi", "metrics_token", "a?b", "part of a URL path"),
    ("webapi", "admin_token", "too-short", "at least 16 characters"),
    ("webapi", "max_connections", "0", "whole number"),
    ("webapi", "makecall_per_agent_seconds", "x", ">= 0"),
    ("logging", "level", "TRACE", "DEBUG|INFO|WARNING|ERROR"),
    ("logging", "format", "xml", "text|json"),
]


@pytest.mark.parametrize("section, key, value, fragment", BAD_VALUES,
                         ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD_VALUES])
def test_bad_value_names_key_source_and_expectation(
    tmp_path: pathlib.Path, section: str, key: str, value: str, fragment: str
) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    error = config_error(path, require_crm=False)
    message = str(error)
    assert error.key == f"{section}.{key}"
    assert error.source == str(path)
    assert message.startswith(f"[{section}] {key} = ")
    assert f"(from {path})" in message
    assert fragment in message
    if f"{section}.{key}" not in secret_keys():
        assert repr(value) in message


def test_every_key_has_a_failing_case() -> None:
    checked = {f"{s}.{k}" for s, k, _, _ in BAD_VALUES}
    # Free text: anything goes (login, passwords, secrets; optional paths checked jointly).
    free = {"crm.login", "crm.password", "crm.ca_bundle", "webapi.recording_secret",
            "webapi.tls_cert", "webapi.tls_key", "backfill.cdr_dir", "outbox.password"}
    every = {f"{s}.{k}" for s, keys in defaults_table().items() for k in keys}
    assert every - free == checked


def test_error_message_format_from_the_brief(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[crm]\nurl = ftp://x\n")
    assert str(config_error(path, require_crm=False)).startswith(
        f"[crm] url = 'ftp://x' (from {path}): expected an http:// or https:// URL")


def test_env_value_error_names_variable() -> None:
    error = config_error(env={"FS_CC360_DELIVERY_CONCURRENCY": "many"}, require_crm=False)
    assert str(error).startswith("[delivery] concurrency = 'many' (from env "
                                 "FS_CC360_DELIVERY_CONCURRENCY): expected a whole number")
    assert error.source == "env FS_CC360_DELIVERY_CONCURRENCY"


def test_indented_line_continues_the_value(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[freeswitch]\nhost = pbx\n  port = 1\n")
    error = config_error(path, require_crm=False)
    assert error.key == "freeswitch.host" and "indented lines continue" in str(error)


def test_control_characters_are_refused() -> None:
    error = config_error(env={"FS_CC360_WEBAPI_ORIGINATE": DEFAULT_ORIGINATE + "\nbgapi x"},
                         require_crm=False)
    assert error.key == "webapi.originate" and "control characters" in str(error)


def test_secret_values_are_masked_in_errors() -> None:
    error = config_error(env={"FS_CC360_CRM_TOKEN": "top secret/value"}, require_crm=False)
    assert "[crm] token = *** " in str(error)
    assert "top secret" not in str(error)


def test_all_problems_are_reported_at_once(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[freeswitch]\nport = 0\n[delivery]\nconcurrency = 0\n")
    error = config_error(path, require_crm=False)
    assert "2 configuration problems" in str(error)
    assert "[freeswitch] port" in str(error) and "[delivery] concurrency" in str(error)
    assert error.key == "freeswitch.port"


@pytest.mark.parametrize("key, fragment", [
    ("crm.url", "required: the CC360 base URL"),
    ("crm.token", "required: the CRM system setting OmniWhoCallsToken"),
    ("crm.login", "required when auth = forms"),
    ("crm.password", "required when auth = forms"),
    ("webapi.token", "required when [webapi] enabled = true"),
])
def test_required_keys(tmp_path: pathlib.Path, key: str, fragment: str) -> None:
    section, name = key.split(".")
    error = config_error(write(tmp_path, VALID), overrides={section: {name: ""}})
    assert error.key == key
    assert f"[{section}] {name} = '' (from the command line): {fragment}" in str(error)


def test_require_crm_false_accepts_partial_config() -> None:
    settings = load_settings(env={}, require_crm=False)
    assert settings.crm.url == "" and settings.webapi.token == ""


def test_anonymous_needs_no_login(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """\
        [crm]
        url = https://crm.example.com
        auth = anonymous
        token = abc
        [webapi]
        enabled = false
        """)
    settings = load_settings(path, env={})
    assert settings.crm.auth == "anonymous" and settings.webapi.token == ""


def test_placeholder_secrets_refused_when_strict(tmp_path: pathlib.Path) -> None:
    overrides = {"webapi": {"metrics_token": "change-me"}}
    error = config_error(write(tmp_path, VALID), overrides=overrides)
    assert error.key == "webapi.metrics_token" and "placeholder 'change-me'" in str(error)


def test_backoff_max_below_initial(tmp_path: pathlib.Path) -> None:
    error = config_error(overrides={"delivery": {"backoff_initial": "10", "backoff_max": "5"}},
                         require_crm=False)
    assert error.key == "delivery.backoff_max"
    assert "expected >= [delivery] backoff_initial (10.0)" in str(error)


def test_lease_must_outlast_a_crm_request() -> None:
    error = config_error(overrides={"delivery": {"lease_seconds": "10"}}, require_crm=False)
    assert error.key == "delivery.lease_seconds" and "[crm] timeout (10.0)" in str(error)


def test_ca_bundle_must_exist(tmp_path: pathlib.Path) -> None:
    error = config_error(overrides={"crm": {"ca_bundle": str(tmp_path / "ca.pem")}},
                         require_crm=False)
    assert error.key == "crm.ca_bundle" and "existing CA bundle" in str(error)
    bundle = tmp_path / "ca.pem"
    bundle.write_text("pem")
    settings = load_settings(env={}, require_crm=False,
                             overrides={"crm": {"ca_bundle": str(bundle)}})
    assert settings.crm.ca_bundle == bundle
    assert settings.crm.requests_verify == str(bundle)
    error = config_error(overrides={"crm": {"ca_bundle": str(bundle), "verify_tls": "false"}},
                         require_crm=False)
    assert error.key == "crm.ca_bundle" and "verify_tls = false" in str(error)


def test_requests_verify_without_bundle() -> None:
    assert CrmSettings().requests_verify is True
    assert CrmSettings(verify_tls=False).requests_verify is False


def test_tls_cert_and_key_come_together(tmp_path: pathlib.Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    error = config_error(overrides={"webapi": {"tls_cert": str(cert)}}, require_crm=False)
    assert error.key == "webapi.tls_cert" and "give both or neither" in str(error)
    error = config_error(overrides={"webapi": {"tls_key": str(key)}}, require_crm=False)
    assert error.key == "webapi.tls_key" and "without [webapi] tls_cert" in str(error)
    error = config_error(overrides={"webapi": {"tls_cert": str(cert),
                                               "tls_key": str(tmp_path / "nope.pem")}},
                         require_crm=False)
    assert error.key == "webapi.tls_key" and "existing file" in str(error)
    settings = load_settings(env={}, require_crm=False,
                             overrides={"webapi": {"tls_cert": str(cert), "tls_key": str(key)}})
    assert (settings.webapi.tls_cert, settings.webapi.tls_key) == (cert, key)


def test_signed_links_need_a_key(tmp_path: pathlib.Path) -> None:
    overrides = {"webapi": {"enabled": "false", "token": "",
                            "public_url": "https://pbx.example.com"}}
    error = config_error(write(tmp_path, VALID), overrides=overrides)
    assert error.key == "webapi.recording_secret" and "sign recording links" in str(error)
    overrides["webapi"]["recording_auth"] = "shared"
    error = config_error(write(tmp_path, VALID), overrides=overrides)
    assert error.key == "webapi.token" and "recording_auth = shared" in str(error)


def test_convert_to_mp3_needs_an_encoder(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    error = config_error(overrides={"webapi": {"convert_to_mp3": "true"}}, require_crm=False)
    assert error.key == "webapi.convert_to_mp3" and "lame or ffmpeg" in str(error)
    lame = tmp_path / "lame"
    lame.write_text("#!/bin/sh\n")
    lame.chmod(lame.stat().st_mode | stat.S_IXUSR)
    settings = load_settings(env={}, require_crm=False,
                             overrides={"webapi": {"convert_to_mp3": "true"}})
    assert settings.webapi.convert_to_mp3 is True


def test_validate_checks_settings_built_in_code() -> None:
    settings = dataclasses.replace(
        Settings(), webapi=WebapiSettings(listen="nowhere", token="t" * 20))
    with pytest.raises(ConfigError) as info:
        validate(settings, require_crm=False)
    assert info.value.key == "webapi.listen" and "(default)" in str(info.value)
    validate(Settings(), require_crm=False)


def test_short_webapi_token_warns(caplog: pytest.LogCaptureFixture) -> None:
    load_settings(env={}, require_crm=False, overrides={"webapi": {"token": "short"}})
    assert "config.weak_secret key=webapi.token" in caplog.text
    assert "short" not in caplog.text.replace("config.weak_secret", "")


# --------------------------------------------------------------------------- dump


def test_dump_masks_every_secret() -> None:
    secrets = secret_keys()
    assert sorted(secrets) == sorted([
        "freeswitch.password", "crm.password", "crm.token", "outbox.password",
        "webapi.token", "webapi.recording_secret", "webapi.metrics_token",
        "webapi.admin_token"])
    overrides: dict[str, dict[str, str]] = {}
    for index, key in enumerate(secrets):
        section, name = key.split(".")
        overrides.setdefault(section, {})[name] = f"secretvalue{index}XYZ-long"
    settings = load_settings(env={}, require_crm=False, overrides=overrides)
    dump = settings.dump()
    for key in secrets:
        section, name = key.split(".")
        assert dump[section][name] == MASK
    assert "secretvalue" not in repr(dump)
    raw = settings.dump(masked=False)
    assert raw["crm"]["token"] == f"secretvalue{secrets.index('crm.token')}XYZ-long"


def test_dump_shows_unset_secrets_as_empty() -> None:
    dump = load_settings(env={}, require_crm=False).dump()
    assert dump["crm"]["token"] == "" and dump["webapi"]["metrics_token"] == ""
    assert dump["freeswitch"]["password"] == MASK  # the ClueCon default is set


def test_dump_round_trips_through_load(tmp_path: pathlib.Path) -> None:
    settings = load_settings(write(tmp_path, VALID + "[extensions]\nalice = 101\n"), env={})
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_dict(settings.dump(masked=False))
    again = tmp_path / "again.ini"
    with again.open("w", encoding="utf-8") as handle:
        parser.write(handle)
    assert load_settings(again, env={}) == settings


def test_dump_lists_the_defaults_table() -> None:
    dump = Settings().dump(masked=False)
    assert dump == defaults_table()
    assert list(dump) == ["freeswitch", "crm", "outbox", "delivery", "calls", "extensions",
                          "webapi", "backfill", "logging"]


# --------------------------------------------------------------------------- example file


def _example_sections() -> dict[str, list[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(EXAMPLE, encoding="utf-8")
    return {section: list(parser[section]) for section in parser.sections()}


def test_example_lists_exactly_the_defaults_table() -> None:
    table = defaults_table()
    example = _example_sections()
    assert list(example) == list(table)  # same sections, same order
    for section, keys in table.items():
        assert example[section] == list(keys), section  # same keys, same order


def test_example_loads_and_shows_the_defaults() -> None:
    settings = load_settings(EXAMPLE, env={}, require_crm=False)
    defaults = Settings()
    deliberate = set(secret_keys()) | {"crm.url"}
    for section, keys in defaults_table().items():
        for key in keys:
            if f"{section}.{key}" in deliberate:
                continue
            assert getattr(getattr(settings, section), key) == \
                getattr(getattr(defaults, section), key), f"{section}.{key}"


def test_example_secrets_are_placeholders() -> None:
    raw = load_settings(EXAMPLE, env={}, require_crm=False).dump(masked=False)
    for key in secret_keys():
        section, name = key.split(".")
        if key == "outbox.password":  # only for PostgreSQL; a placeholder would be refused
            assert raw[section][name] == "", key
            continue
        assert raw[section][name] == "change-me", key


def test_example_every_key_is_commented() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^[a-z_]+ =", line):
            previous = lines[number - 1]
            # a key follows its comment, or a sibling key sharing that comment
            assert previous.startswith("#") or re.match(r"^[a-z_]+ =", previous), line


def test_example_with_real_secrets_loads_strictly() -> None:
    env = {
        "FS_CC360_FREESWITCH_PASSWORD": "esl-secret",
        "FS_CC360_CRM_LOGIN": "robot",
        "FS_CC360_CRM_PASSWORD": "crm-secret",
        "FS_CC360_CRM_TOKEN": "who-calls",
        "FS_CC360_WEBAPI_TOKEN": "a-long-random-makecall-token",
        "FS_CC360_WEBAPI_RECORDING_SECRET": "",
        "FS_CC360_WEBAPI_METRICS_TOKEN": "",
        "FS_CC360_WEBAPI_ADMIN_TOKEN": "",
    }
    settings = load_settings(EXAMPLE, env=env)
    assert settings.crm.url == "https://crm.example.com"
    assert settings.source_of("crm.token").kind is SourceKind.ENV


# --------------------------------------------------------------------------- extensions


def test_extensions_map_and_extension_for(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """\
        [extensions]
        alice = 101
        Bob.Smith = 102
        """)
    settings = load_settings(path, env={"FS_CC360_EXTENSIONS_CAROL": "103"}, require_crm=False)
    assert dict(settings.extensions) == {"alice": "101", "Bob.Smith": "102", "carol": "103"}
    assert settings.source_of("extensions.carol").kind is SourceKind.ENV
    assert settings.extension_for("alice") == "101"
    assert settings.extension_for("Bob.Smith") == "102"
    assert settings.extension_for("bob.smith") is None  # SIP users are case sensitive
    assert settings.extension_for("carol") == "103"  # env names are lower-cased
    assert settings.extension_for("101") == "101"
    assert settings.extension_for("5") is None  # too short for ^\d{2,7}$
    assert settings.extension_for("dave") is None
    assert settings.extension_for("") is None
    assert settings.extension_for(None) is None
    assert settings.dump()["extensions"] == {"alice": "101", "Bob.Smith": "102", "carol": "103"}


def test_extension_for_wants_ascii_digits() -> None:
    settings = load_settings(env={}, require_crm=False,
                             overrides={"calls": {"extension_pattern": r".+"}})
    assert settings.extension_for("alice") is None
    assert settings.extension_for("\u0661\u0662\u0663") is None  # Arabic-Indic digits match \d
    assert settings.extension_for("123") == "123"


@pytest.mark.parametrize("line, fragment", [
    ("alice = al1", "digit extension"),
    ("alice = ", "digit extension"),
    ("alice = 1", "extension_pattern"),
])
def test_bad_extension_names_user(tmp_path: pathlib.Path, line: str, fragment: str) -> None:
    error = config_error(write(tmp_path, f"[extensions]\n{line}\n"), require_crm=False)
    assert error.key == "extensions.alice"
    assert str(error).startswith("[extensions] alice = ") and fragment in str(error)


# --------------------------------------------------------------------------- helpers


def test_number_rules() -> None:
    settings = load_settings(env={}, require_crm=False, overrides={
        "calls": {"number_format": "e164", "default_region": "RU", "national_prefix": "8:7"}})
    rules = settings.number_rules()
    assert rules == NumberRules(mode="e164", default_region="RU", national_prefix="8:7")
    assert rules.normalize("8 (999) 123-45-67") == "79991234567"
    assert Settings().number_rules() == NumberRules()


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("localhost:1", ("localhost", 1)),
    ("pbx.example.com:443", ("pbx.example.com", 443)),
    ("[::]:8080", ("::", 8080)),
    ("[::1]:0", ("::1", 0)),
])
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8080", ":8080", "host:", "host:port", "::1:80", "[::1]80",
                                   "[nope]:80", "a b:80", "h:65536", "h/x:80"])
def test_parse_listen_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_listen(value)


def test_recording_key() -> None:
    assert WebapiSettings(recording_secret="k").recording_key() == b"k"
    derived = WebapiSettings(token="t1").recording_key()
    assert len(derived) == 32 and derived != b"t1"
    assert derived == WebapiSettings(token="t1").recording_key()
    assert derived != WebapiSettings(token="t2").recording_key()
    assert WebapiSettings().recording_key() == b""


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.crm.url = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.extensions["x"] = "1"  # type: ignore[index]


def test_path_like_accepted(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, VALID)
    assert load_settings(os.fspath(path), env={}).crm.login == "robot"


def test_a_postgresql_outbox_url_is_accepted_and_its_password_masked(
        tmp_path: pathlib.Path) -> None:
    url = "postgresql://fs:pg-secret-42@db.example:5432/cc360"
    path = write(tmp_path, f"[outbox]\ndatabase = {url}\nnode = fs1\npassword = other-secret\n")
    settings = load_settings(path, env={}, require_crm=False)
    assert settings.outbox.database == url and settings.outbox.node == "fs1"
    dump = settings.dump()
    assert dump["outbox"]["database"] == "postgresql://fs:***@db.example:5432/cc360"
    assert dump["outbox"]["password"] == MASK
    assert "pg-secret-42" not in repr(dump) and "other-secret" not in repr(dump)
    bad = write(tmp_path, "[outbox]\ndatabase = postgresql://fs:pg-secret-42@db:x/cc360\n")
    error = config_error(bad, require_crm=False)
    assert "[outbox] database" in str(error) and "pg-secret-42" not in str(error)
