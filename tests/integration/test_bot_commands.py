"""The chat commands against a real Synapse, driven by people with their own accounts.

``!new``, ``!rename``, ``!status``, ``!chats``, ``!archive``/``!unarchive`` and
``!help``; who may change a chat; how bad input is refused; what survives losing
the local store; and what the bot says in encrypted rooms with end-to-end encryption
turned off (``BOT_E2EE=off``; with it on, see test_e2ee_bot.py).
"""

from __future__ import annotations

import html
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from bot.chats import CHAT_MARKER, MAX_TITLE, SPACE_MARKER
from bot.invites import GREETING
from bot.runtime import run_bot
from bot_harness import Person, bot_settings, replies_to, running_bot
from command_helpers import (
    ask,
    bot_client,
    linked_room,
    pending_invites,
    reply_to,
    send_and_wait,
    start_chat,
)
from conftest import MakeUser
from matrix_api import MatrixClient, NotFound, RetryPolicy, StateEventSpec, new_txn_id
from matrix_api.h11_transport import H11Transport
from matrix_api.models import RoomID
from matrix_api.testing.synapse import SynapseServer

MEGOLM = "m.megolm.v1.aes-sha2"
FAKE_CIPHERTEXT = {
    "algorithm": MEGOLM,
    "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg2yyOwAtHaZTwyNg37afzg8f3r9IsN9r",
    "session_id": "x",
    "sender_key": "y",
    "device_id": "D",
}
CANNOT_READ = "cannot read encrypted messages"


@pytest.fixture
async def bob(synapse: SynapseServer, make_user: MakeUser):  # type: ignore[no-untyped-def]
    person = Person(synapse, make_user("bob"))
    yield person
    await person.aclose()


async def _spaces_of(as_bot: MatrixClient) -> list[RoomID]:
    """The rooms the bot is in that carry its Space marker."""
    spaces = []
    for room_id in await as_bot.joined_rooms():
        try:
            await as_bot.get_room_account_data(room_id, SPACE_MARKER)
        except NotFound:
            continue
        spaces.append(room_id)
    return spaces


async def _new_chat(person: Person, in_room: RoomID, bot_id: str, title: str) -> RoomID:
    """``!new title`` in ``in_room``; the person joins the linked room."""
    reply = await ask(person, in_room, bot_id, f"!new {title}")
    room_id = linked_room(reply)
    await person.client.join_room(room_id)
    return room_id


def _link(room_id: RoomID, server: str) -> str:
    """The link the bot writes for a room."""
    return f"https://matrix.to/#/{room_id}?via={server}"


async def _wait_a_little(person: Person, seconds: float = 2.0) -> None:
    """Keep syncing for ``seconds``, so that a late answer would be seen."""
    await person.sync_once(timeout_ms=int(seconds * 1000))


class _MarkerWritesFail(httpx.AsyncBaseTransport):
    """Synapse, except that once armed, the next ``times`` chat-marker writes never
    reach it."""

    def __init__(self) -> None:
        self._inner = H11Transport()
        self.times = 0
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if (
            self.times
            and request.method == "PUT"
            and request.url.path.endswith(f"/account_data/{CHAT_MARKER}")
        ):
            self.times -= 1
            self.refused += 1
            raise httpx.ConnectError("refused by the test")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_new_failing_after_the_room_is_made_is_finished_later_not_repeated(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    transport = _MarkerWritesFail()
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            runtime = await nursery.start(partial(run_bot, settings, transport=transport))
            chat_room = await start_chat(alice, bot)
            # Every try of one marker write fails: the command fails after createRoom
            # with an error that may pass, and the dispatcher runs it again later.
            transport.times = RetryPolicy().max_attempts
            _, reply = await send_and_wait(
                alice, chat_room, bot, {"msgtype": "m.text", "body": "!new Plans"}, timeout=60
            )
            runtime.request_stop()

    assert transport.refused == RetryPolicy().max_attempts
    room_id = linked_room(reply)  # the success reply, with the link
    space_id = runtime._store.space_for(alice.user.user_id)
    assert await pending_invites(alice) == {room_id, space_id}  # one room, not two
    resumed = [entry["room_id"] for entry in logs if entry["event"] == "chat_creation_resumed"]
    assert resumed == [room_id]
    assert "job_retry_later" in [entry["event"] for entry in logs]
    chat = runtime._store.chat_for_room(room_id)
    assert chat is not None
    assert chat.title == "Plans"


async def test_new_creates_a_named_room_in_the_users_space(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    me = alice.user.user_id
    server = synapse.server_name
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime, bot_client(synapse, bot_user) as as_bot:
        chat_room = await start_chat(alice, bot)
        reply = await ask(alice, chat_room, bot, "!new Project X")
        assert reply.content["msgtype"] == "m.notice"
        assert "<a href=" in reply.content["formatted_body"]
        room_id = linked_room(reply)
        assert room_id != chat_room
        space_id = runtime._store.space_for(me)
        assert space_id is not None
        assert {room_id, space_id} <= await pending_invites(alice)

        await alice.client.join_room(room_id)
        await alice.client.join_room(space_id)
        assert (await alice.client.get_state_event(room_id, "m.room.name"))["name"] == "Project X"
        create = await alice.client.get_state_event(space_id, "m.room.create")
        assert create.get("type") == "m.space"
        child = await alice.client.get_state_event(space_id, "m.space.child", room_id)
        assert child == {"via": [server]}
        parent = await alice.client.get_state_event(room_id, "m.space.parent", space_id)
        assert parent == {"via": [server], "canonical": True}
        hierarchy = await alice.client.space_hierarchy(space_id)
        assert hierarchy.rooms[0].room_id == space_id
        assert room_id in [room.room_id for room in hierarchy.rooms]

        chat = runtime._store.chat_for_room(room_id)
        assert chat is not None
        marker = await as_bot.get_room_account_data(room_id, CHAT_MARKER)
        assert marker["chat_id"] == chat.chat_id
        assert marker["owner"] == me
        assert marker["title"] == "Project X"
        assert marker["archived"] is False
        space_marker = await as_bot.get_room_account_data(space_id, SPACE_MARKER)
        assert space_marker["owner"] == me

        # A second chat goes into the same Space; no second Space is made.
        second = linked_room(await ask(alice, chat_room, bot, "!new Second"))
        assert second not in (room_id, chat_room)
        assert runtime._store.spaces() == {me: space_id}
        assert await _spaces_of(as_bot) == [space_id]
        assert await pending_invites(alice) == {second}
        parent = await as_bot.get_state_event(second, "m.space.parent", space_id)
        assert parent == {"via": [server], "canonical": True}
        child = await alice.client.get_state_event(space_id, "m.space.child", second)
        assert child == {"via": [server]}


async def test_an_invited_room_keeps_its_name_and_joins_the_owners_space(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime:
        first = await start_chat(alice, bot, name="Holiday plans")
        chat = runtime._store.chat_for_room(first)
        assert chat is not None
        assert chat.title == "Holiday plans"
        assert chat.space_id is None  # Alice has no Space yet: the bot makes none for this

        await ask(alice, first, bot, "!new Work")  # makes Alice's Space
        space_id = runtime._store.space_for(alice.user.user_id)
        assert space_id is not None
        await alice.client.join_room(space_id)

        second = await start_chat(alice, bot, name="Recipes")
        chat = runtime._store.chat_for_room(second)
        assert chat is not None
        assert (chat.title, chat.space_id) == ("Recipes", space_id)
        child = await alice.client.get_state_event(space_id, "m.space.child", second)
        assert child == {"via": [synapse.server_name]}
        hierarchy = await alice.client.space_hierarchy(space_id)
        assert second in [room.room_id for room in hierarchy.rooms]


async def test_rename_status_and_chats(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    server = synapse.server_name
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime, bot_client(synapse, bot_user) as as_bot:
        chat_room = await start_chat(alice, bot)
        project = await _new_chat(alice, chat_room, bot, "Project X")

        reply = await ask(alice, project, bot, "!rename New title")
        assert "New title" in reply.content["body"]
        name = await alice.client.get_state_event(project, "m.room.name")
        assert name["name"] == "New title"
        marker = await as_bot.get_room_account_data(project, CHAT_MARKER)
        assert marker["title"] == "New title"
        status = await ask(alice, project, bot, "!status")
        assert "Title: New title" in status.content["body"].splitlines()
        assert "Archived: no" in status.content["body"].splitlines()

        other = await _new_chat(alice, chat_room, bot, "Other")
        assert "Archived" in (await ask(alice, other, bot, "!archive")).content["body"]

        listing = await ask(alice, chat_room, bot, "!chats")
    first = runtime._store.chat_for_room(chat_room)
    assert first is not None
    body = listing.content["body"]
    lines = body.splitlines()
    assert lines[0] == "Your chats (3):"

    def link(room: RoomID) -> str:
        return _link(room, server)

    assert lines[1:] == [
        f"• {first.title}: {link(chat_room)}",
        f"• New title: {link(project)}",
        f"• Other (archived): {link(other)}",
    ]
    formatted = listing.content["formatted_body"]
    assert f'<a href="{link(project)}">New title</a></li>' in formatted
    assert f'<a href="{link(other)}">Other</a> (archived)</li>' in formatted
    assert f'<a href="{link(chat_room)}">{html.escape(first.title)}</a></li>' in formatted


async def test_archive_stops_answers_and_unlinks_until_unarchive(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    server = synapse.server_name
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime, bot_client(synapse, bot_user) as as_bot:
        chat_room = await start_chat(alice, bot)
        project = await _new_chat(alice, chat_room, bot, "Project X")
        space_id = runtime._store.space_for(alice.user.user_id)
        assert space_id is not None
        await alice.client.join_room(space_id)
        assert (await ask(alice, project, bot, "before")).content["body"] == "before"

        archived = await ask(alice, project, bot, "!archive")
        assert "!unarchive" in archived.content["body"]
        ignored = [await alice.say(project, f"are you there? {i}") for i in range(2)]
        # Per-room order: once this is answered, the messages before it were handled.
        status = await ask(alice, project, bot, "!status")
        assert "Archived: yes" in status.content["body"].splitlines()
        again = await ask(alice, project, bot, "!archive")
        assert "already archived" in again.content["body"]
        await _wait_a_little(alice)
        for event_id in ignored:
            assert reply_to(alice, project, bot, event_id) is None
        assert await alice.client.get_state_event(space_id, "m.space.child", project) == {}
        hierarchy = await alice.client.space_hierarchy(space_id)
        assert project not in [room.room_id for room in hierarchy.rooms]
        marker = await as_bot.get_room_account_data(project, CHAT_MARKER)
        assert marker["archived"] is True

        unarchived = await ask(alice, project, bot, "!unarchive")
        assert "Unarchived" in unarchived.content["body"]
        child = await alice.client.get_state_event(space_id, "m.space.child", project)
        assert child == {"via": [server]}
        hierarchy = await alice.client.space_hierarchy(space_id)
        assert project in [room.room_id for room in hierarchy.rooms]
        marker = await as_bot.get_room_account_data(project, CHAT_MARKER)
        assert marker["archived"] is False
        assert (await ask(alice, project, bot, "back again")).content["body"] == "back again"
        # What was said while archived stays unanswered.
        for event_id in ignored:
            assert reply_to(alice, project, bot, event_id) is None


async def test_chats_survive_losing_the_store(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    me = alice.user.user_id
    server = synapse.server_name
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime:
        chat_room = await start_chat(alice, bot)
        alpha = await _new_chat(alice, chat_room, bot, "Alpha")
        beta = await _new_chat(alice, chat_room, bot, "Beta")
        await ask(alice, beta, bot, "!rename Beta renamed")
        await ask(alice, alpha, bot, "!archive")
        space_id = runtime._store.space_for(me)
        chats_before = {chat.room_id: chat for chat in runtime._store.chats()}
    assert space_id is not None
    assert set(chats_before) == {chat_room, alpha, beta}

    removed = list(tmp_path.glob("store.sqlite3*"))
    assert removed
    for path in removed:
        path.unlink()

    with capture_logs() as logs:
        async with running_bot(settings) as runtime, bot_client(synapse, bot_user) as as_bot:
            assert {chat.room_id: chat for chat in runtime._store.chats()} == chats_before
            assert runtime._store.spaces() == {me: space_id}
            listing = await ask(alice, chat_room, bot, "!chats")
            # Still archived: no answer here, but commands still work.
            ignored = await alice.say(alpha, "hello?")
            status = await ask(alice, alpha, bot, "!status")
            gamma = linked_room(await ask(alice, chat_room, bot, "!new Gamma"))
            parent = await as_bot.get_state_event(gamma, "m.space.parent", space_id)
            assert parent["canonical"] is True
            child = await as_bot.get_state_event(space_id, "m.space.child", gamma)
            assert child == {"via": [server]}
            assert runtime._store.spaces() == {me: space_id}
            assert await _spaces_of(as_bot) == [space_id]
            await _wait_a_little(alice, 1.0)

    report = next(e for e in logs if e["event"] == "matrix_reconcile_complete")
    assert report["restored"] == 3
    assert report["spaces"] == 1
    assert report["skipped"] == 0
    assert report["conflicts"] == 0
    assert "Archived: yes" in status.content["body"].splitlines()
    assert reply_to(alice, alpha, bot, ignored) is None

    def link(room: RoomID) -> str:
        return _link(room, server)

    assert listing.content["body"].splitlines()[1:] == [
        f"• {chats_before[chat_room].title}: {link(chat_room)}",
        f"• Alpha (archived): {link(alpha)}",
        f"• Beta renamed: {link(beta)}",
    ]
    # The new chat's invite came alone: no second Space was offered.
    assert gamma in await pending_invites(alice)
    assert space_id in await pending_invites(alice)  # never joined in this test
    assert len(await pending_invites(alice)) == 2


async def test_only_the_owner_may_change_a_chat(
    synapse: SynapseServer,
    make_user: MakeUser,
    alice: Person,
    bob: Person,
    tmp_path: Path,
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime, bot_client(synapse, bot_user) as as_bot:
        chat_room = await start_chat(alice, bot)
        project = await _new_chat(alice, chat_room, bot, "Project X")
        await alice.client.invite_user(project, bob.user.user_id)
        await bob.client.join_room(project)
        chat_before = runtime._store.chat_for_room(project)

        for command in ("!rename hacked", "!archive"):
            refusal = await ask(bob, project, bot, command)
            assert "only the owner" in refusal.content["body"], command
        status = await ask(bob, project, bot, "!status")
        help_reply = await ask(bob, project, bot, "!help")
        mine = await ask(bob, project, bot, "!chats")

        assert runtime._store.chat_for_room(project) == chat_before
        name = await alice.client.get_state_event(project, "m.room.name")
        marker = await as_bot.get_room_account_data(project, CHAT_MARKER)
    assert name["name"] == "Project X"
    assert marker["title"] == "Project X"
    assert marker["archived"] is False
    lines = status.content["body"].splitlines()
    assert "Title: Project X" in lines
    assert f"Owner: {alice.user.user_id}" in lines
    assert "Archived: no" in lines
    for command in ("!new", "!rename", "!chats", "!archive", "!unarchive", "!status", "!help"):
        assert command in help_reply.content["body"]
    assert "no chats yet" in mine.content["body"]


async def test_bad_input_gets_specific_hints_and_changes_nothing(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime, bot_client(synapse, bot_user) as as_bot:
        chat_room = await start_chat(alice, bot)
        project = await _new_chat(alice, chat_room, bot, "Project X")

        unknown = await ask(alice, project, bot, "!frobnicate now")
        assert "!frobnicate" in unknown.content["body"]
        assert "!help" in unknown.content["body"]
        no_title = await ask(alice, project, bot, "!rename")
        assert "!rename <title>" in no_title.content["body"]
        bidi = await ask(alice, project, bot, "!rename abc\u202edcba")
        assert "direction" in bidi.content["body"]
        assert "U+202E" in bidi.content["body"]
        invisible = await ask(alice, project, bot, "!rename ad\u200bmin\U000e0041")
        assert "U+200B" in invisible.content["body"]
        too_long = await ask(alice, project, bot, "!rename " + "x" * 300)
        assert "300" in too_long.content["body"]
        assert str(MAX_TITLE) in too_long.content["body"]
        for refusal in (bidi, invisible, too_long):
            assert "Renamed" not in refusal.content["body"]
        # A new chat with a bad title is not created at all.
        refused_new = await ask(alice, chat_room, bot, "!new abc\u202edcba")
        assert "direction" in refused_new.content["body"]
        assert "formatted_body" not in refused_new.content

        name = await alice.client.get_state_event(project, "m.room.name")
        assert name["name"] == "Project X"
        chat = runtime._store.chat_for_room(project)
        assert chat is not None
        assert chat.title == "Project X"
        assert len(runtime._store.chats()) == 2

        tagged = await ask(alice, project, bot, "!rename <b>x</b>")
        formatted = tagged.content["formatted_body"]
        assert "&lt;b&gt;x&lt;/b&gt;" in formatted
        assert "<b>x</b>" not in formatted
        name = await alice.client.get_state_event(project, "m.room.name")
        assert name["name"] == "<b>x</b>"
        marker = await as_bot.get_room_account_data(project, CHAT_MARKER)
        assert marker["title"] == "<b>x</b>"
        status = await ask(alice, project, bot, "!status")
        assert "Title: <b>x</b>" in status.content["body"].splitlines()
        assert "&lt;b&gt;x&lt;/b&gt;" in status.content["formatted_body"]
        assert "<b>x</b>" not in status.content["formatted_body"]

        created = await ask(alice, chat_room, bot, "!new <script>alert(1)</script>")
        assert "&lt;script&gt;" in created.content["formatted_body"]
        assert "<script" not in created.content["formatted_body"]
        listing = await ask(alice, chat_room, bot, "!chats")
        assert "<script" not in listing.content["formatted_body"]
        assert "&lt;b&gt;x&lt;/b&gt;" in listing.content["formatted_body"]


async def test_rename_refused_by_the_homeserver_changes_nothing(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime, bot_client(synapse, bot_user) as as_bot:
        # Alice's own room: the bot joined it with power level 0 and cannot rename it.
        chat_room = await start_chat(alice, bot, name="alice's room")
        before = runtime._store.chat_for_room(chat_room)
        reply = await ask(alice, chat_room, bot, "!rename Mine now")
        assert "did not work" in reply.content["body"]
        name = await alice.client.get_state_event(chat_room, "m.room.name")
        assert name["name"] == "alice's room"
        assert runtime._store.chat_for_room(chat_room) == before
        marker = await as_bot.get_room_account_data(chat_room, CHAT_MARKER)
    assert before is not None
    assert marker["title"] == before.title


async def test_invited_into_an_encrypted_room_the_bot_offers_an_unencrypted_chat(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    me = alice.user.user_id
    server = synapse.server_name
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3", e2ee=False)
    async with running_bot(settings) as runtime, bot_client(synapse, bot_user) as as_bot:
        secret = await alice.client.create_room(
            name="secret",
            invite=[bot],
            preset="private_chat",
            initial_state=[StateEventSpec("m.room.encryption", {"algorithm": MEGOLM})],
        )
        await alice.wait_until(
            lambda: any(CANNOT_READ in e.content["body"] for e in alice.bot_notices(secret, bot)),
            what="the notice about encryption",
        )
        [offer] = alice.bot_notices(secret, bot)
        assert offer.type == "m.room.message"
        assert offer.content["msgtype"] == "m.notice"
        assert GREETING not in offer.content["body"]
        way_out = linked_room(offer)
        assert way_out != secret
        assert way_out in await pending_invites(alice)
        space_id = runtime._store.space_for(me)
        assert space_id is not None
        child = await as_bot.get_state_event(space_id, "m.space.child", way_out)
        assert child == {"via": [server]}
        await alice.client.join_room(way_out)
        # The way out is not encrypted, and the bot answers there.
        with pytest.raises(NotFound):
            await alice.client.get_state_event(way_out, "m.room.encryption")
        assert (await ask(alice, way_out, bot, "plain words")).content["body"] == "plain words"

        # An encrypted message in that room links the same way out, and nothing is echoed.
        sent, reply = await send_and_wait(
            alice, secret, bot, FAKE_CIPHERTEXT, event_type="m.room.encrypted"
        )
        assert CANNOT_READ in reply.content["body"]
        assert linked_room(reply) == way_out
        assert FAKE_CIPHERTEXT["ciphertext"] not in str(reply.content)
        await _wait_a_little(alice, 1.0)
        answers = [e for e in alice.bot_notices(secret, bot) if sent in replies_to([e])]
        assert [e.event_id for e in answers] == [reply.event_id]


async def test_encrypted_message_in_a_plain_chat_gets_the_notice_not_an_echo(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    me = alice.user.user_id
    server = synapse.server_name
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3", e2ee=False)
    async with running_bot(settings) as runtime, bot_client(synapse, bot_user) as as_bot:
        chat_room = await start_chat(alice, bot)
        first, reply = await send_and_wait(
            alice, chat_room, bot, FAKE_CIPHERTEXT, event_type="m.room.encrypted"
        )
        assert reply.content["msgtype"] == "m.notice"
        assert CANNOT_READ in reply.content["body"]
        way_out = linked_room(reply)
        assert way_out != chat_room
        assert way_out in await pending_invites(alice)
        space_id = runtime._store.space_for(me)
        assert space_id is not None
        parent = await as_bot.get_state_event(way_out, "m.space.parent", space_id)
        assert parent == {"via": [server], "canonical": True}
        marker = await as_bot.get_room_account_data(way_out, CHAT_MARKER)
        assert marker["owner"] == me

        # Again: the same way out, not a second room.
        second, again = await send_and_wait(
            alice, chat_room, bot, FAKE_CIPHERTEXT, event_type="m.room.encrypted"
        )
        assert linked_room(again) == way_out
        # A plain message afterwards is a barrier: everything before it was handled.
        assert (await ask(alice, chat_room, bot, "still here")).content["body"] == "still here"
        await _wait_a_little(alice, 1.0)
        notices = alice.bot_notices(chat_room, bot)
        for encrypted in (first, second):
            answers = [e for e in notices if encrypted in replies_to([e])]
            assert len(answers) == 1
            assert CANNOT_READ in answers[0].content["body"]
        for notice in notices:
            assert FAKE_CIPHERTEXT["ciphertext"] not in str(notice.content)
        assert len(runtime._store.chats()) == 2


async def test_the_way_out_is_reused_after_losing_the_store(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3", e2ee=False)
    async with running_bot(settings):
        chat_room = await start_chat(alice, bot)
        _, reply = await send_and_wait(
            alice, chat_room, bot, FAKE_CIPHERTEXT, event_type="m.room.encrypted"
        )
        way_out = linked_room(reply)
    for path in tmp_path.glob("store.sqlite3*"):
        path.unlink()
    async with running_bot(settings) as runtime:
        event_id = await alice.client.send_event(
            chat_room, "m.room.encrypted", FAKE_CIPHERTEXT, new_txn_id()
        )
        await alice.wait_until(
            lambda: reply_to(alice, chat_room, bot, event_id) is not None, what="the notice"
        )
        chats = len(runtime._store.chats())
    again = reply_to(alice, chat_room, bot, event_id)
    assert again is not None
    assert linked_room(again) == way_out
    assert chats == 2
