"""GroupSessions.export_inbound: an inbound session as a key backup carries it."""

from __future__ import annotations

import vodozemac
from test_megolm import ALICE_CURVE, ALICE_ED, PICKLE_KEY, ROOM, Sender, forwarded, receiver_with

from matrix_crypto.megolm import GroupSessions


def test_an_exported_session_decrypts_what_the_original_does() -> None:
    sender = Sender()
    sessions = receiver_with(sender)
    first = sender.encrypt("before the export")

    [key] = sessions.inbound_keys()
    assert key == (ROOM, ALICE_CURVE, sender.session_id)
    exported = sessions.export_inbound(*key)
    assert exported is not None
    assert (exported.room_id, exported.session_id) == (ROOM, sender.session_id)
    assert (exported.sender_curve25519, exported.sender_claimed_ed25519) == (ALICE_CURVE, ALICE_ED)
    assert exported.trusted
    assert exported.first_known_index == 0
    assert exported.session_key not in repr(exported)

    # Imported elsewhere (as a restore from backup would), it reads the same messages.
    restored = vodozemac.InboundGroupSession.import_session(
        vodozemac.ExportedSessionKey(exported.session_key)
    )
    plaintext = restored.decrypt(vodozemac.MegolmMessage.from_base64(first["ciphertext"]))
    assert b"before the export" in plaintext.plaintext


def test_a_forwarded_session_exports_untrusted_from_its_own_first_index() -> None:
    sender = Sender()
    for _ in range(3):
        sender.encrypt("moves the ratchet")
    sessions = GroupSessions(PICKLE_KEY)
    outcome = sessions.add_forwarded_room_key(
        forwarded(sender, index=3), forwarder_curve25519="ForwarderCurve"
    )
    assert outcome.stored, outcome
    exported = sessions.export_inbound(ROOM, ALICE_CURVE, sender.session_id)
    assert exported is not None
    assert not exported.trusted
    assert exported.first_known_index == 3


def test_an_unknown_session_exports_nothing() -> None:
    sessions = GroupSessions(PICKLE_KEY)
    assert sessions.inbound_keys() == []
    assert sessions.export_inbound(ROOM, ALICE_CURVE, "no such session") is None
