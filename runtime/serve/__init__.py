"""`qvl-compile serve`: an OpenAI-compatible HTTP server over the torch-free runtime (`pip install "qvl-compile[serve]"`).

`server.py` (options, socket, uvicorn), `app.py` (the FastAPI routes), `openai_schema.py` (the wire format and its
error JSON), `limits.py` (request limits, image resolution), `scheduler.py` (queue, slots, generation threads),
`batching.py` (continuous batching: several sequences per decoder step), `metrics.py` (Prometheus).
Importing this package needs only the base install; the app modules need fastapi, uvicorn and prometheus-client.
"""
