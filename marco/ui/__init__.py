"""``marco ui``: a read-only trace explorer in the browser (Starlette + uvicorn, server-rendered HTML).

:mod:`marco.ui.queries` reads the store, :mod:`marco.ui.pages` renders HTML, :mod:`marco.ui.app` serves both
(and the same data as JSON under ``/api/...``); :mod:`marco.ui.tokens` splits a node's text per token.
"""
