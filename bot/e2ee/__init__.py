"""End-to-end encryption for the bot: the I/O around `matrix_crypto`'s machine.

`matrix_crypto` knows the protocol and nothing of chats; this package feeds it the
sync, sends the requests it asks for, keeps its state in the store (in the sync
token's transaction where the server would re-deliver), decrypts inbox items and
encrypts what the bot sends into encrypted rooms.
"""
