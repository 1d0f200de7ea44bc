"""Who may call the server: the API key (where it comes from, how it is checked) and the routes
it guards, the API documentation pages among them.

The key is read from a file (--api-key-file) or the environment (MINISTACK_API_KEY) rather than
the command line, where every local user can read it in `ps`; --api-key still works and says
so. It is compared in constant time (secrets.compare_digest) and never printed. Every route
needs it but /health, which load balancers and orchestrators poll without credentials, and
/metrics when the server is started with --public-metrics (Prometheus scrapers often carry none).

The documentation (/docs, /openapi.json) is served from this machine: Swagger UI's script and
stylesheet come from the fastapi-offline package's copy, not from a CDN (FastAPI's default),
so the page works offline and loads nothing from a third party.
"""

from __future__ import annotations

import os
import secrets
from importlib.resources import files
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from serve.api.errors import ApiError

ENV_VAR = "MINISTACK_API_KEY"
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")


def resolve_api_key(flag: str | None, key_file: str | None) -> str | None:
    """The key from --api-key-file, else --api-key, else $MINISTACK_API_KEY; None for an open
    server. SystemExit naming the flag for a file that cannot be read or holds no key."""
    if flag is not None and key_file is not None:
        raise SystemExit("ministack serve: give one of --api-key and --api-key-file")
    if key_file is not None:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as exc:
            raise SystemExit(f"ministack serve: --api-key-file {key_file!r}: {exc.strerror}") from None
        if not key:
            raise SystemExit(f"ministack serve: --api-key-file {key_file!r} holds no key")
        return key
    if flag is not None:
        print(
            f"ministack serve: --api-key is visible to every local user (ps); prefer --api-key-file or ${ENV_VAR}",
            flush=True,
        )
        return flag
    key = os.environ.get(ENV_VAR)
    if key is not None and not key.strip():
        raise SystemExit(f"ministack serve: ${ENV_VAR} is set but empty: set a key, or unset it to serve without one")
    return key.strip() if key is not None else None


def access_line(api_key: str | None, host: str, public_metrics: bool) -> str:
    """The start-up line's word on who may call: a server open to the network is said loudly."""
    if api_key is not None:
        return "API key required on every route but /health" + (" and /metrics" if public_metrics else "")
    if host in ("127.0.0.1", "localhost", "::1"):
        return "no API key (local connections only)"
    return (
        f"WARNING: no API key, and --host {host} takes connections from the network: anyone who reaches it may use it"
    )


def authorizer(api_key: str | None):
    """The dependency that refuses a request without `Authorization: Bearer <api_key>` (401)."""
    expected = api_key.encode() if api_key is not None else None

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        matches = secrets.compare_digest(token.strip().encode(), expected)  # constant time, whatever the scheme
        if scheme.lower() != "bearer" or not matches:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    return Depends(authorize)


def add_docs(app: FastAPI, guard) -> None:
    """/openapi.json and /docs (Swagger UI from local files), behind `guard`. The app must be
    built with openapi_url, docs_url and redoc_url None (FastAPI's own are unguarded and use a CDN)."""
    static = files("fastapi_offline") / "static"

    @app.get("/openapi.json", dependencies=[guard], include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=[guard], include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            swagger_js_url="/docs/swagger-ui-bundle.js",
            swagger_css_url="/docs/swagger-ui.css",
            swagger_favicon_url="data:,",
            swagger_ui_parameters={"validatorUrl": None},
        )

    for name in SWAGGER_FILES:

        def asset(path=static / name) -> FileResponse:
            return FileResponse(str(path))

        app.add_api_route(f"/docs/{name}", asset, methods=["GET"], dependencies=[guard], include_in_schema=False)
