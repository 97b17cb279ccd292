"""edrone's webhook signatures: every test vector of docs/protocol.md §1, the NATIVE_4 reading,
PHP-style value rendering, and the constant-time check against current and previous secrets."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import signing
from bridge.devtools.simulate import build_webhook, signature_parts
from tests.support.vectors import APP_ID, SECRET, VECTOR_A
from tests.support.vectors import VECTORS as ALL_VECTORS

VERSIONS = {
    "A": "NATIVE_5",
    "B": "NATIVE_5",
    "C": "NATIVE_5",
    "D": "LEGACY_UPDATE",
    "E": "LEGACY_UNSUBSCRIBE",
    "F": "NATIVE_5",
}


def _vector(name: str, sent: dict[str, str]) -> tuple[str, str, dict[str, str], str]:
    """(vector, version, the signed fields as edrone sends them, its signature or token)."""
    proof = sent.get("signature") or sent["token"]
    fields = {k: v for k, v in sent.items() if k not in ("signature", "token", "app_id")}
    return name, VERSIONS[name], fields, proof


# The vectors themselves are quoted once, in tests/vectors.py.
VECTORS = [_vector(name, sent) for name, (sent, *_) in sorted(ALL_VECTORS.items())]
SIG_A = VECTOR_A["signature"]
VECTOR_IDS = [vector[0] for vector in VECTORS]


class TestVectors:
    @pytest.mark.parametrize(("name", "version", "fields", "expected"), VECTORS, ids=VECTOR_IDS)
    def test_sign_reproduces_the_vector(self, name, version, fields, expected):
        """Each docs/protocol.md vector, computed by edrone's PHP, is reproduced exactly."""
        assert signing.sign(version, fields, SECRET, APP_ID) == expected

    @pytest.mark.parametrize(("name", "version", "fields", "expected"), VECTORS, ids=VECTOR_IDS)
    def test_matches_accepts_the_vector(self, name, version, fields, expected):
        """The receiver's check accepts each vector's signature under the app's secret."""
        assert signing.matches(version, fields, expected, [SECRET], APP_ID)

    @pytest.mark.parametrize(("name", "version", "fields", "expected"), VECTORS, ids=VECTOR_IDS)
    def test_signature_parts_hash_to_the_vector(self, name, version, fields, expected):
        """The field order `sign --show-input` prints is the order the signature really hashes."""
        parts = signature_parts(version, fields, SECRET, APP_ID)
        proof = hashlib.sha256("".join(v for _, v in parts).encode("utf-8")).hexdigest()
        if version != "LEGACY_UNSUBSCRIBE":
            proof = base64.b64encode(proof.encode()).decode()
        assert proof == expected

    def test_sms_signs_the_phone_not_the_email(self):
        """Type 2 (SMS) hashes the phone: changing the e-mail leaves vector B's signature as is."""
        fields = dict(VECTORS[1][2], email="someone.else@example.com")
        assert signing.sign("NATIVE_5", fields, SECRET, APP_ID) == VECTORS[1][3]

    def test_event_date_is_signed_exactly_as_received(self):
        """Re-formatting event_date (same instant, other spelling) breaks the signature."""
        fields = dict(VECTORS[0][2], event_date="2024-01-15T10:30:00Z")
        assert signing.sign("NATIVE_5", fields, SECRET, APP_ID) != SIG_A


class TestNative4:
    def test_native4_is_native5_with_the_email_chosen(self):
        """NATIVE_4 has no type or phone; its signature is vector A's formula over the e-mail."""
        fields = {
            k: v
            for k, v in VECTORS[0][2].items()
            if k not in ("subscription_status_type_id", "phone")
        }
        assert signing.sign("NATIVE_4", fields, SECRET, APP_ID) == SIG_A

    def test_native4_ignores_a_type_or_phone_field(self):
        """A stray type 2 or phone cannot switch NATIVE_4 to hashing the phone."""
        fields = dict(VECTORS[0][2], subscription_status_type_id="2")
        assert signing.sign("NATIVE_4", fields, SECRET, APP_ID) == SIG_A

    def test_native4_formula(self):
        """NATIVE_4 = base64(hex(sha256(email.status.reason.date.id.secret.app_id))), as read."""
        fields = {
            "email": "a@b.pl",
            "subscriber_status": "1",
            "subscription_status_reason": "10",
            "event_date": "2024-02-01 00:00:00",
            "event_id": "e-1",
        }
        text = "a@b.pl" + "1" + "10" + "2024-02-01 00:00:00" + "e-1" + SECRET + APP_ID
        hexed = hashlib.sha256(text.encode()).hexdigest()
        expected = base64.b64encode(hexed.encode()).decode()
        assert signing.sign("NATIVE_4", fields, SECRET, APP_ID) == expected


class TestPhpString:
    @pytest.mark.parametrize(
        ("value", "rendered"),
        [
            (1, "1"),
            ("1", "1"),
            (0, "0"),
            (None, ""),
            ("", ""),
            (1.0, "1"),
            (True, "1"),
            (False, ""),
        ],
    )
    def test_json_values_render_as_php_concatenation_would(self, value, rendered):
        """JSON numbers, nulls and booleans become the strings PHP would have hashed."""
        assert signing.php_string(value) == rendered

    def test_json_numbers_sign_like_strings(self):
        """Vector A sent with JSON numbers (and a null status for C) still verifies."""
        raw = {
            "subscription_status_type_id": 1,
            "subscriber_status": 0,
            "subscription_status_reason": 1,
        }
        fields = dict(VECTORS[0][2], **{k: signing.php_string(v) for k, v in raw.items()})
        assert signing.sign("NATIVE_5", fields, SECRET, APP_ID) == SIG_A
        fields_c = dict(VECTORS[2][2], subscriber_status=signing.php_string(None))
        assert signing.sign("NATIVE_5", fields_c, SECRET, APP_ID) == VECTORS[2][3]


class TestMatches:
    def test_previous_secret_is_accepted_during_rotation(self):
        """A webhook signed with the previous secret verifies while both secrets are configured."""
        assert signing.matches("NATIVE_5", VECTORS[0][2], SIG_A, ["new-secret", SECRET], APP_ID)

    def test_wrong_secret_is_refused(self):
        """A signature made with a secret that is not configured does not verify."""
        assert not signing.matches("NATIVE_5", VECTORS[0][2], SIG_A, ["other", "older"], APP_ID)

    def test_no_secret_refuses_everything(self):
        """An app with no secrets accepts nothing (never an accidental pass)."""
        assert not signing.matches("NATIVE_5", VECTORS[0][2], SIG_A, [], APP_ID)

    def test_another_app_id_is_refused(self):
        """The app_id is inside the hash: a signature for one app does not verify for another."""
        assert not signing.matches("NATIVE_5", VECTORS[0][2], SIG_A, [SECRET], "another-app")

    @pytest.mark.parametrize(
        "field",
        ["email", "subscriber_status", "subscription_status_reason", "event_date", "event_id"],
    )
    def test_any_changed_field_is_refused(self, field):
        """Changing any signed field of vector A makes its signature fail."""
        fields = dict(VECTORS[0][2], **{field: VECTORS[0][2][field] + "x"})
        assert not signing.matches("NATIVE_5", fields, SIG_A, [SECRET], APP_ID)

    def test_hex_instead_of_base64_is_refused(self):
        """Only the base64 form edrone sends verifies, not the bare hex digest."""
        hexed = base64.b64decode(SIG_A).decode()
        assert not signing.matches("NATIVE_5", VECTORS[0][2], hexed, [SECRET], APP_ID)

    def test_non_ascii_signature_is_refused_not_raised(self):
        """A garbage signature with non-ASCII characters is a plain mismatch."""
        assert not signing.matches("NATIVE_5", VECTORS[0][2], "zażółć", [SECRET], APP_ID)

    def test_every_secret_is_compared_in_constant_time(self, monkeypatch):
        """The check uses hmac.compare_digest for every configured secret, even after a match,
        so its timing reveals neither the signature nor which secret matched."""
        calls = []
        real = signing.hmac.compare_digest

        def spy(a, b):
            calls.append((a, b))
            return real(a, b)

        monkeypatch.setattr(signing.hmac, "compare_digest", spy)
        assert signing.matches("NATIVE_5", VECTORS[0][2], SIG_A, [SECRET, "older"], APP_ID)
        assert len(calls) == 2


class TestShape:
    @given(
        address=st.text(max_size=40),
        status=st.sampled_from(["0", "1", ""]),
        reason=st.integers(0, 99).map(str),
        event_id=st.text(max_size=40),
        secret=st.text(min_size=1, max_size=40),
    )
    def test_native5_signature_is_88_chars_of_base64_hex(
        self, address, status, reason, event_id, secret
    ):
        """Whatever the (UTF-8) input, a NATIVE_5 signature is base64 of 64 hex characters:
        88 characters ending in ``==``."""
        fields = {
            "email": address,
            "subscriber_status": status,
            "subscription_status_reason": reason,
            "event_date": "2024-01-15 10:30:00",
            "event_id": event_id,
        }
        signature = signing.sign("NATIVE_5", fields, secret, APP_ID)
        assert len(signature) == 88
        assert signature.endswith("==")
        int(base64.b64decode(signature), 16)

    @pytest.mark.parametrize(
        "version", ["NATIVE_5", "NATIVE_4", "LEGACY_UPDATE", "LEGACY_UNSUBSCRIBE"]
    )
    def test_built_webhooks_verify(self, version):
        """A webhook from ``build_webhook`` verifies under the secret it was built with."""
        fields = build_webhook(version, APP_ID, SECRET)
        proof = fields.pop("token" if version == "LEGACY_UNSUBSCRIBE" else "signature")
        assert signing.matches(version, fields, proof, [SECRET], APP_ID)
