"""The one list of the client APIs guardproxy moderates. Routes, error shapes, where a client's key
travels and the ``policy_routes`` keys all come from here: a new API is one module and one line below.

Each API's module holds its wire format (a ``Wire``: request -> the guard's conversation and the upstream
body, upstream events -> text per output, released text / cut / redaction -> the client's events, its
error body and error event). Paths under an API's route (``/v1/messages/count_tokens``) are its too:
their errors come in its shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from guardproxy.apis import moderations
from guardproxy.apis.chat import ChatWire, CompletionWire
from guardproxy.apis.errors import Api
from guardproxy.apis.messages import MessagesWire
from guardproxy.apis.responses import ResponsesWire
from guardproxy.apis.wire import Wire


@dataclass(frozen=True)
class ApiSpec:
    name: str
    wire: type[Wire]
    key_header: Literal["authorization", "x-api-key"]  # where its clients carry their key

    @property
    def route(self) -> str:
        """The POST path it is served on, and its key in ``policy_routes``."""
        return self.wire.route

    @property
    def shape(self) -> Api:
        """Whose error bodies and events: OpenAI's or Anthropic's."""
        return self.wire.api

    def owns(self, path: str) -> bool:
        return path == self.route or path.startswith(self.route + "/")


APIS: tuple[ApiSpec, ...] = (
    ApiSpec("chat", ChatWire, "authorization"),
    ApiSpec("completions", CompletionWire, "authorization"),
    ApiSpec("responses", ResponsesWire, "authorization"),
    ApiSpec("messages", MessagesWire, "x-api-key"),
)


# The routes a policy applies to (``policy_routes`` entries match these): every moderated API's, and
# the moderation endpoint's.
POLICY_ROUTES: tuple[str, ...] = (*(spec.route for spec in APIS), moderations.ROUTE)


def api_for(path: str) -> ApiSpec | None:
    """The API a path belongs to (its route or a path under it), if any."""
    return next((spec for spec in APIS if spec.owns(path)), None)


def shape_for(path: str) -> Api:
    """The error shape a path's client expects: its API's, else OpenAI's (moderations, models, 404s)."""
    spec = api_for(path)
    return spec.shape if spec is not None else "openai"
