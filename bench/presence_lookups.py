"""Does a model that fails presence questions know their parts? Three-column scenes (`scenes3`) only.

For each held-out "Is there a C K?" the model is also asked, on the same image, "What colour is the K?"
and "What shape is the C one?". Printed: what it answered, what its own two look-ups imply ("yes" when
either names the other word of the question) and the accuracy of each, so a model that looks up
colours and kinds but does not compare them with the question's words shows as a gap between the two.

    python bench/presence_lookups.py RUN/model DATA/scenes3 [--split test]

The figures are in docs/generality.md ("Where the rest is lost").
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRESENCE = re.compile(r"Is there an? (\w+) (\w+)\?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a trained run's model folder")
    parser.add_argument("data", help="the scenes3 folder (bench/generality.py writes it under OUTPUT/data)")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    import vlmkit

    vlm = vlmkit.load(args.model, device="cpu")
    data = Path(args.data)
    outcomes = Counter()
    for line in (data / f"{args.split}.jsonl").read_text().splitlines():
        r = json.loads(line)
        question = r["messages"][0]["content"][-1]["text"]
        if not (m := PRESENCE.fullmatch(question)):
            continue
        colour, kind = m.groups()
        truth = r["messages"][-1]["content"][0]["text"]
        image = str(data / r["images"][0])
        said = vlm.ask(image, question, max_new_tokens=3).strip()
        colour_of_kind = vlm.ask(image, f"What colour is the {kind}?", max_new_tokens=3).strip()
        kind_of_colour = vlm.ask(image, f"What shape is the {colour} one?", max_new_tokens=3).strip()
        implied = "yes" if colour_of_kind == colour or kind_of_colour == kind else "no"
        outcomes[truth, said, implied] += 1
        print(f"{question} {truth}: said {said}; the {kind} is {colour_of_kind}, the {colour} one a "
              f"{kind_of_colour}: implies {implied}", flush=True)
    n = sum(outcomes.values())
    if not n:
        raise SystemExit(f"no presence question in {data / f'{args.split}.jsonl'}")
    said = sum(v for (t, s, _), v in outcomes.items() if t == s) / n
    implied = sum(v for (t, _, i), v in outcomes.items() if t == i) / n
    yes = sum(v for (t, s, _), v in outcomes.items() if s == "yes")
    print(f"{n} presence questions: said {said:.2f} correct ({yes} yes), its look-ups imply {implied:.2f}")


if __name__ == "__main__":
    main()
