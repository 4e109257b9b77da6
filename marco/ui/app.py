"""The trace explorer as an ASGI app (Starlette): HTML views and the same data as JSON under ``/api/...``.

``create_app(settings)`` opens the store read-only (SQLite ``query_only``, a Postgres session with
``default_transaction_read_only``): the explorer cannot write, whatever a request asks. With a token set,
every request (pages, ``/api``, static files, the plot) needs it: ``Authorization: Bearer T``, the
``X-Marco-Token`` header, the ``marco_token`` cookie, or ``?token=T`` once (which sets the cookie).
Every request must also name a host the explorer serves (``UISettings.allowed_hosts``): DNS rebinding.
"""

from __future__ import annotations

import hmac
import ipaddress
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode

from sqlalchemy import Engine, event, select
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from marco.store import migrate
from marco.store.db import StoreError, check_connection, make_engine
from marco.store.models import Model
from marco.ui import pages
from marco.ui.queries import Explorer, SearchFilter
from marco.ui.tokens import TokenPieces
from marco.store.urls import safe_url

STATIC = Path(__file__).parent / "static"
TOKEN_ENV = "MARCO_UI_TOKEN"
ALLOWED_HOSTS_ENV = "MARCO_UI_ALLOWED_HOSTS"
COOKIE = "marco_token"
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; base-uri 'none'"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (where the explorer may run without a token)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class UISettings:
    """How ``marco ui`` serves: the store, where it listens, the token and whether one is required."""

    db: str
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    require_token: bool | None = None  # None: required exactly when ``host`` is not a loopback address
    decode_tokens: bool = True  # per-token text through the model's tokenizer (else colour blocks)
    # Host headers served (DNS rebinding: a page the operator opens must not reach /api under its own
    # name); None: the bound host, localhost, 127.0.0.1 and [::1]; "*" serves any
    allowed_hosts: tuple[str, ...] | None = None

    @property
    def hosts(self) -> frozenset[str]:
        """The Host names (without port, lower case; IPv6 in brackets) this explorer answers."""
        if self.allowed_hosts is not None:
            names = self.allowed_hosts
        else:
            names = (self.host, "localhost", "127.0.0.1", "[::1]")
        return frozenset(_host_name(n) for n in names if n.strip())

    @property
    def token_required(self) -> bool:
        return (not is_loopback(self.host)) if self.require_token is None else self.require_token

    def check(self) -> None:
        """Raise ``ValueError`` (what to do) when a token is required and missing."""
        if self.token_required and not self.token:
            raise ValueError(
                f"refusing to serve on {self.host} without a token: pass --token T or set ${TOKEN_ENV} "
                "(or bind to 127.0.0.1)"
            )


def read_only_engine(url: str) -> Engine:
    """An engine whose sessions cannot write: Postgres sessions start read-only, SQLite is ``query_only``."""
    probe = make_engine(url)
    path = probe.url.database
    if probe.dialect.name == "sqlite" and path and path != ":memory:" and not Path(path).exists():
        raise StoreError(f"no SQLite database at {path}: check --db (or run `marco run` first)")
    if probe.dialect.name == "postgresql":
        probe.dispose()
        engine = make_engine(url, connect_args={"connect_timeout": 5, "options": "-c default_transaction_read_only=on"})
    else:
        engine = probe

        @event.listens_for(engine, "connect")
        def _query_only(dbapi_conn: Any, _record: Any) -> None:  # after the WAL pragmas make_engine sets
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA query_only=ON")
            cur.close()

    check_connection(engine)
    if migrate.current_revision(engine) is None:
        raise StoreError(f"{safe_url(engine.url)} holds no marco store: "
                         "run `marco run` or `marco db upgrade` first")
    return engine


class TokenGate(BaseHTTPMiddleware):
    """Every request carries the token (header, cookie, or ``?token=`` which sets the cookie)."""

    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token

    def _ok(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate.encode(), self.token.encode())  # type: ignore[union-attr]

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        auth = request.headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        if self._ok(bearer) or self._ok(request.headers.get("x-marco-token")) or self._ok(request.cookies.get(COOKIE)):
            return await call_next(request)
        if self._ok(request.query_params.get("token")):
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            if request.url.path.startswith("/api/"):
                response = await call_next(request)
            else:  # drop the token from the address bar (and from links the user copies)
                response = RedirectResponse(request.url.path + ("?" + urlencode(rest) if rest else ""), status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            return response
        message = f"a token is required: open this address with ?token=T, or send 'Authorization: Bearer T' (${TOKEN_ENV})"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=401)
        return HTMLResponse(pages.error_page(401, message), status_code=401)


def _host_name(value: str) -> str:
    """``host[:port]`` -> ``host`` (lower case); an IPv6 address keeps (or gets) its brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    if value.count(":") > 1:  # a bare IPv6 address (a --host ::1, an allowed-hosts entry)
        return f"[{value}]"
    return value.split(":", 1)[0]


class HostGate(BaseHTTPMiddleware):
    """Refuse a request whose ``Host`` is not one this explorer serves (421): a DNS-rebinding page names
    its own domain, which resolves to 127.0.0.1 only after the browser checked the origin."""

    def __init__(self, app: Any, hosts: frozenset[str]) -> None:
        super().__init__(app)
        self.hosts = hosts

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if "*" in self.hosts or _host_name(request.headers.get("host", "")) in self.hosts:
            return await call_next(request)
        message = (f"this explorer does not serve the host {request.headers.get('host', '')!r}; open it as "
                   f"{' or '.join(sorted(self.hosts))}, or add the name with --allowed-host (${ALLOWED_HOSTS_ENV})")
        return _error(request, 421, message)


class SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response


def _flag(value: str | None) -> bool | None:
    if value in (None, ""):
        return None
    if value.lower() in ("yes", "true", "1", "correct"):
        return True
    if value.lower() in ("no", "false", "0", "wrong"):
        return False
    raise ValueError(f"correct must be yes or no, got {value!r}")


def _float(value: str | None, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}") from None


def search_filter(q: Any) -> SearchFilter:
    """The searches list's filters from query parameters (``ValueError`` says which one is wrong)."""
    try:
        page, per_page = int(q.get("page") or 1), int(q.get("per_page") or 50)
    except ValueError:
        raise ValueError("page and per_page must be whole numbers") from None
    return SearchFilter(
        batch=q.get("batch") or None, strategy=q.get("strategy") or None, lang=q.get("lang") or None,
        dataset=q.get("dataset") or None, correct=_flag(q.get("correct")),
        conf_min=_float(q.get("conf_min"), "conf_min"), conf_max=_float(q.get("conf_max"), "conf_max"),
        text=q.get("text") or None, page=page, per_page=per_page,
    )


def create_app(settings: UISettings, engine: Engine | None = None) -> Starlette:
    """The explorer over ``settings.db`` (or a given read-only ``engine``)."""
    settings.check()
    engine = engine or read_only_engine(settings.db)
    explorer = Explorer(engine)

    def checkpoint_path(spec: str) -> str | None:
        with explorer.sessions() as s:
            return s.scalars(select(Model.path).where(Model.spec == spec)).first()

    tokens = TokenPieces(enabled=settings.decode_tokens, checkpoint_path=checkpoint_path)
    if settings.decode_tokens:  # tokenizers load in the background while the first pages are served
        with explorer.sessions() as s:
            tokens.preload(list(s.scalars(select(Model.spec))))

    def report_of(batch_id: str) -> Any:
        from marco.report.tables import batch_report
        from marco.store.store import Store

        return batch_report(Store(engine), batch_id)

    def plot_png(batch_id: str) -> bytes:
        from marco.report.plot import plot_accuracy_vs_tokens

        rep = report_of(batch_id)
        with tempfile.TemporaryDirectory() as tmp:
            return plot_accuracy_vs_tokens(rep, Path(tmp) / "plot.png").read_bytes()

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def respond(request: Request, data: Any, page: Callable[[], str]) -> Response:
        if wants_json(request):
            return JSONResponse(data)
        return HTMLResponse(page())

    # ---------------------------------------------------------------- views (sync: run in the thread pool)
    def batches(request: Request) -> Response:
        data = explorer.batches()
        return respond(request, {"batches": data}, lambda: pages.batches_page(data))

    def batch(request: Request) -> Response:
        bid = explorer.resolve_batch(request.path_params["batch_id"])
        data = explorer.batch(bid)
        if wants_json(request):
            return JSONResponse(data)
        try:
            rep, err = report_of(bid), None
        except Exception as exc:  # a batch whose task cannot be scored here still shows its figures
            rep, err = None, str(exc).splitlines()[0]
        return HTMLResponse(pages.batch_page(data, rep, err))

    def batch_report(request: Request) -> Response:
        return JSONResponse(report_of(explorer.resolve_batch(request.path_params["batch_id"])).to_dict())

    def batch_plot(request: Request) -> Response:
        return Response(plot_png(explorer.resolve_batch(request.path_params["batch_id"])), media_type="image/png",
                        headers={"Cache-Control": "no-cache"})

    def searches(request: Request) -> Response:
        f = search_filter(request.query_params)
        data = explorer.searches(f)
        if wants_json(request):
            return JSONResponse(data)
        return HTMLResponse(pages.searches_page(data, explorer.facets(f.batch)))

    def facets(request: Request) -> Response:
        return JSONResponse(explorer.facets(request.query_params.get("batch") or None))

    def search(request: Request) -> Response:
        sid = request.path_params["search_id"]
        data = explorer.search(sid, tokens, wait_tokens=_flag(request.query_params.get("wait_tokens")) or False)
        related = explorer.related(sid)
        if wants_json(request):
            return JSONResponse({**data, "related": related})
        return HTMLResponse(pages.search_page(data, related))

    def related(request: Request) -> Response:
        return JSONResponse({"related": explorer.related(request.path_params["search_id"])})

    def compare(request: Request) -> Response:
        q = request.query_params
        a_id, b_id = q.get("a") or "", q.get("b") or ""
        if not (a_id and b_id):
            if wants_json(request):
                raise ValueError("give two searches: /api/compare?a=SEARCH&b=SEARCH")
            return HTMLResponse(pages.compare_page(None, None, {"a": a_id, "b": b_id}))
        a, b = explorer.search(a_id, tokens, wait_tokens=False), explorer.search(b_id, tokens, wait_tokens=False)
        return respond(request, {"a": a, "b": b}, lambda: pages.compare_page(a, b, {"a": a_id, "b": b_id}))

    def node(request: Request) -> Response:
        nid = request.path_params["node_id"]
        sid = explorer.node_search(nid)
        url = f"/search/{sid}#node-{nid}"
        if wants_json(request):
            data = explorer.search(sid, tokens, wait_tokens=False)
            found = next(n for n in data["nodes"] if n["id"] == nid)
            return JSONResponse({"search_id": sid, "url": url, "node": found})
        return RedirectResponse(url, status_code=302)

    def health(_request: Request) -> Response:
        return PlainTextResponse("ok")

    async def store_error(request: Request, exc: Exception) -> Response:
        return _error(request, 404, str(exc))

    async def value_error(request: Request, exc: Exception) -> Response:
        return _error(request, 400, str(exc))

    routes = [
        Route("/", batches), Route("/batch/{batch_id}", batch), Route("/batch/{batch_id}/plot.png", batch_plot),
        Route("/searches", searches), Route("/search/{search_id}", search), Route("/compare", compare),
        Route("/node/{node_id}", node), Route("/healthz", health),
        Route("/api/batches", batches), Route("/api/batches/{batch_id}", batch),
        Route("/api/batches/{batch_id}/report", batch_report), Route("/api/batches/{batch_id}/plot.png", batch_plot),
        Route("/api/searches", searches), Route("/api/facets", facets), Route("/api/searches/{search_id}", search),
        Route("/api/searches/{search_id}/related", related), Route("/api/compare", compare),
        Route("/api/nodes/{node_id}", node),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(HostGate, hosts=settings.hosts), Middleware(SecurityHeaders)]
    if settings.token:
        middleware.append(Middleware(TokenGate, token=settings.token))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={StoreError: store_error, ValueError: value_error})
    app.state.explorer = explorer
    app.state.settings = settings
    return app


def _error(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return HTMLResponse(pages.error_page(status, message), status_code=status)




__all__ = ["UISettings", "create_app", "read_only_engine", "search_filter", "is_loopback"]
