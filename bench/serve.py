"""Serving benchmark: throughput and latency of `vlmkit serve` at 1, 8 and 32 concurrent clients.

Starts `vlmkit serve` on a free loopback port (a subprocess, as a user would run it) and drives it with
the `openai` client: each client sends streamed requests back to back (one image and a short question
each, `max_tokens` fixed) until the level's request count or time bound is reached. Measures requests/s,
output tokens/s (from the usage chunk) and p50/p95 time to first token and latency, and, first, the same
requests through the engine serially in this process (`Engine.generate`, batch size 1: what a script
calling vlmkit one request at a time gets). Prints a markdown table and the ratio of 8-client to
1-client output tokens/s. Target on 2 CPU cores: >= 4x, and 32 clients with 0 errors.

    python bench/serve.py                       # a tiny random VLM (tests/tiny.py), seconds
    python bench/serve.py --model default       # the quickstart's parts, untrained (EfficientNet-Lite0 + SmolLM2-135M)
    python bench/serve.py --model runs/quickstart [--clients 1 8 32] [--requests 16] [--seconds 60] [--max-tokens 32]

Results: docs/serve.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What colour is the shape?", "What shape is it?", "Where is the shape?", "Describe the image.",
             "How many shapes are there?", "Is there a circle?", "What is on the left?", "What colour is the background?"]


def tiny_model(folder: Path) -> Path:
    """A tiny random VLM (tests/tiny.py's, as the serve tests use) with weights wide enough to vary its replies."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_varied_vlm

    return make_varied_vlm(folder)


def default_model(folder: Path) -> Path:
    """The quickstart's composition (default parts), untrained: the quickstart model's size and shape."""
    from vlmkit.build import compose

    return _save(*compose(), folder / "model")


def _save(model, processor, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def workload(n: int) -> list[tuple[bytes, str]]:
    """n (PNG, question) pairs: a coloured shape on a plain background, as in the quickstart's data."""
    from PIL import Image, ImageDraw

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    out = []
    for i in range(n):
        im = Image.new("RGB", (64, 64), "white")
        box = (8 + i % 5 * 4, 8 + i % 3 * 6, 40 + i % 4 * 5, 44 + i % 2 * 8)
        (ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle)(box, fill=colours[i % len(colours)])
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append((buf.getvalue(), QUESTIONS[i % len(QUESTIONS)]))
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def serial_engine(model: str, items, max_tokens: int, seconds: float, decode: str = "auto") -> dict:
    """The requests one at a time through the engine in this process."""
    import torch

    from vlmkit.infer.load import load

    engine = load(model, decode=decode).engine
    eos = engine.stop_ids()

    def one(image, question) -> int:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        inputs = engine._cast(engine.inputs([messages], [[image]]))
        with torch.inference_mode():
            new = engine._run(inputs, max_tokens, 0.0, 1.0)[0].tolist()
        return next((i + 1 for i, tok in enumerate(new) if tok in eos), len(new))

    one(*items[0])  # warm-up, untimed, as the server gets one before its levels
    latencies, tokens, start = [], 0, time.monotonic()
    for image, question in items:
        if time.monotonic() - start > seconds:
            break
        t = time.monotonic()
        tokens += one(image, question)
        latencies.append(time.monotonic() - t)
    wall = time.monotonic() - start
    return {"clients": "serial engine", "requests": len(latencies), "errors": 0, "rps": len(latencies) / wall,
            "tps": tokens / wall, "ttft": [], "latency": latencies}


def level(url: str, clients: int, items, max_tokens: int, seconds: float) -> dict:
    """`clients` threads sending streamed requests back to back until `items` are used up or time is up."""
    import openai

    lock, next_item, results, errors = threading.Lock(), [0], [], []
    start = time.monotonic()

    def client():
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        while True:
            with lock:
                if next_item[0] >= len(items) or time.monotonic() - start > seconds:
                    return
                image, question = items[next_item[0]]
                next_item[0] += 1
            t, first, usage = time.monotonic(), None, None
            try:
                stream = api.chat.completions.create(
                    model="bench", max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
                        {"type": "text", "text": question}]}],
                )
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.monotonic() - t
                    if chunk.usage is not None:
                        usage = chunk.usage
                done = time.monotonic() - t
                with lock:
                    results.append((first if first is not None else done, done, usage.completion_tokens))
            except Exception as e:  # counted and shown, never fatal
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    if errors:
        print(f"{clients} clients: {len(errors)} errors, e.g. {errors[0]}", file=sys.stderr)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "rps": len(results) / wall,
            "tps": sum(r[2] for r in results) / wall, "ttft": [r[0] for r in results], "latency": [r[1] for r in results]}


def start_server(model: str, max_batch: int, decode: str = "auto", threads: int | None = None) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VLMKIT_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmkit.cli", "serve", "--model", model, "--port", str(port), "--max-batch", str(max_batch),
         "--max-queue", "256", "--decode", decode] + (["--threads", str(threads)] if threads else []), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vlmkit serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("vlmkit serve did not start in 300 s")


def table(rows: list[dict]) -> str:
    ms = lambda v: "-" if v != v else f"{v * 1000:.0f}"  # noqa: E731 - nan -> "-"
    lines = ["| clients | requests | errors | requests/s | output tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | latency p50 (ms) | latency p95 (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | {r['tps']:.1f} | "
                     f"{ms(percentile(r['ttft'], 0.5))} | {ms(percentile(r['ttft'], 0.95))} | "
                     f"{ms(percentile(r['latency'], 0.5))} | {ms(percentile(r['latency'], 0.95))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a model folder or hub id, 'tiny' (default) or 'default'")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels (default 1 8 32)")
    parser.add_argument("--requests", type=int, default=16, help="requests per client: a level sends requests x clients (default 16)")
    parser.add_argument("--seconds", type=float, default=60, help="time bound of each level (default 60)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument("--decode", default="auto", help="the engine's and server's --decode (default auto; "
                        "transformers: dynamic batching over generate)")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default 32)")
    parser.add_argument("--threads", type=int, help="the server's --threads (default: its own, every core but one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model in ("tiny", "default"):
            model = str((tiny_model if model == "tiny" else default_model)(Path(tmp)))
        items = workload(args.requests * max(args.clients))
        rows = [serial_engine(model, items[: args.requests], args.max_tokens, args.seconds, args.decode)]
        proc, url = start_server(model, args.max_batch, args.decode, args.threads)
        try:
            level(url, 1, items[:2], args.max_tokens, args.seconds)  # warm-up
            for clients in args.clients:
                rows.append(level(url, clients, items[: args.requests * clients], args.max_tokens, args.seconds))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    import torch

    print(f"model: {args.model}; --decode {args.decode}; max_tokens {args.max_tokens}; server --max-batch {args.max_batch} "
          f"--threads {args.threads or 'default'}; "
          f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print(table(rows))
    by = {r["clients"]: r for r in rows}
    if 1 in by and 8 in by and by[1]["tps"] > 0:
        print(f"\noutput tokens/s, 8 clients / 1 client: {by[8]['tps'] / by[1]['tps']:.1f}x")


if __name__ == "__main__":
    main()
