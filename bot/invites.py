"""Invites: join rooms that allowed users invite the bot to, and make them chats.

Who invited the bot is read from the invite's stripped state (`pick_invite`). That
state is mostly copied from the inviting server, which may put anything in it; the
one entry the bot's own homeserver vouches for is the invite event it appended
itself, last. An invite whose entries for the bot disagree, or whose state could
not all be read, is declined unread: the bot never guesses whose chat a room is.

The marker is written before the join, so a crash at any point is completed at the
next start: before the join, the invite is still pending (and shown again by the
full-state sync) and the marker already names the chat id to reuse; after the
join, reconciliation restores the chat from the marker.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from matrix_api import Forbidden, MatrixClient, NotFound
from matrix_api.models import RoomID, SkippedEvent, StrippedStateEvent

from .chats import (
    CHAT_MARKER,
    Chat,
    MarkerError,
    chat_from_marker,
    created_now_ms,
    new_chat_id,
    safe_title,
    write_marker,
)
from .commands import Reply
from .config import Settings
from .encryption import offer_unencrypted_chat
from .messages import notice, reply_txn_id
from .provisioning import link_to_space
from .store import InboxItem
from .store_api import BotStore

__all__ = ["InviteHandler", "PickedInvite", "pick_invite", "unreadable_invite_state"]

log = structlog.get_logger("bot.invites")

GREETING = (
    "Hello! This room is now a chat with the assistant. Write a message and I will answer here."
)
DECLINED_REASON = "This bot serves allowed users only."
AMBIGUOUS_REASON = "This invite could not be verified."

# Inviters named in an ambiguous invite's inbox item and log line: a forged state may
# hold thousands, and a user id is at most 255 bytes (the spec's limit).
MAX_CANDIDATES = 8
_MAX_USER_ID = 255


@dataclass(frozen=True, slots=True)
class PickedInvite:
    """What an invite's stripped state says about who invited the bot."""

    inviter: str
    """The sender of the invite the bot's homeserver appended (the last one for the
    bot); "" when none could be read."""
    ambiguous: str | None = None
    """Why the invite cannot be trusted (it is declined unread); None when it can."""
    candidates: tuple[str, ...] = ()
    """For an ambiguous invite: the senders of its invites for the bot, in order,
    each once (at most `MAX_CANDIDATES`, each at most 255 characters)."""


def pick_invite(
    invite_state: Sequence[StrippedStateEvent], bot_user_id: str, *, unreadable: int = 0
) -> PickedInvite | None:
    """Who invited ``bot_user_id``, from an invited room's stripped state. Pure.

    The homeserver appends the invite event itself after the state the inviting
    server supplied, so the last ``m.room.member`` entry for the bot is the invite.
    Any earlier invite for the bot from another sender is a forgery (or a state no
    server produces): the invite is then ambiguous. So is one whose last entry for
    the bot is not an invite, and one with ``unreadable`` entries (they did not
    decode: the real invite may be among them). None when the state holds nothing
    for the bot and nothing unreadable (an invite that is not for this user).
    ``membership`` may be any JSON value; only the string ``"invite"`` counts.
    """
    last_membership: object = None
    inviters: list[str] = []
    for stripped in invite_state:
        if stripped.type != "m.room.member" or stripped.state_key != bot_user_id:
            continue
        last_membership = stripped.content.get("membership")
        if last_membership == "invite":
            inviters.append(stripped.sender)
    if not inviters and not unreadable:
        return None
    last_is_invite = bool(inviters) and last_membership == "invite"
    inviter = inviters[-1] if last_is_invite else ""
    reason = None
    if unreadable:
        reason = f"{unreadable} invite state entries could not be read"
    elif not last_is_invite:
        reason = "the last membership for the bot is not an invite"
    elif any(sender != inviter for sender in inviters):
        reason = "the invites for the bot name different senders"
    if reason is None:
        return PickedInvite(inviter)
    return PickedInvite(inviter, reason, _distinct(inviters))


def _distinct(senders: Iterable[str]) -> tuple[str, ...]:
    seen: list[str] = []
    for sender in senders:
        shown = sender[:_MAX_USER_ID]
        if shown not in seen:
            seen.append(shown)
            if len(seen) == MAX_CANDIDATES:
                break
    return tuple(seen)


def unreadable_invite_state(
    skipped: Iterable[SkippedEvent], invited: Iterable[str]
) -> dict[str, int]:
    """How many stripped state entries of each of the ``invited`` rooms did not decode,
    from a sync's `SkippedEvent` records (room id -> count).

    A record names where it was: ``rooms.invite.<room id>.invite_state...``. Room ids
    and content keys are chosen by remote servers and may themselves hold
    ``.invite_state``, so each place it occurs is tried against the invited rooms; a
    record that could belong to several counts for each (declining is the safe side).
    """
    rooms = set(invited)
    counts: dict[str, int] = {}
    for record in skipped:
        rest = record.where.removeprefix("rooms.invite.")
        if rest == record.where:
            continue
        at = rest.find(".invite_state")
        while at >= 0:
            if rest[:at] in rooms:
                counts[rest[:at]] = counts.get(rest[:at], 0) + 1
            at = rest.find(".invite_state", at + 1)
    return counts


class InviteHandler:
    def __init__(self, client: MatrixClient, store: BotStore, settings: Settings) -> None:
        self._client = client
        self._store = store
        self._settings = settings
        self.reads_encrypted = False
        """Whether the bot reads encrypted rooms (then they are greeted like any other)."""

    async def handle(self, item: InboxItem) -> None:
        """Accept or decline the invite in ``item``; takes it out of the inbox."""
        room_id = item.room_id
        inviter = item.event.sender
        ambiguous = item.event.content.get("ambiguous")
        if ambiguous is not None:
            candidates = item.event.content.get("candidates")
            log.warning(
                "invite_declined",
                room_id=room_id,
                reason="ambiguous",
                detail=str(ambiguous),
                candidates=candidates if isinstance(candidates, list) else [],
            )
            await self._client.leave_room(room_id, reason=AMBIGUOUS_REASON)
            await self._store.discard(item)
            return
        if not self._settings.allowed.allows(inviter):
            log.warning("invite_declined", room_id=room_id, inviter=inviter, reason="not allowed")
            await self._client.leave_room(room_id, reason=DECLINED_REASON)
            await self._store.discard(item)
            return

        chat = self._store.chat_for_room(room_id) or await self._marked_chat(room_id)
        fresh = chat is None
        if chat is None:
            name = item.event.content.get("name")
            chat = Chat(
                chat_id=new_chat_id(),
                room_id=room_id,
                owner=inviter,
                title=(isinstance(name, str) and safe_title(name))
                or safe_title(f"Chat with {inviter}"),
                created_ts=created_now_ms(self._client),
                space_id=self._store.space_for(inviter),
            )
            await write_marker(self._client, chat)
        await self._client.join_room(room_id)
        if chat.space_id is not None and self._store.is_space(chat.space_id):
            # The room is the user's; the Space is the bot's: only the Space's side of
            # the link (m.space.child) is the bot's to write. Idempotent on a retry.
            await link_to_space(self._client, chat.space_id, room_id, self._settings.server_name)
        await self._store.apply_chats(put=[chat])
        if fresh:
            # A chat made just now has no history to rebuild from the room: its first
            # message need not page through /messages (a store lost later rebuilds).
            await self._store.replace_conversation(chat.chat_id, [])
        greeting = Reply(GREETING)
        if self.reads_encrypted:
            await self._learn_encryption(room_id)
        elif item.event.content.get("encrypted") is True:
            greeting = await offer_unencrypted_chat(
                self._client, self._store, room_id, inviter, self._settings.server_name
            )
        await self._client.send_event(
            room_id,
            "m.room.message",
            notice(greeting.body, formatted_body=greeting.html),
            txn_id=reply_txn_id(f"{room_id}/{chat.chat_id}", "greeting"),
        )
        await self._store.discard(item)
        log.info("invite_accepted", room_id=room_id, inviter=inviter, chat_id=chat.chat_id)

    async def _learn_encryption(self, room_id: RoomID) -> None:
        """Whether the room just joined is encrypted, from its state (the invite's
        stripped state is the inviting server's word, and the sync that will show the
        state may come after the greeting): so the greeting is never sent in the clear."""
        try:
            content = await self._client.get_state_event(room_id, "m.room.encryption")
        except NotFound:
            return
        if isinstance(content.get("algorithm"), str):
            await self._store.set_room_encryption(
                {room_id: json.dumps(content, separators=(",", ":"))}
            )

    async def _marked_chat(self, room_id: RoomID) -> Chat | None:
        """The chat an earlier, interrupted acceptance already recorded, if any."""
        try:
            content = await self._client.get_room_account_data(room_id, CHAT_MARKER)
        except (NotFound, Forbidden):
            return None
        try:
            return chat_from_marker(room_id, content)
        except MarkerError as exc:
            log.warning("invite_marker_unreadable", room_id=room_id, error=str(exc))
            return None
