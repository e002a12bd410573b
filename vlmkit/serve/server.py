"""`vlmkit serve`: load a model, print how to call it, and run the API on uvicorn until interrupted."""

from __future__ import annotations

import logging
import os
import socket
import sys

from vlmkit.errors import VlmkitError
from vlmkit.serve.api import Settings, create_app


def banner(url: str, model_id: str, api_key: str | None) -> str:
    """The URL and a ready curl and openai example."""
    key = "$VLMKIT_API_KEY" if api_key else "none"
    auth = ' -H "Authorization: Bearer $VLMKIT_API_KEY"' if api_key else ""
    return f"""vlmkit serve: {model_id} at {url}/v1  (GET {url}/health, OpenAPI docs at {url}/docs)

curl {url}/v1/chat/completions{auth} -H "Content-Type: application/json" \\
  -d '{{"model": "{model_id}", "max_tokens": 64, "messages": [{{"role": "user", "content": [
        {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,'"$(base64 -w0 image.png)"'"}}}},
        {{"type": "text", "text": "What is in the image?"}}]}}]}}'

python -c 'from openai import OpenAI; import base64
client = OpenAI(base_url="{url}/v1", api_key="{key}")
image = "data:image/png;base64," + base64.b64encode(open("image.png", "rb").read()).decode()
reply = client.chat.completions.create(model="{model_id}", max_tokens=64, messages=[{{"role": "user", "content": [
    {{"type": "image_url", "image_url": {{"url": image}}}}, {{"type": "text", "text": "What is in the image?"}}]}}])
print(reply.choices[0].message.content)'
"""


def check_address(host: str, port: int) -> None:
    """A `VlmkitError` if this process cannot listen on host:port (in use, or not an address of this machine)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        raise VlmkitError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None


def compute_threads(cores: int | None = None) -> int:
    """Torch threads for a server: every core but one, which the event loop and the request checks need.

    On 2 cores, decoding with 2 threads while the event loop wakes for every streamed token stalls both
    threads at each step: one thread served one client 1.5x faster and 8 clients 9% faster (docs/serve.md)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores - 1)


def serve(model: str, settings: Settings, host: str = "127.0.0.1", port: int = 8000, decode: str = "auto",
          threads: int | None = None) -> None:
    """Serve `model` (anything `vlmkit generate --model` takes) until Ctrl-C, computing on `threads`
    torch threads (default `compute_threads()`)."""
    import torch
    import uvicorn

    from vlmkit.infer.load import load

    check_address(host, port)  # before the model loads: a busy port should fail in a second, not a minute
    torch.set_num_threads(threads or compute_threads())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("vlmkit.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    vlm = load(model, decode=decode)  # never with trust_remote_code: nothing in a request reaches the loading
    if not settings.model_id:
        settings = Settings(**{**settings.__dict__, "model_id": model})
    app = create_app(vlm, settings)
    shown = f"[{host}]" if ":" in host else host
    print(banner(f"http://{shown}:{port}", settings.model_id, settings.api_key), flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"warning: listening on {host} without --api-key: anyone who reaches this port can use the model",
              file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning", timeout_graceful_shutdown=5)
