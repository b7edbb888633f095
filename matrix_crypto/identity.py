"""This device's Olm identity: the vodozemac `Account` of one (user_id, device_id).

It signs the device keys, keeps one-time keys topped up from the server's count, keeps
a fallback key published, and pickles itself (vodozemac encrypts the pickle with the
32-byte pickle key). Keys are handed out as the JSON bodies of ``/keys/upload``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, cast

import vodozemac

from matrix_crypto.canonical import sign

__all__ = [
    "MEGOLM_ALGORITHM",
    "OLM_ALGORITHM",
    "SIGNED_CURVE25519",
    "Identity",
]

OLM_ALGORITHM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM_ALGORITHM = "m.megolm.v1.aes-sha2"
SIGNED_CURVE25519 = "signed_curve25519"
PICKLE_KEY_BYTES = 32


class _FallbackAccount(Protocol):
    """The fallback-key half of `vodozemac.Account`, which its 0.10 stubs leave out."""

    @property
    def fallback_key(self) -> dict[str, vodozemac.Curve25519PublicKey]: ...

    def generate_fallback_key(self) -> None: ...


def _count(value: object) -> int:
    """A key count from the server; anything that is not a sane int counts as 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def check_pickle_key(key: bytes) -> None:
    """ValueError unless ``key`` is the 32 bytes vodozemac's pickles need."""
    if not isinstance(key, bytes) or len(key) != PICKLE_KEY_BYTES:
        raise ValueError(f"the pickle key must be {PICKLE_KEY_BYTES} bytes")


class Identity:
    """One device's account. Not thread-safe; the machine owns it.

    Every method that changes the account (`one_time_keys_for`, `fallback_keys_for`,
    `mark_published`, and `account` used by olm.py for inbound sessions) means the
    pickle must be saved again: the caller tracks that.
    """

    def __init__(self, user_id: str, device_id: str, account: vodozemac.Account) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.account = account

    @classmethod
    def create(cls, user_id: str, device_id: str) -> Identity:
        """A fresh account (new identity keys) for this device."""
        return cls(user_id, device_id, vodozemac.Account())

    @classmethod
    def from_pickle(cls, user_id: str, device_id: str, pickle: str, key: bytes) -> Identity:
        """Restore from `pickle`. ValueError (vodozemac's PickleException) for a wrong key
        or a corrupt pickle."""
        check_pickle_key(key)
        return cls(user_id, device_id, vodozemac.Account.from_pickle(pickle, key))

    def pickle(self, key: bytes) -> str:
        """The account encrypted with the 32-byte ``key``."""
        check_pickle_key(key)
        return self.account.pickle(key)

    @property
    def curve25519(self) -> str:
        return self.account.curve25519_key.to_base64()

    @property
    def ed25519(self) -> str:
        return self.account.ed25519_key.to_base64()

    @property
    def signing_key_id(self) -> str:
        return f"ed25519:{self.device_id}"

    def sign(self, message: bytes) -> str:
        """The unpadded base64 ed25519 signature of ``message``."""
        return self.account.sign(message).to_base64()

    def sign_json(self, obj: Mapping[str, object]) -> dict[str, object]:
        return sign(obj, self.user_id, self.signing_key_id, self.sign)

    def device_keys(self) -> dict[str, object]:
        """The signed ``device_keys`` of ``/keys/upload``."""
        return self.sign_json(
            {
                "user_id": self.user_id,
                "device_id": self.device_id,
                "algorithms": [OLM_ALGORITHM, MEGOLM_ALGORITHM],
                "keys": {
                    f"curve25519:{self.device_id}": self.curve25519,
                    f"ed25519:{self.device_id}": self.ed25519,
                },
            }
        )

    @property
    def max_one_time_keys(self) -> int:
        return self.account.max_number_of_one_time_keys

    def one_time_keys_for(self, counts: Mapping[str, object]) -> dict[str, object]:
        """The ``one_time_keys`` body that tops the server up to half of the maximum
        vodozemac keeps, given its ``device_one_time_keys_count``; ``{}`` when full.

        Keys generated but not yet marked published (a lost answer, a restart) are sent
        again, identical (same ids, deterministic signatures), so a repeat upload is
        accepted instead of "one time key already exists".
        """
        target = self.max_one_time_keys // 2
        on_server = _count(counts.get(SIGNED_CURVE25519))
        pending = len(self.account.one_time_keys)
        missing = target - on_server - pending
        if missing > 0:
            self.account.generate_one_time_keys(min(missing, target))
        return {
            f"{SIGNED_CURVE25519}:{key_id}": self.sign_json({"key": key.to_base64()})
            for key_id, key in self.account.one_time_keys.items()
        }

    def fallback_keys_for(self, unused_types: Sequence[object] | None) -> dict[str, object]:
        """The ``fallback_keys`` body: a new signed fallback key when the server says it
        has no unused ``signed_curve25519`` one (``unused_types`` is its
        ``device_unused_fallback_key_types``; None when the server did not say, which
        changes nothing), plus any generated one not yet marked published."""
        account = cast("_FallbackAccount", self.account)
        if (
            unused_types is not None
            and SIGNED_CURVE25519 not in unused_types
            and not account.fallback_key
        ):
            account.generate_fallback_key()
        return {
            f"{SIGNED_CURVE25519}:{key_id}": self.sign_json(
                {"key": key.to_base64(), "fallback": True}
            )
            for key_id, key in account.fallback_key.items()
        }

    def unpublished_key_ids(self) -> frozenset[str]:
        """Ids of the one-time and fallback keys generated but not marked published."""
        account = cast("_FallbackAccount", self.account)
        return frozenset(
            [f"otk:{key_id}" for key_id in self.account.one_time_keys]
            + [f"fallback:{key_id}" for key_id in account.fallback_key]
        )

    def mark_published(self) -> None:
        """The server has the keys last handed out: they are no longer sent."""
        self.account.mark_keys_as_published()
