"""The Matrix end-to-end encryption protocol (Olm and Megolm) on vodozemac.

Sans-IO, like `matrix_api`'s framing: sync input and server answers in, decrypted
events, outgoing requests and state changes out. No HTTP, no tasks, no files, and
nothing about chats; the caller persists what `OlmMachine.take_changes` hands out.
"""
