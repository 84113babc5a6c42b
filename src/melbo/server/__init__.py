"""`melbo serve`: the auditor's workbench in a browser, over the catalogue (see README, "melbo serve").

    app = create_app("~/.local/share/melbo/catalog.sqlite")   # an ASGI app
    serve(catalog_path=None, port=8765)                       # uvicorn, until Ctrl-C

Modules: `app` (routes and pages), `live` (the model, the queue, streamed generation), `security` (host, token,
CSRF, CSP), `serving` (checks before listening, uvicorn).
"""

from melbo.server.app import create_app
from melbo.server.serving import serve

__all__ = ["create_app", "serve"]
