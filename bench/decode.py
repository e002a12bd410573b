"""Decode benchmark: vlmkit's decode loop against transformers' `generate`, and llama.cpp, on CPU.

In one process, on the bare language model (default: SmolLM2-135M-Instruct, the quickstart's LM) and,
with `--model`, on a VLM (one image + a question):
  - decode tokens/s of transformers' `generate` (dynamic cache) in fp32 and in bf16, and of vlmkit's decoder
    in each precision (fp32, bf16, int8, int4), at batch 1 and 8, every row forced to `--tokens` new
    tokens; the prompt's prefill is timed apart and left out, as llama.cpp's `llama-bench -n` leaves it
    out: rate = rows x (tokens - 1) / (time for `tokens` - time for 1 token);
  - the decoder's setup time (weights converted once per process) and the VLM's prefill time;
  - the quality cost of each precision: the LM's loss on a plain English paragraph (teacher forcing
    through the same decode step), and with `--eval-data` the VLM's held-out exact match;
  - with a llama.cpp `llama-bench` binary (`--llama-bench PATH`, or bench/build_llama_cpp.sh's cache),
    llama.cpp on the same GGUF with the same thread count.
Prints a markdown table and the ratios. Results: docs/decode.md.

    python bench/decode.py                                   # bare LM only
    python bench/decode.py --model runs/quickstart --eval-data runs/quickstart/data/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vlmkit.model.decoder import PRECISIONS, Decoder, KVCache, decode  # noqa: E402

PROMPTS = [
    "Tell me a story about a cat who learns to sail.",
    "Explain why the sky is blue.",
    "Write a short poem about autumn leaves falling in the park.",
    "What is the capital of France? Answer in a full sentence, then describe the city.",
    "List some fruits.",
    "Describe how a bicycle works, step by step, for a child.",
    "Why do we sleep?",
    "Give three tips for learning a new language quickly and well.",
]
PARAGRAPH = (
    "The river ran slowly through the valley, past fields of wheat and small stone houses. In the morning, "
    "fishermen pushed their boats into the water and waited for the mist to lift. Children walked along the "
    "bank on their way to school, and the baker opened his shop as the church bell rang seven times. By noon "
    "the sun was high, the fields were quiet, and the only sound was the water moving over the rocks."
)
LLAMA_BENCH_CACHE = Path.home() / ".cache/vlmkit-bench/llama.cpp/build/bin/llama-bench"


def timed(fn, repeats: int = 2) -> float:
    """Best wall time of `repeats` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def rate(run, rows: int, n_tokens: int, repeats: int) -> tuple[float, float]:
    """(decode tokens/s, prefill + first token seconds) of `run(max_new_tokens)`."""
    first = timed(lambda: run(1), repeats)
    full = timed(lambda: run(n_tokens), repeats)
    return rows * (n_tokens - 1) / max(full - first, 1e-9), first


def lm_rows(lm, tokenizer, n_tokens: int, batches: list[int], repeats: int) -> tuple[list[dict], dict]:
    """Tokens/s of each path on the bare LM; also each decoder's setup seconds."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    lm_bf16 = None
    decoders, setup = {}, {}
    for p in PRECISIONS:
        start = time.perf_counter()
        decoders[p] = Decoder(lm.model, lm.lm_head, lm.config, p)
        setup[p] = time.perf_counter() - start
    rows = []
    for b in batches:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                 for t in (PROMPTS * 2)[:b]]
        inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
        def forced(n):
            return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)

        def row(path, precision, run):
            tok_s, prefill = rate(run, b, n_tokens, repeats)
            rows.append({"model": "LM", "batch": b, "path": path, "precision": precision, "tok_s": tok_s, "prefill_ms": prefill * 1000})

        with torch.inference_mode():
            row("transformers generate", "fp32", lambda n: lm.generate(**inputs, **forced(n)))
            if lm_bf16 is None:
                lm_bf16 = _bf16_copy(lm)
            row("transformers generate", "bf16", lambda n: lm_bf16.generate(**inputs, **forced(n)))
            for p, dec in decoders.items():
                row("vlmkit decoder", p, lambda n, dec=dec: decode(dec, lm, inputs, n, set(), tokenizer.pad_token_id))
    return rows, setup


def _bf16_copy(lm):
    import copy

    return copy.deepcopy(lm).to(torch.bfloat16)


@torch.inference_mode()
def paragraph_loss(lm, tokenizer, decoder: Decoder) -> float:
    """Mean next-token loss on PARAGRAPH, each token fed through `decoder.step` (teacher forcing)."""
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    out = lm(input_ids=ids[:, :1], use_cache=True)
    cache = KVCache.from_prefill(out.past_key_values, decoder, ids.shape[1])
    logits, total = out.logits[:, -1].float(), 0.0
    for t in range(1, ids.shape[1]):
        total += float(torch.nn.functional.cross_entropy(logits, ids[:, t]))
        logits = decoder.step(ids[:, t], torch.tensor([t]), cache, None)
    return total / (ids.shape[1] - 1)


def vlm_rows(folder: str, n_tokens: int, repeats: int, eval_data: str | None, eval_samples: int) -> list[dict]:
    """Batch-1 tokens/s, prefill time and held-out exact match of a VLM, per path."""
    import tempfile

    from PIL import Image

    from vlmkit.eval.run import evaluate
    from vlmkit.infer.engine import Engine
    from vlmkit.infer.load import load

    vlm = load(folder)
    image = Image.new("RGB", (224, 224), "white")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    rows = []
    for path in ("transformers",) + PRECISIONS:
        engine = Engine(vlm.model, vlm.processor, family=vlm.family, decode=path)
        inputs = engine._cast(engine.inputs([messages], [[image]]))
        pad = vlm.processor.tokenizer.pad_token_id
        with torch.inference_mode():
            if path == "transformers":
                def run(n):
                    return vlm.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
            else:
                def run(n, dec=engine.decoder()):
                    return decode(dec, vlm.model, inputs, n, set(), pad)
            tok_s, prefill = rate(run, 1, n_tokens, repeats)
        row = {"model": Path(folder).name, "batch": 1, "path": "transformers generate" if path == "transformers" else "vlmkit decoder",
               "precision": "fp32" if path == "transformers" else path, "tok_s": tok_s, "prefill_ms": prefill * 1000}
        if eval_data:
            with tempfile.TemporaryDirectory() as tmp:
                data = Path(tmp) / "data.jsonl"
                lines = Path(eval_data).read_text().splitlines()[:eval_samples]
                data.write_text("\n".join(_absolute(line, Path(eval_data).parent) for line in lines) + "\n")
                start = time.perf_counter()
                report = evaluate(data, Path(tmp) / "report.json", engine=engine, batch_size=8)
                row["exact_match"] = report["exact_match"]
                row["eval_s"] = time.perf_counter() - start
        rows.append(row)
    return rows


def _absolute(line: str, base: Path) -> str:
    """A JSONL row with its image paths made absolute (the copy lives in another folder)."""
    row = json.loads(line)
    for key in ("image", "images"):
        if isinstance(row.get(key), str):
            row[key] = str((base / row[key]).resolve())
        elif isinstance(row.get(key), list):
            row[key] = [str((base / p).resolve()) for p in row[key]]
    return json.dumps(row)


def llama_cpp_row(binary: str, gguf: str, threads: int, n_tokens: int) -> dict | None:
    out = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-n", str(n_tokens), "-p", "0", "-o", "json"],
                         capture_output=True, text=True, check=True)
    results = json.loads(out.stdout)
    tg = [r for r in results if r.get("n_gen", 0) > 0]
    return {"model": "LM (Q4_1 GGUF)", "batch": 1, "path": "llama.cpp llama-bench", "precision": "q4_1", "tok_s": tg[0]["avg_ts"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", default="smollm2-135m", help="the bare language model (a vlmkit LM name)")
    parser.add_argument("--model", help="a VLM folder or run (e.g. the quickstart's) for the image rows")
    parser.add_argument("--eval-data", help="held-out JSONL for the VLM's exact match per precision")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--llama-bench", default=str(LLAMA_BENCH_CACHE) if LLAMA_BENCH_CACHE.exists() else None)
    parser.add_argument("--output", help="write the rows as JSON here too")
    args = parser.parse_args()

    from vlmkit.model.llm import llm_source, load_llm

    threads = torch.get_num_threads()
    lm, tokenizer = load_llm(args.lm)
    lm.eval()
    rows, setup = lm_rows(lm, tokenizer, args.tokens, args.batch, args.repeats)
    losses = {p: paragraph_loss(lm, tokenizer, Decoder(lm.model, lm.lm_head, lm.config, p)) for p in PRECISIONS}
    if args.llama_bench:
        path, kwargs = llm_source(args.lm)
        if "gguf_file" in kwargs:
            rows.append(llama_cpp_row(args.llama_bench, str(Path(path) / kwargs["gguf_file"]), threads, args.tokens))
    if args.model:
        rows += vlm_rows(args.model, args.tokens, args.repeats, args.eval_data, args.eval_samples)

    print(f"\n{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}, {args.tokens} new tokens\n")
    print("| model | batch | path | precision | decode tokens/s | prefill + 1st token ms | exact match |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        em = f"{r['exact_match']:.3f}" if "exact_match" in r else ""
        pre = f"{r['prefill_ms']:.0f}" if "prefill_ms" in r else ""
        print(f"| {r['model']} | {r['batch']} | {r['path']} | {r['precision']} | {r['tok_s']:.1f} | {pre} | {em} |")
    print("\nparagraph loss (nats/token):", ", ".join(f"{p} {v:.4f}" for p, v in losses.items()))
    print("decoder setup (s):", ", ".join(f"{p} {v:.2f}" for p, v in setup.items()))

    def tok(model, path, precision, batch):
        found = [r["tok_s"] for r in rows if r["model"] == model and r["path"] == path and r["precision"] == precision and r["batch"] == batch]
        return found[0] if found else None

    print("\nratios (LM):")
    for b in args.batch:
        for p in PRECISIONS:
            same = p if p in ("fp32", "bf16") else "bf16"  # the quantized paths compute in bf16
            base = tok("LM", "transformers generate", same, b)
            print(f"  batch {b}: vlmkit {p} / transformers {same} = {tok('LM', 'vlmkit decoder', p, b) / base:.2f}x;"
                  f" / transformers fp32 = {tok('LM', 'vlmkit decoder', p, b) / tok('LM', 'transformers generate', 'fp32', b):.2f}x")
    if 8 in args.batch and 1 in args.batch:
        for p in PRECISIONS:
            print(f"  vlmkit {p}: batch 8 / batch 1 = {tok('LM', 'vlmkit decoder', p, 8) / tok('LM', 'vlmkit decoder', p, 1):.2f}x")
    llama = [r["tok_s"] for r in rows if r["path"] == "llama.cpp llama-bench"]
    if llama:
        for p in PRECISIONS:
            print(f"  llama.cpp / vlmkit {p} (batch 1) = {llama[0] / tok('LM', 'vlmkit decoder', p, 1):.2f}x")
    if args.output:
        Path(args.output).write_text(json.dumps({"rows": rows, "paragraph_loss": losses, "setup_s": setup}, indent=1))


if __name__ == "__main__":
    main()
