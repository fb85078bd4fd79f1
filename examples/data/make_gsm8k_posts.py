"""Build examples/data/gsm8k_posts.jsonl: short English texts for the writing env, offline.

The MAGRPO writing reward scores the two summaries against each other (lengths, vocabulary,
transitions), not against a reference, so any short English text can be summarised. The TL;DR
posts (Hub `trl-lib/tldr`) cannot be downloaded here and the bundled tldr_posts.jsonl has 41, too
few for a 200-text evaluation. GSM8K's training questions (MIT licence, openai/grade-school-math)
are short narratives; the longest ones (>= 60 words) are kept, shuffled with a fixed seed.

Usage: python examples/data/make_gsm8k_posts.py PATH/TO/gsm8k/train.jsonl [--n 440] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "gsm8k_posts.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gsm8k_train", type=Path, help="GSM8K train.jsonl (fields question, answer)")
    ap.add_argument("--n", type=int, default=440)
    ap.add_argument("--min-words", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.gsm8k_train.read_text().splitlines() if line.strip()]
    kept = [(i, r["question"].strip()) for i, r in enumerate(rows) if len(r["question"].split()) >= args.min_words]
    if len(kept) < args.n:
        raise SystemExit(f"only {len(kept)} questions have >= {args.min_words} words; lower --min-words or --n")
    random.Random(args.seed).shuffle(kept)
    with args.out.open("w") as f:
        for line, text in sorted(kept[: args.n]):
            f.write(json.dumps({"prompt": text, "source": f"gsm8k/train.jsonl:{line + 1}"}) + "\n")
    print(f"wrote {args.n} texts to {args.out}")


if __name__ == "__main__":
    main()
