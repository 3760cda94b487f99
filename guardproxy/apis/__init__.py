"""The client APIs guardproxy serves, sans-IO: what a request, an event and an error look like on each
(``registry.py`` names them), with no HTTP server, no event loop and nothing of ``server/``. The server
and other fronts (gateways' processors, guardrail endpoints) drive them."""
