"""How long the bot waits for a backend: every default and bound, in one place.

Two layers, one style each:

* The handler gives one answer `BACKEND_TIMEOUT_S` in all (``bot.backend_timeout_s``),
  retries included and the wait for a slot not counted: one `trio.fail_after` around
  the call, the same for every backend that waits on something (`bot.handler`); past
  it the user is told the answer took too long.
* Each HTTP backend bounds one attempt itself, so that it can retry within that: the
  model server may stay silent `MODEL_REQUEST_TIMEOUT_S` at a time (its whole answer
  within `MODEL_ANSWER_CEILING_S`), and the webhook answers each attempt within
  `WEBHOOK_TIMEOUT_S`.
"""

from __future__ import annotations

__all__ = [
    "BACKEND_TIMEOUT_S",
    "MODEL_ANSWER_CEILING_S",
    "MODEL_REQUEST_TIMEOUT_S",
    "WEBHOOK_TIMEOUT_S",
]

BACKEND_TIMEOUT_S = 300.0
"""The default of ``bot.backend_timeout_s``: the longest one answer may take."""
MODEL_ANSWER_CEILING_S = 3600.0
"""The longest one model answer may take, streamed or not, and so the most
``bot.backend_timeout_s`` may be set to (the handler's deadline normally comes first)."""
MODEL_REQUEST_TIMEOUT_S = 120.0
"""The default of ``model.request_timeout_s``: the longest the model server may stay
silent, before its answer starts and between two pieces of it."""
WEBHOOK_TIMEOUT_S = 30.0
"""The default of ``webhook.timeout_s``: the longest one webhook attempt may take."""
