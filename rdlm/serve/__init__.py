"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine (`python -m rdlm.serve`).

- `engine`: the slots, the one compiled step (chunked prefill + decode), the scheduling thread.
- `text`: streamed text deltas and stop strings.
- `protocol`: OpenAI request bodies (pydantic) with rdlm's extras, and OpenAI's error body.
- `app`: the routes (FastAPI on uvicorn), Prometheus metrics, and `create_app`.
"""

from rdlm.serve.engine import Engine, Options, Plan, Request

__all__ = ["Engine", "Options", "Plan", "Request"]
