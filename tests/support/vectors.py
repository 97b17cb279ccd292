"""The test vectors of docs/protocol.md §1, as the fields edrone sends (app_id 5f3e1a2b3c4d5)."""

from __future__ import annotations

APP_ID = "5f3e1a2b3c4d5"
SECRET = "s3cr3t-app-secret"
EMAIL = "jan.kowalski@example.com"
PHONE = "+48500100200"

VECTOR_A = {
    "subscription_status_type_id": "1",
    "email": EMAIL,
    "phone": PHONE,
    "subscriber_status": "0",
    "subscription_status_reason": "1",
    "event_date": "2024-01-15 10:30:00",
    "event_id": "evt-123",
    "app_id": APP_ID,
    "signature": "MjFkYWM4NDEzMTc0YmY1MTlhOWFhNDI5OTUwZGM2N2E4NjExYzYzMDE0NjI2N2Q5N2NjMzgyZGU3ZTQwMGNjOQ==",
}
VECTOR_B = {
    "subscription_status_type_id": "2",
    "email": EMAIL,
    "phone": PHONE,
    "subscriber_status": "1",
    "subscription_status_reason": "5",
    "event_date": "2024-01-15T10:30:00.123Z",
    "event_id": "9f1c2e7a-1b2c-4d3e-8f90-aa11bb22cc33",
    "app_id": APP_ID,
    "signature": "NTY2NmVjNzFjYzdjNWU2NmM1YTg1ZWU5YjYwNDc2ZmM0Zjc5MmMwZTVjNjIwYjI2M2U5NGVmZmVmMDM2YTJlMA==",
}
VECTOR_C = {
    "subscription_status_type_id": "1",
    "email": EMAIL,
    "phone": PHONE,
    "subscriber_status": "",
    "subscription_status_reason": "13",
    "event_date": "2024-01-15 10:30:00",
    "event_id": "evt-125",
    "app_id": APP_ID,
    "signature": "MTAyNzViZjAwOWYyMzg1ZjdhOWRiYmE4N2IwNTMyMTdhZWZjY2I5OTdkZDViOWZkOTQzZTJkMGI1ODcwMGNkZg==",
}
# The update callback carries no app_id: the bridge finds the app by its signature.
VECTOR_D = {
    "email": EMAIL,
    "subscriber_status": "1",
    "event_date": "2024-01-15 10:30:00",
    "event_id": "evt-126",
    "signature": "ZTVjNTMyMmEyZDk4ODAwYmUxNzYzODU1MjM4YmEzZmFlZjJjOWYyYTI4NGNlMzQ4YWY5YTk5ZjM2ZjQ2NzNmZA==",
}
VECTOR_E = {
    "email": EMAIL,
    "token": "7a8585bb3931f7a23c905314519624b5326c75b73c76f34ed4762820338fbbbc",
}
VECTOR_F = {
    "subscription_status_type_id": "1",
    "email": "zażółć@example.pl",
    "subscriber_status": "1",
    "subscription_status_reason": "10",
    "event_date": "2024-01-15 10:30:00",
    "event_id": "evt-127",
    "app_id": APP_ID,
    "signature": "ZjZjMDBiMDk1MTYzYzFlYzg2YTU4YzUzNzM3OWI1YzdlYTkyNmI1NTc0NmQyMmY0NDNhYmE1ZGQyYTA4YzdiZQ==",
}

# name → (fields, expected channel, address, status, reason, protocol)
VECTORS = {
    "A": (VECTOR_A, "email", EMAIL, 0, 1, "NATIVE_5"),
    "B": (VECTOR_B, "sms", PHONE, 1, 5, "NATIVE_5"),
    "C": (VECTOR_C, "email", EMAIL, None, 13, "NATIVE_5"),
    "D": (VECTOR_D, "email", EMAIL, 1, None, "LEGACY_UPDATE"),
    "E": (VECTOR_E, "email", EMAIL, 0, None, "LEGACY_UNSUBSCRIBE"),
    "F": (VECTOR_F, "email", "zażółć@example.pl", 1, 10, "NATIVE_5"),
}
