"""Answers of the cross-signing endpoints.

Like the device keys of `matrix_api.models.keys`, key objects stay raw; only the maps
around them are checked, and an entry of the wrong type is dropped and recorded in
``skipped``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .events import SkippedEvent
from .identifiers import UserID
from .keys import decode_key_object_maps

__all__ = ["SignaturesUploadResponse", "decode_signatures_upload"]


class SignaturesUploadResponse(msgspec.Struct, frozen=True):
    """The /keys/signatures/upload answer.

    ``failures[user_id][key_id]`` is the error (``{"errcode", "error"}``, raw) for
    each signed object the server did not take, ``M_INVALID_SIGNATURE`` for a bad
    signature; empty when every signature was stored.
    """

    failures: dict[UserID, dict[str, dict[str, Any]]] = msgspec.field(default_factory=dict)
    skipped: list[SkippedEvent] = msgspec.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every signature was stored (nothing failed, nothing unreadable)."""
        return not self.failures and not self.skipped


def decode_signatures_upload(body: bytes) -> SignaturesUploadResponse:
    failures, skipped = decode_key_object_maps(body, "failures")
    return SignaturesUploadResponse(failures, skipped)
