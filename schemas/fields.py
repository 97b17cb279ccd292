"""Field rules shared by every path in and out of the bridge: text that PostgreSQL can store,
e-mail addresses and phones in one canonical form each, integers the database holds, and dates
that can be true.

The ingress and the consumers validate with the same rules, so that a webhook answered 200 is
never dead-lettered later for its content (docs/design.md promise 7)."""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, Field, ValidationInfo

INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1
EMAIL_MAX_LENGTH = 254
# A date before this is no subscription change edrone or a shop ever made (a zeroed or
# corrupted clock); overridable through the validation context under DATE_FLOOR_CONTEXT.
DEFAULT_DATE_FLOOR = datetime(2000, 1, 1, tzinfo=UTC)
DATE_FLOOR_CONTEXT = "date_floor"
PHONE_MAX_LENGTH = 64
# The region a phone without its country code is read in (edrone is Polish); overridable
# through the validation context under PHONE_REGION_CONTEXT (EDRONE_BRIDGE_PHONE_REGION).
DEFAULT_PHONE_REGION = "PL"
PHONE_REGION_CONTEXT = "phone_region"

# Control characters (C0, DEL, C1: Unicode's Cc) and lone surrogates, which are no text at all.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What PostgreSQL's text cannot hold: NUL, and surrogates (no UTF-8 encodes them).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# RFC 5322 dot-atom in ASCII, as email_validator reads an unquoted local part (its DOT_ATOM_TEXT).
_DOT_ATOM = re.compile(r"[a-z0-9_!#$%&'*+\-/=?^`{|}~]+(?:\.[a-z0-9_!#$%&'*+\-/=?^`{|}~]+)*\Z")
# What a typed phone may hold: digits, spaces and the punctuation people write numbers with, a
# "+" only in front. phonenumbers itself would find a number inside any text ("call me at
# 500100200 after 5") and read letters as a keypad's digits.
_PHONE_TEXT = re.compile(r"\+?[\d\s()./\-]+\Z")


def _describe(match: re.Match[str]) -> str:
    return f"U+{ord(match.group()):04X} at position {match.start()}"


def control_character(value: str) -> str | None:
    """Where ``value`` holds a control character or a lone surrogate, described; else None."""
    found = _CONTROL.search(value)
    return _describe(found) if found else None


def _plain(value: str) -> str:
    problem = control_character(value)
    if problem is not None:
        raise ValueError(f"contains a control character ({problem})")
    return value


def _storable(value: str) -> str:
    found = _UNSTORABLE.search(value)
    if found is not None:
        raise ValueError(f"contains a character PostgreSQL cannot store ({_describe(found)})")
    return value


# Identifiers and anything the bridge matches on: no control characters at all.
PlainText = Annotated[
    str,
    AfterValidator(_plain),
    Field(json_schema_extra={"pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"}),
]
# Free text (names, tags) that is only passed along: anything PostgreSQL can store.
StorableText = Annotated[
    str, AfterValidator(_storable), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})
]
Int4 = Annotated[int, Field(ge=INT4_MIN, le=INT4_MAX)]


def normalise_email(raw: str) -> str:
    """The one form of an address: trimmed, lower-cased, the domain in IDNA's Unicode form
    (``user@xn--bcher-kva.de`` and ``USER@Bücher.de`` are both ``user@bücher.de``), as
    email_validator normalises it. Homoglyphs stay distinct: they are other addresses.
    Raises ``ValueError`` naming why an address is invalid."""
    address = raw.strip().lower()
    local, at, domain = address.rpartition("@")
    # The common shape, a plain ASCII local part, is valid exactly when its domain is: that
    # check (most of email_validator's time) is made once per domain.
    if at and _DOT_ATOM.match(local):
        forms = domain_forms(domain)
        if forms is not None and len(local) + 1 + len(forms[1]) <= EMAIL_MAX_LENGTH:
            return f"{local}@{forms[0]}"
    try:
        info = validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid e-mail address: {exc}") from None
    return info.normalized.lower()


@functools.lru_cache(maxsize=4096)
def domain_forms(domain: str) -> tuple[str, str] | None:
    """(Unicode form, ASCII form) of a valid domain, both lower-cased; None if invalid."""
    try:
        info = validate_email(f"a@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return None
    return info.domain.lower(), info.ascii_domain.lower()


def ascii_email(address: str) -> str:
    """A canonical address with its domain in IDNA's ASCII form (``xn--``), for matching a
    shop's table that may hold that form."""
    local, _, domain = address.rpartition("@")
    forms = domain_forms(domain)
    return f"{local}@{forms[1]}" if forms is not None else address


def _email(value: str) -> str:
    return normalise_email(value)


Email = Annotated[
    str,
    Field(min_length=3, max_length=EMAIL_MAX_LENGTH, json_schema_extra={"format": "email"}),
    AfterValidator(_email),
]


def phone_region(value: str) -> str:
    """A region code phonenumbers knows (``PL``, ``DE``; any case), upper-cased."""
    region = value.strip().upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(
            f"{value!r} is not a region code phonenumbers knows (two letters, like PL or DE)"
        )
    return region


def normalise_phone(raw: str, region: str = DEFAULT_PHONE_REGION) -> str:
    """The one form of a phone: E.164 (``+48500100200``), read with the phonenumbers library,
    in ``region`` when it has no country code (``500 100 200``, ``0048 500 100 200`` and
    ``48 500 100 200`` are all ``+48500100200`` in Poland). Raises ``ValueError`` saying why
    a phone is no valid number, never quoting it: a phone is personal data."""
    text = raw.strip()
    if not _PHONE_TEXT.match(text):
        raise ValueError("not a phone number: only digits, spaces and + ( ) - . / may be in one")
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        raise ValueError("not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number: no numbering plan has it")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def phone_forms(phone: str, region: str = DEFAULT_PHONE_REGION) -> list[str]:
    """The usual spellings of a phone (E.164) in a shop's table, itself first: the
    international form (``+48 500 100 200``), the digits with the country code
    (``48500100200``, ``0048500100200``), and for a number of ``region`` its national forms
    (``500 100 200``, ``500100200``), which mean another number in another region. A phone
    stored before phones were normalised, and not in international form, is only itself."""
    try:
        number = phonenumbers.parse(phone)
    except phonenumbers.NumberParseException:
        return [phone]
    formats = phonenumbers.PhoneNumberFormat
    e164 = phonenumbers.format_number(number, formats.E164)
    forms = [phone, e164, phonenumbers.format_number(number, formats.INTERNATIONAL)]
    forms += [e164[1:], "00" + e164[1:]]
    if number.country_code == phonenumbers.country_code_for_region(region):
        national = phonenumbers.format_number(number, formats.NATIONAL)
        forms += [national, "".join(ch for ch in national if ch.isdigit())]
    return list(dict.fromkeys(forms))


def _phone(value: str, info: ValidationInfo) -> str:
    context = info.context
    region = context.get(PHONE_REGION_CONTEXT) if context else None
    return normalise_phone(value, region or DEFAULT_PHONE_REGION)


# A phone as anyone types it, stored in E.164; national numbers are read in the context's region.
Phone = Annotated[
    PlainText,
    Field(
        max_length=PHONE_MAX_LENGTH,
        description="A phone; stored in E.164. Without its country code, read in the bridge's "
        "region (EDRONE_BRIDGE_PHONE_REGION, PL unless set).",
    ),
    AfterValidator(_phone),
]


def date_floor(info: ValidationInfo) -> datetime:
    """The floor of this validation: the context's, or :data:`DEFAULT_DATE_FLOOR`."""
    context = info.context
    floor: datetime = context.get(DATE_FLOOR_CONTEXT, DEFAULT_DATE_FLOOR) if context else None
    return floor or DEFAULT_DATE_FLOOR


def check_floor(value: datetime, info: ValidationInfo) -> datetime:
    floor = date_floor(info)
    if value < floor:
        raise ValueError(f"is before {floor:%Y-%m-%d}: no clock that is right says so")
    return value


def ordered_at(stated: datetime, reference: datetime, skew: timedelta) -> datetime:
    """When a change counts as made, for newest-wins: its stated date, but no later than
    ``reference`` (when the bridge received it) plus ``skew``. A date from a wrong zone or a
    clock gone wrong then holds an address for ``skew`` at most, instead of for ever."""
    limit = reference + skew
    return stated if stated <= limit else limit


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC; one without an offset is taken for UTC."""
    # A shop that leaves out the offset means UTC, as edrone's own dates do.
    if value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 east of UTC, year 9999 west of it
        raise ValueError("is out of the range of dates") from None
