"""An OpenAI-compatible HTTP API over the generation engine: `vlmkit serve --model M`.

`api.py` is the FastAPI app (routes, auth, limits, errors in OpenAI's shape), `requests.py` turns a
chat-completions body into vlmkit messages and images, `media.py` fetches images under the server's
media policy, `batcher.py` decodes concurrent requests together on one model, `server.py` runs it all
on uvicorn. Nothing below this package imports it.
"""
