"""The per-user token bucket, at exact times (it takes the time as an argument)."""

from __future__ import annotations

import pytest

from bot.user_limits import UserLimiter, Verdict

A = "@alice:hs.test"
B = "@bob:hs.test"
ALLOWED, TELL, LIMITED = Verdict.ALLOWED, Verdict.LIMITED_TELL, Verdict.LIMITED


def test_a_full_burst_then_one_notice_then_silence() -> None:
    limiter = UserLimiter(burst=20, per_s=1.0)
    verdicts = [limiter.take(A, 100.0) for _ in range(25)]
    assert verdicts == [ALLOWED] * 20 + [TELL] + [LIMITED] * 4
    assert [v.limited for v in verdicts].count(True) == 5


def test_tokens_come_back_at_the_rate_and_no_faster() -> None:
    limiter = UserLimiter(burst=3, per_s=0.5)  # one token every 2 s
    assert [limiter.take(A, 0.0) for _ in range(3)] == [ALLOWED] * 3
    assert limiter.take(A, 1.999) is TELL
    assert limiter.take(A, 2.0) is ALLOWED  # 2 s after the last refill point: one token
    assert limiter.take(A, 2.0) is LIMITED  # still the same episode: not told again
    assert limiter.take(A, 4.0) is ALLOWED
    # A limited message costs nothing: the token it did not get was never there.
    assert limiter.take(A, 5.999) is LIMITED
    assert limiter.take(A, 6.0) is ALLOWED


def test_the_episode_ends_only_when_the_bucket_is_full_again() -> None:
    limiter = UserLimiter(burst=2, per_s=1.0)
    assert [limiter.take(A, 0.0) for _ in range(3)] == [ALLOWED, ALLOWED, TELL]
    # Refilled by one token, not two: the same episode, no second notice.
    assert [limiter.take(A, 1.0) for _ in range(2)] == [ALLOWED, LIMITED]
    # Full again two seconds later: a new episode, which gets its own notice.
    assert [limiter.take(A, 3.0) for _ in range(3)] == [ALLOWED, ALLOWED, TELL]


def test_the_bucket_never_holds_more_than_the_burst() -> None:
    limiter = UserLimiter(burst=5, per_s=10.0)
    limiter.take(A, 0.0)
    # A day idle still gives one burst, not 864,000 messages.
    verdicts = [limiter.take(A, 86_400.0) for _ in range(7)]
    assert verdicts == [ALLOWED] * 5 + [TELL, LIMITED]


def test_users_have_their_own_buckets() -> None:
    limiter = UserLimiter(burst=2, per_s=1.0)
    assert [limiter.take(A, 0.0) for _ in range(4)] == [ALLOWED, ALLOWED, TELL, LIMITED]
    assert [limiter.take(B, 0.0) for _ in range(3)] == [ALLOWED, ALLOWED, TELL]


def test_the_same_message_again_gets_its_first_verdict_for_free() -> None:
    limiter = UserLimiter(burst=2, per_s=1.0)
    assert limiter.take(A, 0.0, "$1") is ALLOWED
    assert limiter.take(A, 0.0, "$1") is ALLOWED  # a retry: not charged again
    assert limiter.take(A, 0.0, "$2") is ALLOWED
    assert limiter.take(A, 0.0, "$3") is TELL
    # The retry of the message that was to carry the notice still carries it.
    assert limiter.take(A, 0.5, "$3") is TELL
    assert limiter.take(A, 0.5, "$4") is LIMITED


def test_a_clock_that_goes_back_gives_no_tokens_and_takes_none() -> None:
    limiter = UserLimiter(burst=2, per_s=1.0)
    assert [limiter.take(A, 10.0) for _ in range(2)] == [ALLOWED, ALLOWED]
    assert limiter.take(A, 5.0) is TELL
    # Refill counts from the latest time seen, 10.0, not from 5.0.
    assert limiter.take(A, 10.999) is LIMITED
    assert limiter.take(A, 11.0) is ALLOWED


def test_buckets_that_are_full_again_are_dropped() -> None:
    limiter = UserLimiter(burst=20, per_s=1.0)
    for n in range(1_000):  # 1,000 users within 10 s, each emptying their bucket
        for _ in range(20):
            limiter.take(f"@u{n}:hs.test", n / 100)
    assert len(limiter) == 1_000
    # An empty bucket is full 20 s later: each take sweeps the ones that are.
    limiter.take(A, 20.005)
    assert len(limiter) == 1_000  # @u0 (emptied at 0.0) dropped, A added; @u1 not yet full
    assert "@u0:hs.test" not in limiter._buckets
    limiter.take(A, 30.0)
    assert len(limiter) == 1  # only the user who just sent something
    # A dropped bucket was full: its user has a whole burst, as before.
    assert [limiter.take("@u5:hs.test", 30.0) for _ in range(21)][-2:] == [ALLOWED, TELL]


def test_a_user_who_sent_one_message_is_held_one_refill_of_one_token() -> None:
    limiter = UserLimiter(burst=20, per_s=1.0)
    for n in range(1_000):  # one message each, 128 users a second (exact in binary)
        limiter.take(f"@u{n}:hs.test", n / 128)
        assert len(limiter) <= 128
    # The one token is back a second later: only the last second's users are held.
    assert len(limiter) == 128


def test_a_user_still_in_debt_is_not_dropped_by_the_sweep() -> None:
    limiter = UserLimiter(burst=2, per_s=1.0)
    for _ in range(3):
        limiter.take(A, 0.0)
    limiter.take(B, 1.5)  # A has 1.5 tokens at 1.5: not full, kept
    assert len(limiter) == 2
    assert [limiter.take(A, 1.5) for _ in range(2)] == [ALLOWED, LIMITED]


def test_at_most_max_users_buckets_even_when_none_is_full() -> None:
    limiter = UserLimiter(burst=1, per_s=0.001, max_users=3)
    for n in range(10):
        assert limiter.take(f"@u{n}:hs.test", 0.0) is ALLOWED
        assert len(limiter) <= 3
    # The least recently used were forgotten: they start full (the limit errs on the
    # side of answering); the most recent three are still empty.
    assert limiter.take("@u0:hs.test", 0.0) is ALLOWED
    assert limiter.take("@u9:hs.test", 0.0) is TELL


def test_remembered_verdicts_per_user_are_bounded() -> None:
    limiter = UserLimiter(burst=1_000, per_s=1.0)
    for n in range(1_000):
        limiter.take(A, 0.0, f"${n}")
    bucket = limiter._buckets[A]
    assert len(bucket.recent) == 16
    # An old key forgotten is charged again, like any new message.
    assert bucket.tokens == 0
    assert limiter.take(A, 0.0, "$0") is TELL


@pytest.mark.parametrize(
    ("burst", "per_s", "max_users"),
    [(0, 1.0, 1), (1, 0.0, 1), (1, -1.0, 1), (1, float("nan"), 1), (1, 1.0, 0)],
)
def test_nonsense_limits_are_refused(burst: int, per_s: float, max_users: int) -> None:
    with pytest.raises(ValueError, match="burst"):
        UserLimiter(burst, per_s, max_users=max_users)


def test_refill_time_is_the_burst_over_the_rate() -> None:
    assert UserLimiter(burst=20, per_s=1.0).refill_s == 20.0
    assert UserLimiter(burst=3, per_s=0.5).refill_s == 6.0
