"""Server discovery and the session: versions, login, whoami, logout."""

from __future__ import annotations

import msgspec

from ..http import HTTPCore, Request, ignore_body
from ..models.responses import LoginResponse, Versions, WhoAmI

_versions = msgspec.json.Decoder(Versions).decode
_login = msgspec.json.Decoder(LoginResponse).decode
_whoami = msgspec.json.Decoder(WhoAmI).decode


class SessionEndpoints(HTTPCore):
    async def versions(self) -> Versions:
        """``GET /_matrix/client/versions``: the spec versions the server speaks."""
        return await self.send(
            Request("GET", "/_matrix/client/versions", authenticated=False), _versions
        )

    async def login_password(
        self,
        user: str,
        password: str,
        *,
        device_id: str | None = None,
        initial_device_display_name: str | None = None,
    ) -> LoginResponse:
        """Log in with ``m.login.password`` and use the new token from now on.

        Passing the ``device_id`` of an earlier session keeps that device, and so the
        scope of its transaction ids: a send retried after a re-login is still
        de-duplicated by the server.
        """
        body: dict[str, object] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        }
        if device_id is not None:
            body["device_id"] = device_id
        if initial_device_display_name is not None:
            body["initial_device_display_name"] = initial_device_display_name
        # Logging in twice with a fixed device id is harmless, so a retry is fine then.
        request = Request(
            "POST",
            "/_matrix/client/v3/login",
            body=body,
            authenticated=False,
            idempotent=device_id is not None,
        )
        login = await self.send(request, _login)
        self.set_access_token(login.access_token)
        self.user_id = login.user_id
        self.device_id = login.device_id
        return login

    async def whoami(self) -> WhoAmI:
        """Check the token; remembers the user and device it belongs to."""
        who = await self.send(Request("GET", "/_matrix/client/v3/account/whoami"), _whoami)
        self.user_id = who.user_id
        if who.device_id is not None:
            self.device_id = who.device_id
        return who

    async def logout(self) -> None:
        """Invalidate this token and its device; the client has no token afterwards."""
        await self.send(Request("POST", "/_matrix/client/v3/logout"), ignore_body)
        self.set_access_token(None)
