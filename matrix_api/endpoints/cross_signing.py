"""Cross-signing: publishing the user's master, self-signing and user-signing keys,
and the signatures they make over devices and other users' master keys.

Keys and signed objects go out as plain dicts, signed by the caller (the crypto
layer); the query side is `query_keys` (``master_keys``, ``self_signing_keys``,
``user_signing_keys`` in its answer).

Which of these a retry may repeat (`Request.idempotent`, see `matrix_api.retry`):

- /keys/device_signing/upload: yes. The spec makes it idempotent: the same keys sent
  again are taken (200) without asking for auth; different ones need it. A retry
  after a lost answer whose first attempt went through sends keys the server now
  holds, which it accepts.
- /keys/signatures/upload: yes. A signature stored twice is stored once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..http import HTTPCore, Request, ignore_body
from ..models.cross_signing import SignaturesUploadResponse, decode_signatures_upload
from ..paths import CLIENT_V3
from ..uia import AuthBody, send_with_password


class CrossSigningEndpoints(HTTPCore):
    async def upload_cross_signing_keys(
        self,
        *,
        master_key: Mapping[str, Any] | None = None,
        self_signing_key: Mapping[str, Any] | None = None,
        user_signing_key: Mapping[str, Any] | None = None,
        password: str | None = None,
    ) -> None:
        """``POST /keys/device_signing/upload``: publish this user's cross-signing
        keys, each signed by the caller (the self- and user-signing keys by the master
        key). A key left out (None) is not sent.

        A server may take the first keys of a user without auth (MSC3967; Synapse
        does) and the same keys again at any time, but replacing keys needs
        user-interactive auth: then the request is sent once more with
        ``m.login.password`` and ``password`` (`matrix_api.uia`). Raises
        `AuthRequired` when the server asks and ``password`` is None,
        `PasswordRefused`, `AuthFlowUnsupported` (the server offers no password
        flow), `AuthNotAccepted` (asked again after the password), and
        `BadAuthChallenge`; ``M_INVALID_SIGNATURE`` (a key badly signed) and
        ``M_FORBIDDEN`` (a key id that is a device id) are `MatrixError`\\ s.
        """
        body: dict[str, Any] = {}
        if master_key is not None:
            body["master_key"] = master_key
        if self_signing_key is not None:
            body["self_signing_key"] = self_signing_key
        if user_signing_key is not None:
            body["user_signing_key"] = user_signing_key
        if not body:
            raise ValueError("no cross-signing key to upload")

        def build(with_auth: AuthBody | None) -> Request:
            # Idempotent: see the module docstring.
            return Request(
                "POST",
                f"{CLIENT_V3}/keys/device_signing/upload",
                body=body if with_auth is None else with_auth,
                idempotent=True,
            )

        await send_with_password(self, build, ignore_body, body, password)

    async def upload_signatures(
        self, signed: Mapping[str, Mapping[str, Mapping[str, Any]]]
    ) -> SignaturesUploadResponse:
        """``POST /keys/signatures/upload``: ``signed`` maps a user id to a key id (a
        device id, or a master key's unpadded base64 public key) to the object as
        the server holds it, plus the new signature(s) in its ``signatures``.

        The answer's ``failures`` holds what the server refused, per user and key
        id; a signature it took is absent from it.
        """
        body = {user: dict(keys) for user, keys in signed.items()}
        request = Request("POST", f"{CLIENT_V3}/keys/signatures/upload", body=body, idempotent=True)
        return await self.send(request, decode_signatures_upload)
