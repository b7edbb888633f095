"""`MatrixClient`: every endpoint the bot uses, over one `HTTPCore`."""

from __future__ import annotations

from .endpoints.account_data import AccountDataEndpoints
from .endpoints.cross_signing import CrossSigningEndpoints
from .endpoints.key_backup import KeyBackupEndpoints
from .endpoints.keys import KeysEndpoints
from .endpoints.media import MediaEndpoints
from .endpoints.messaging import MessagingEndpoints
from .endpoints.profile import ProfileEndpoints
from .endpoints.relations import RelationEndpoints
from .endpoints.rooms import RoomEndpoints
from .endpoints.session import SessionEndpoints
from .endpoints.spaces import SpaceEndpoints
from .endpoints.state import StateEndpoints
from .endpoints.sync import SyncEndpoints

__all__ = ["MatrixClient"]


class MatrixClient(
    SessionEndpoints,
    SyncEndpoints,
    RoomEndpoints,
    StateEndpoints,
    MessagingEndpoints,
    RelationEndpoints,
    AccountDataEndpoints,
    SpaceEndpoints,
    ProfileEndpoints,
    KeysEndpoints,
    CrossSigningEndpoints,
    KeyBackupEndpoints,
    MediaEndpoints,
):
    """A Matrix client-server API client for one user on one homeserver.

    >>> async with MatrixClient("http://127.0.0.1:8008", access_token=token) as client:
    ...     me = await client.whoami()

    Tests pass ``transport=httpx.MockTransport(handler)``. The client holds no tasks
    and no global state; the caller owns it and closes it.
    """
