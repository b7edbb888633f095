"""How long a backend's answer asks it to wait (`retry_after_from`)."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta

import pytest

from bot.backends.backoff import retry_after_from


def http_date(seconds_from_now: float) -> str:
    return email.utils.format_datetime(
        datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True
    )


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "120", "retry-after": "7"}, 0.12),  # the finer one wins
        ({"retry-after-ms": "lots", "retry-after": "7"}, 7.0),
    ],
)
def test_a_wait_in_seconds_or_milliseconds(headers: dict[str, str], wait: float | None) -> None:
    assert retry_after_from(headers) == wait


def test_a_date_is_measured_from_our_clock_without_a_date_header() -> None:
    assert retry_after_from({"retry-after": http_date(60)}) == pytest.approx(60, abs=2)


def test_a_date_is_measured_from_the_answers_own_date() -> None:
    # The server's clock is an hour behind ours: its "in 30 s" is 30 s, not nothing.
    headers = {"retry-after": http_date(-3600 + 30), "date": http_date(-3600)}
    assert retry_after_from(headers) == pytest.approx(30, abs=1)


def test_an_unreadable_date_header_falls_back_to_our_clock() -> None:
    headers = {"retry-after": http_date(60), "date": "yesterday"}
    assert retry_after_from(headers) == pytest.approx(60, abs=2)
