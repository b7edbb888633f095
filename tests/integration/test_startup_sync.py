"""The start-up sync against Synapse: ``timeout=0`` as designed, and never an answer
Synapse replays from its two-minute cache of identical /sync requests."""

from __future__ import annotations

from bot.intake import full_state_sync
from matrix_api.testing.synapse import SynapseServer
from matrix_helpers import MakeUser, client_for


async def test_a_restart_within_two_minutes_sees_what_changed_with_and_without_a_token(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    bot = make_user("bot")
    async with client_for(synapse, bot) as client:
        first = await full_state_sync(client, bot.user_id)
        made_after_first = await client.create_room()
        # A restart without a store: the same request as the first start, seconds later.
        again = await full_state_sync(client, bot.user_id)
        # A restart with a store: twice from the same token, a room made in between.
        from_token = await full_state_sync(client, bot.user_id, since=first.next_batch)
        made_after_token = await client.create_room()
        from_token_again = await full_state_sync(client, bot.user_id, since=first.next_batch)

    assert made_after_first not in first.rooms.join
    assert made_after_first in again.rooms.join
    assert made_after_token not in from_token.rooms.join
    assert made_after_token in from_token_again.rooms.join
