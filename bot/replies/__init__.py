"""How an answer reaches a room: rendering, the growing reply and its edits, history.

A backend (`bot.backends`) turns a chat's message into text and never talks to Matrix;
this package shows that text in the room (`reply_sink`, with `throttle` for the edits
and `markdown` for the HTML and the split into events) and reads a room's history back
into a conversation (`history`). Nothing is imported here: `markdown` brings
markdown-it, which only a streaming backend needs.
"""
