"""A small, typed Matrix client-server API client over httpx, for trio.

Nothing in this package knows about the bot built on it.
"""

from .client import MatrixClient
from .endpoints.messaging import new_txn_id
from .endpoints.rooms import StateEventSpec
from .errors import (
    BadResponse,
    Forbidden,
    InvalidRequest,
    LimitExceeded,
    MatrixAPIError,
    MatrixError,
    NetworkError,
    NotFound,
    ResponseLimitExceeded,
    TransportError,
    UnknownToken,
)
from .h11_transport import ResponseLimits
from .http import Request
from .retry import RetryPolicy

__all__ = [
    "BadResponse",
    "Forbidden",
    "InvalidRequest",
    "LimitExceeded",
    "MatrixAPIError",
    "MatrixClient",
    "MatrixError",
    "NetworkError",
    "NotFound",
    "Request",
    "ResponseLimitExceeded",
    "ResponseLimits",
    "RetryPolicy",
    "StateEventSpec",
    "TransportError",
    "UnknownToken",
    "new_txn_id",
]
