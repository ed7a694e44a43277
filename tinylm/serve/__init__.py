"""`tinylm serve`: an OpenAI-compatible completion API, a live runs dashboard and a playground.

Modules: `cli` (the command), `app` (ASGI app: routes, API key, limits, errors), `registry`
(model ids, loading, reload policy), `engine` (continuous batching on the KV cache),
`completions` and `protocol` (the OpenAI API), `dashboard` (the page's run routes), `static/`
(the page, with uPlot vendored under `static/vendor/uplot/`).
"""
