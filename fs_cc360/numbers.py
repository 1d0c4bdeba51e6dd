"""Phone number rules shared by the call tracker (callerid) and click-to-call (``second``).

Modes (``[calls] number_format``):

- ``digits`` (default): keep digits only, drop a leading ``+``; then apply the
  ``national_prefix`` rewrite if set (``8:7`` turns ``8XXXXXXXXXX`` into ``7XXXXXXXXXX``
  for 11-digit numbers).
- ``e164``: parse with ``phonenumbers`` in ``default_region`` and give E.164 without the
  ``+`` (``89991234567`` in region RU -> ``79991234567``). Unparseable input falls back
  to ``digits``.
- ``raw``: pass the caller ID through unchanged.

``anonymous``, ``unknown``, ``private`` and empty caller IDs pass through as they are,
so the CRM can show them (spec: the callerid is the caller's number; there is none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import phonenumbers

_NON_DIGITS = re.compile(r"\D+")
_WITHHELD = {"", "anonymous", "unknown", "private", "restricted", "unavailable"}

#: Digits a phone number may have after normalisation (E.164 allows at most 15).
MIN_PHONE_DIGITS = 3
MAX_PHONE_DIGITS = 15


@dataclass(frozen=True)
class NumberRules:
    mode: str = "digits"  #: digits | e164 | raw
    default_region: str = "RU"  #: ISO country for ``e164`` parsing of national numbers
    national_prefix: str = ""  #: ``8:7`` -> 11-digit numbers starting with 8 get 7 instead

    def normalize(self, raw: str | None) -> str:
        """The callerid to send to CC360 for a FreeSWITCH caller ID."""
        value = (raw or "").strip()
        if value.lower() in _WITHHELD:
            return value
        if self.mode == "raw":
            return value
        if self.mode == "e164":
            e164 = self._e164(value)
            if e164:
                return e164
        digits = _NON_DIGITS.sub("", value)
        if not digits:
            return value  # e.g. a SIP user name: nothing better to send
        return self._national(digits)

    def _national(self, digits: str) -> str:
        if self.national_prefix:
            src, _, dst = self.national_prefix.partition(":")
            if len(digits) == 11 and digits.startswith(src):
                return dst + digits[len(src):]
        return digits

    def _e164(self, value: str) -> str | None:
        try:
            parsed = phonenumbers.parse(value, self.default_region or None)
        except phonenumbers.NumberParseException:
            return None
        if not phonenumbers.is_possible_number(parsed):
            return None
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)[1:]

    def phone_or_none(self, raw: str | None) -> str | None:
        """A dialable number for click-to-call, or ``None`` when ``raw`` is not one.

        Accepts digits with the usual decoration (``+``, spaces, dashes, dots, brackets)
        and nothing else: letters or SIP syntax are refused, not silently stripped.
        """
        value = (raw or "").strip()
        if not value or not re.fullmatch(r"\+?[0-9 ()\-.]+", value):
            return None
        number = self.normalize(value) if self.mode != "raw" else _NON_DIGITS.sub("", value)
        if not number.isdigit() or not MIN_PHONE_DIGITS <= len(number) <= MAX_PHONE_DIGITS:
            return None
        return number
