"""User-interactive authentication (UIA) with the account password.

Some endpoints (replacing cross-signing keys, deleting a device, ...) first answer 401
with a challenge, ``{"flows": [{"stages": [...]}], "session": ..., "params": ...,
"completed": [...]}``, and want the same request again with an ``auth`` object that
completes a flow. This client completes one kind: a flow whose remaining stages are
``m.login.password`` alone.

The protocol part is sans-IO: `AuthChallenge.from_error` reads a challenge out of the
error a 401 became, and `PasswordAuth` decides what to send, at most once, raising an
`InteractiveAuthError` when it cannot go on. `send_with_password` is the small driver
over `HTTPCore` that endpoints use: first the request without ``auth``, then, if the
server asks, one retry with the password. It never loops: a server that asks again
after the password gets `AuthNotAccepted`, one that refuses it (401 ``M_FORBIDDEN``)
`PasswordRefused`.

The password is kept out of every repr, error message and log line: `PasswordAuth`
hides it in its repr, and the request body that carries it is an `AuthBody`, whose
repr (and so the `Request`'s) shows ``auth`` as hidden.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import BadResponse, MatrixAPIError, MatrixError, shown
from .http import HTTPCore, Request

__all__ = [
    "PASSWORD",
    "AuthBody",
    "AuthChallenge",
    "AuthFlowUnsupported",
    "AuthNotAccepted",
    "AuthRequired",
    "BadAuthChallenge",
    "InteractiveAuthError",
    "PasswordAuth",
    "PasswordRefused",
    "send_with_password",
]

T = TypeVar("T")

PASSWORD = "m.login.password"  # noqa: S105 (the stage's name, not a password)
# Bounds on what a challenge may hold: it is shown in error messages.
_MAX_FLOWS = 32
_MAX_STAGES = 16
_MAX_NAME = 128
_MAX_DESCRIPTION = 300


class InteractiveAuthError(MatrixAPIError):
    """User-interactive auth could not be completed.

    ``challenge`` is the server's last challenge, when it could be read; ``cause``
    (also ``__cause__``) is the error its 401 answer became.
    """

    def __init__(self, message: str, challenge: AuthChallenge | None = None) -> None:
        super().__init__(message)
        self.challenge = challenge


class BadAuthChallenge(InteractiveAuthError):
    """A 401 answer that is no usable challenge: no flows, a session that is not a
    string, or a body that could not be read."""


class AuthRequired(InteractiveAuthError):
    """The server asks for user-interactive auth and no password was given."""


class AuthFlowUnsupported(InteractiveAuthError):
    """None of the flows the server offers can be completed with a password alone
    (it wants SSO, OAuth, a captcha, the terms accepted, ...)."""


class PasswordRefused(InteractiveAuthError):
    """The server refused the password (401 ``M_FORBIDDEN``)."""


class AuthNotAccepted(InteractiveAuthError):
    """The server asked again after the password was sent, without saying it was
    wrong: the client does not try a second time."""


def _stage_names(raw: Any) -> tuple[str, ...] | None:
    if not isinstance(raw, list) or not raw or len(raw) > _MAX_STAGES:
        return None
    if not all(isinstance(stage, str) and 0 < len(stage) <= _MAX_NAME for stage in raw):
        return None
    return tuple(raw)


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """A server's 401 user-interactive auth answer, checked.

    ``flows`` keeps each well-formed flow (a non-empty list of stage names) in the
    server's order, malformed ones dropped; ``session`` is None when the server gave
    none (then none is sent back, as the spec says). ``errcode``/``error`` are set
    when the server also reports why the last attempt failed.
    """

    flows: tuple[tuple[str, ...], ...]
    session: str | None = None
    completed: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    errcode: str | None = None
    error: str | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> AuthChallenge:
        """Read a decoded 401 body; `BadAuthChallenge` when it offers no flow or its
        session is not a string."""
        raw_flows = body.get("flows")
        if not isinstance(raw_flows, list) or not raw_flows:
            raise BadAuthChallenge("the server's 401 answer offers no auth flows")
        flows = []
        for flow in raw_flows[:_MAX_FLOWS]:
            stages = _stage_names(flow.get("stages")) if isinstance(flow, dict) else None
            if stages is not None:
                flows.append(stages)
        if not flows:
            raise BadAuthChallenge("the server's 401 answer has no well-formed auth flow")
        session = body.get("session")
        if session is not None and not (isinstance(session, str) and 0 < len(session) <= 1024):
            raise BadAuthChallenge("the server's 401 answer has a session that is not a string")
        completed = _stage_names(body.get("completed")) or ()
        params = body.get("params")
        errcode = body.get("errcode")
        error = body.get("error")
        return cls(
            flows=tuple(flows),
            session=session,
            completed=completed,
            params=params if isinstance(params, dict) else {},
            errcode=errcode if isinstance(errcode, str) else None,
            error=error[: _MAX_NAME * 4] if isinstance(error, str) else None,
        )

    @classmethod
    def from_error(cls, error: MatrixAPIError) -> AuthChallenge | None:
        """The challenge a 401 answer carries, or None when ``error`` is not a 401
        with flows (an expired token, a plain ``M_FORBIDDEN``: for the caller).

        A 401 without an errcode reaches us as a `BadResponse` with only the start
        of its body kept (`http.py`); one cut there is a `BadAuthChallenge`.
        """
        if isinstance(error, MatrixError):
            if error.status != 401 or "flows" not in error.body:
                return None
            return cls.from_body(error.body)
        if isinstance(error, BadResponse) and error.status == 401:
            try:
                body = json.loads(error.body_excerpt)
            except ValueError:
                raise BadAuthChallenge(
                    "the server's 401 answer is not a readable auth challenge"
                    " (not JSON, or longer than the part kept of it)"
                ) from error
            if not isinstance(body, dict):
                raise BadAuthChallenge("the server's 401 answer is not a JSON object") from error
            return cls.from_body(body)
        return None

    def remaining(self) -> list[tuple[str, ...]]:
        """Each flow's stages not completed yet."""
        done = set(self.completed)
        return [tuple(stage for stage in flow if stage not in done) for flow in self.flows]

    def offers_password(self) -> bool:
        """Whether a flow is completed by ``m.login.password`` alone."""
        return (PASSWORD,) in self.remaining()

    def describe(self) -> str:
        """The flows offered, for an error message: ``m.login.sso | m.login.password``;
        the server's names escaped when not printable, and cut to `_MAX_DESCRIPTION`."""
        return shown(" | ".join(" + ".join(flow) for flow in self.flows), _MAX_DESCRIPTION)


@dataclass(slots=True)
class PasswordAuth:
    """Answers challenges with ``m.login.password`` for ``user_id``, once.

    Sans-IO: `respond` takes the server's challenge and returns the ``auth`` object to
    send, or raises an `InteractiveAuthError` saying why not. A second challenge
    after the password was sent ends it: refused (``M_FORBIDDEN``) or not accepted.
    """

    user_id: str
    password: str = field(repr=False)
    sent: bool = False

    def respond(self, challenge: AuthChallenge) -> dict[str, Any]:
        """The ``auth`` object answering ``challenge``; raises `refusal` when there is none."""
        if self.sent or not challenge.offers_password():
            raise self.refusal(challenge)
        self.sent = True
        auth: dict[str, Any] = {
            "type": PASSWORD,
            "identifier": {"type": "m.id.user", "user": self.user_id},
            "password": self.password,
        }
        if challenge.session is not None:
            auth["session"] = challenge.session
        return auth

    def refusal(self, challenge: AuthChallenge) -> InteractiveAuthError:
        """Why ``challenge`` ends the exchange: after the password, refused or not
        accepted; before it, no flow this client can do."""
        if self.sent:
            if challenge.errcode == "M_FORBIDDEN":
                return PasswordRefused(
                    f"the server refused the password for {self.user_id}", challenge
                )
            return AuthNotAccepted(
                "the server asked for auth again after the password was sent"
                f" (flows: {challenge.describe()}; completed: {list(challenge.completed)})",
                challenge,
            )
        return AuthFlowUnsupported(
            f"the server wants auth this client cannot do (flows: {challenge.describe()});"
            " only a flow of m.login.password alone is supported",
            challenge,
        )


class AuthBody(dict[str, Any]):
    """A request body holding an ``auth`` object: a dict (so it is sent as is) whose
    repr hides ``auth``, so a `Request` carrying a password prints without it."""

    def __repr__(self) -> str:
        shown = {key: ("<hidden>" if key == "auth" else value) for key, value in self.items()}
        return f"AuthBody({shown!r})"

    __str__ = __repr__


async def send_with_password(
    core: HTTPCore,
    build: Callable[[AuthBody | None], Request],
    decode: Callable[[bytes], T],
    body: Mapping[str, Any],
    password: str | None,
) -> T:
    """Send ``build(None)`` (``body`` without auth); when the server answers with a
    challenge, send ``build(body + auth)`` once with the password.

    ``build`` makes the `Request` for a body; each send is retried as the core's
    policy allows (a 429 waits, then the same body goes again). Raises
    `AuthRequired` (a challenge and no ``password``), `AuthFlowUnsupported`,
    `PasswordRefused`, `AuthNotAccepted`, `BadAuthChallenge`, or the request's own
    error when its 401 is no challenge.
    """
    try:
        return await core.send(build(None), decode)
    except MatrixAPIError as exc:
        challenge = AuthChallenge.from_error(exc)
        if challenge is None:
            raise
        if password is None:
            raise AuthRequired(
                f"the server asks for user-interactive auth (flows: {challenge.describe()})"
                " and no password was given",
                challenge,
            ) from exc
        auth = PasswordAuth(core.require_user_id(), password)
        if not challenge.offers_password():
            raise auth.refusal(challenge) from exc
        retry_body = AuthBody(body)
        retry_body["auth"] = auth.respond(challenge)
    try:
        return await core.send(build(retry_body), decode)
    except MatrixAPIError as exc:
        if isinstance(exc, MatrixError) and exc.status == 401 and exc.code == "M_FORBIDDEN":
            # Refused, whether or not the server sent its flows again.
            challenge = AuthChallenge(flows=(), errcode=exc.code, error=exc.message)
        else:
            challenge = AuthChallenge.from_error(exc)
        if challenge is None:
            raise
        raise auth.refusal(challenge) from exc
