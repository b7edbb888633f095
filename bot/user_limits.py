"""How many messages one user may have handled: a token bucket per user (pure, no I/O).

Each user has a bucket of ``burst`` tokens that refills at ``per_s`` tokens a second;
handling a message takes one. A message that finds the bucket empty is over the
limit: the first such message of an episode is told so (`Verdict.LIMITED_TELL`), the
rest are not (`Verdict.LIMITED`), until the bucket is full again, which ends the
episode. The caller passes the time: `bot.handler` gives the time the message was
sent, on the homeserver's clock (``origin_server_ts``, never later than the server's
now), so the limit is on how fast a user writes, not on how fast the bot catches up
after a restart; this host's wall clock plays no part, and tests are exact. Messages
from one user in several rooms may come out of order: an earlier time than the last
one seen refills nothing.

The buckets live in memory only, on purpose: the durable inbox is what must survive a
restart, and after one every bucket starts full (at worst a user gets one more burst).

Memory is bounded two ways. A bucket that is full again is the same as no bucket, so it
is dropped: the buckets are kept in the order they were last used, and each `take`
drops the least recently used ones while they are full. A bucket not used for
``burst / per_s`` seconds is full, so only users who sent something within that window
are held. On top of that, at most ``max_users`` buckets are kept; past that the least
recently used bucket is dropped even if not full (its user starts full again: the
limit errs on the side of answering).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["MAX_USERS", "UserLimiter", "Verdict"]

MAX_USERS = 100_000
# Verdicts remembered per bucket, by the message's key (its event id), so that handling
# a message again (a retry after a transient error) neither pays twice nor loses the
# notice that the first attempt was to send. A user's messages in flight at once are
# one per room lane, and a retry comes back after seconds: a few suffice.
_REMEMBERED = 16


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    LIMITED_TELL = "limited_tell"
    """Over the limit, the first message of this episode: tell the user."""
    LIMITED = "limited"
    """Over the limit; the user has been told already."""

    @property
    def limited(self) -> bool:
        return self is not Verdict.ALLOWED


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    """When ``tokens`` was last brought up to date."""
    told: bool = False
    """This episode's notice is decided (it ends when the bucket is full again)."""
    recent: OrderedDict[str, Verdict] = field(default_factory=OrderedDict)


class UserLimiter:
    """Token buckets keyed by user id; see the module docstring.

    ``burst``: tokens a full bucket holds (at least 1); ``per_s``: tokens added per
    second (more than 0); ``max_users``: most buckets held at once.
    """

    def __init__(self, burst: int, per_s: float, *, max_users: int = MAX_USERS) -> None:
        if burst < 1 or not per_s > 0 or max_users < 1:
            raise ValueError("burst and max_users must be at least 1, per_s more than 0")
        self._burst = float(burst)
        self._per_s = per_s
        self._max_users = max_users
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """How many users have a bucket (the others' are full)."""
        return len(self._buckets)

    @property
    def refill_s(self) -> float:
        """Seconds an empty bucket takes to be full again."""
        return self._burst / self._per_s

    def take(self, user: str, now: float, key: str | None = None) -> Verdict:
        """Charge one message of ``user`` at time ``now`` (seconds, any monotonic
        origin); ``key`` names the message, so that taking it again (a retry) gives
        the first verdict at no cost."""
        bucket = self._buckets.pop(user, None)
        if bucket is None:
            bucket = _Bucket(tokens=self._burst, at=now)
        else:
            self._refill(bucket, now)
        verdict = bucket.recent.get(key) if key is not None else None
        if verdict is None:
            verdict = self._charge(bucket)
            if key is not None:
                bucket.recent[key] = verdict
                if len(bucket.recent) > _REMEMBERED:
                    bucket.recent.popitem(last=False)
        self._buckets[user] = bucket  # the most recently used, at the end
        self._drop_full(now)
        return verdict

    def _refill(self, bucket: _Bucket, now: float) -> None:
        # max(): a clock that goes back (it should not) gives nothing, takes nothing.
        elapsed = max(0.0, now - bucket.at)
        bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._per_s)
        bucket.at = max(bucket.at, now)
        if bucket.tokens >= self._burst:
            bucket.told = False  # the episode is over

    def _charge(self, bucket: _Bucket) -> Verdict:
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Verdict.ALLOWED
        if bucket.told:
            return Verdict.LIMITED
        bucket.told = True
        return Verdict.LIMITED_TELL

    def _drop_full(self, now: float) -> None:
        while len(self._buckets) > self._max_users:
            self._buckets.popitem(last=False)
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if oldest.tokens + max(0.0, now - oldest.at) * self._per_s < self._burst:
                break
            self._buckets.popitem(last=False)
