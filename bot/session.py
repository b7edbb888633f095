"""Signing in as the bot, shared by the service and the maintenance commands."""

from __future__ import annotations

import structlog

from matrix_api import MatrixAPIError, MatrixClient, NetworkError, UnknownToken

from .config import Settings

__all__ = ["DEFAULT_DEVICE_ID", "AuthError", "authenticate", "log_in"]

log = structlog.get_logger("bot.session")

# Used when logging in with a password and no device id is configured or stored:
# one stable device keeps transaction ids (and so reply de-duplication) valid
# across restarts, even after the local store is lost.
DEFAULT_DEVICE_ID = "SURFACESBOT"


class AuthError(Exception):
    """The bot cannot sign in; the message says why, for the operator."""


async def authenticate(
    client: MatrixClient, settings: Settings, stored_device_id: str | None = None
) -> str | None:
    """Make ``client`` act as the configured bot user; returns its device id.

    With an access token it is checked (whoami) and must belong to the configured
    user; a rejected token falls back to the password when there is one.
    """
    if settings.access_token is not None:
        try:
            who = await client.whoami()
        except UnknownToken as exc:
            if settings.password is None:
                raise AuthError(
                    "the access token was rejected (M_UNKNOWN_TOKEN) and no password "
                    "is configured to log in again"
                ) from exc
            return await log_in(client, settings, stored_device_id)
        except NetworkError as exc:
            raise AuthError(f"homeserver unreachable: {exc}") from exc
        except MatrixAPIError as exc:
            raise AuthError(f"checking the access token failed: {exc}") from exc
        if who.user_id != settings.user_id:
            raise AuthError(f"the access token belongs to {who.user_id}, not to {settings.user_id}")
        return who.device_id
    return await log_in(client, settings, stored_device_id)


async def log_in(client: MatrixClient, settings: Settings, stored_device_id: str | None) -> str:
    """Password login, re-using the stored (or configured, or default) device id."""
    if settings.password is None:
        raise AuthError("no password configured to log in with")
    device_id = stored_device_id or settings.device_id or DEFAULT_DEVICE_ID
    try:
        login = await client.login_password(
            settings.user_id,
            settings.password,
            device_id=device_id,
            initial_device_display_name="surfaces-bot",
        )
    except NetworkError as exc:
        raise AuthError(f"homeserver unreachable: {exc}") from exc
    except MatrixAPIError as exc:
        raise AuthError(f"login as {settings.user_id} failed: {exc}") from exc
    log.info("logged_in", user_id=login.user_id, device_id=login.device_id)
    return login.device_id
