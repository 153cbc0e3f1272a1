"""Benchmark step 2's ROUGE-L dedup: isheep.rouge_dedup against the Alpaca-style pairwise loop.

What is measured and why: dedup keeps a candidate when its ROUGE-L F against every earlier kept
candidate is <= 0.7. The pairwise loop (stanford_alpaca's generate_instruction.py, with
rouge_score) runs one LCS per (candidate, kept) pair: quadratic, minutes to hours at the paper's
10,000 instructions a round. isheep.rouge_dedup bounds all pairs at once with a sparse matrix
product and runs the exact LCS only where the bound could pass. We time both on the same first M
instructions, check their decisions are identical, time isheep on all N, and extrapolate the
pairwise loop to N from its measured time per comparison and its exact comparison count at N.

    python bench/dedup.py                      # N=10000, pairwise on the first 1500 (a few minutes)
    python bench/dedup.py --n 8 --pairwise-n 8 # smoke test
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from rouge_score import rouge_scorer   # bench/test-only dependency (imported untimed)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import isheep  # noqa: E402
from common import prepare_machine, print_table  # noqa: E402

THRESHOLD = 0.7


def load_instructions(path):
    """The "instruction" field of every row of a JSON list or a JSONL file."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
        rows = rows if isinstance(rows, list) else [rows]
    except json.JSONDecodeError:
        rows = isheep.read_jsonl(path)
    return [str(r["instruction"]) for r in rows if isinstance(r, dict) and r.get("instruction")]


def light_variants(instructions, count, rng):
    """Near-duplicates of real instructions: one word dropped, or two neighbours swapped."""
    out = []
    for _ in range(count):
        words = rng.choice(instructions).split()
        if len(words) > 4 and rng.random() < 0.5:
            del words[rng.randrange(len(words))]
        elif len(words) > 1:
            k = rng.randrange(len(words) - 1)
            words[k], words[k + 1] = words[k + 1], words[k]
        out.append(" ".join(words))
    return out


def pairwise_dedup(instructions):
    """The baseline: each candidate against every kept one, in order, stopping at the first
    ROUGE-L F > 0.7. Returns (keep, number of LCS comparisons made)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    toks = [scorer._tokenizer.tokenize(t) for t in instructions]   # pre-tokenized, as Alpaca does
    kept, keep, comparisons = [], [], 0
    for t in toks:
        dup = False
        for k in kept:
            comparisons += 1
            if rouge_scorer._score_lcs(t, k).fmeasure > THRESHOLD:
                dup = True
                break
        keep.append(not dup)
        if not dup:
            kept.append(t)
    return keep, comparisons


def loop_comparisons(instructions, keep):
    """The exact number of comparisons pairwise_dedup would make, given the (identical) kept
    decisions, without running it: a kept candidate meets every earlier kept one; a dropped one
    stops at the first kept one it duplicates, found here with the same overlap bound as
    isheep.rouge_dedup (a multiset intersection bounds the LCS), exact LCS only on survivors.
    Also returns the brief's upper bound, sum over candidates of the number kept before it."""
    toks = [isheep.rouge_tokens(t) for t in instructions]
    kept_before = [0]
    for k in keep:
        kept_before.append(kept_before[-1] + k)
    upper = sum(kept_before[:-1])
    exact = sum(kept_before[i] for i, k in enumerate(keep) if k)
    dropped = [i for i, k in enumerate(keep) if not k]
    if not dropped:
        return exact, upper
    x = isheep.occurrence_matrix(toks)
    lengths = torch.tensor([len(t) for t in toks], dtype=torch.float32)
    kept_mask = torch.tensor(keep, dtype=torch.bool)
    for s in range(0, len(dropped), 256):
        block = dropped[s:s + 256]
        overlap = torch.sparse.mm(x, x.index_select(0, torch.tensor(block)).to_dense().T).T
        maybe = (2 * overlap > (THRESHOLD - 1e-6) * (lengths[block, None] + lengths[None, :])) & kept_mask
        for row, i in enumerate(block):
            first = next((j for j in maybe[row, :i].nonzero().flatten().tolist()
                          if isheep.rouge_l(toks[i], toks[j]) > THRESHOLD), None)
            # every kept one up to and including the hit (a full scan if none: decisions differ)
            exact += kept_before[i] if first is None else kept_before[first] + 1
    return exact, upper


def timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0



def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/isheep_qwen72b_iter3_filtered.json"),
                   help="JSON list or JSONL of rows with an 'instruction' field")
    p.add_argument("--n", type=int, default=10000,
                   help="instructions deduplicated by isheep; beyond the file's count, light variants of real ones are appended")
    p.add_argument("--pairwise-n", type=int, default=1500,
                   help="M: the pairwise loop runs (and is checked against isheep) on the first M instructions only")
    p.add_argument("--seed", type=int, default=0, help="seed of the variants")
    p.add_argument("--threads", type=int, help="torch threads for isheep's sparse products (default: torch's choice)")
    args = p.parse_args()
    prepare_machine(args.threads)

    real = load_instructions(args.data)
    if not real:
        sys.exit(f"no 'instruction' field in {args.data}")
    texts = real[:args.n] + light_variants(real, max(0, args.n - len(real)), random.Random(args.seed))
    n, m = len(texts), min(args.pairwise_n, len(texts))
    print(f"{n} instructions ({min(n, len(real))} real from {args.data}, {max(0, n - len(real))} light variants); "
          f"pairwise loop on the first {m}; torch threads {torch.get_num_threads()}")

    isheep.rouge_dedup(texts[:8], [])   # warm-up: torch's sparse kernels' first call is slow
    (pair_keep, pair_cmp), pair_s = timed(pairwise_dedup, texts[:m])
    ours_m_keep, ours_m_s = timed(isheep.rouge_dedup, texts[:m], [])
    identical = ours_m_keep == pair_keep
    ours_keep, ours_s = timed(isheep.rouge_dedup, texts, [])
    identical = identical and ours_keep[:m] == ours_m_keep   # the prefix decides the same inside the full run

    # Extrapolate the loop: time per comparison at M x comparisons it would make at N.
    cmp_m, _ = loop_comparisons(texts[:m], pair_keep)
    cmp_n, cmp_n_upper = loop_comparisons(texts, ours_keep)
    per_cmp = pair_s / max(pair_cmp, 1)
    pair_n_s = per_cmp * cmp_n

    print(f"kept decisions identical on the first {m}: {identical} "
          f"({sum(pair_keep)} kept by the loop, {sum(ours_m_keep)} by isheep); kept at N: {sum(ours_keep)}")
    print(f"pairwise comparisons: measured at M {pair_cmp}, counted from the kept decisions at M {cmp_m} "
          f"(must match), at N {cmp_n} (upper bound sum of kept-before: {cmp_n_upper}); "
          f"{per_cmp * 1e6:.1f} us per comparison")
    print()
    header = ["method", "items", "time_s", "items/s", "speedup"]
    print_table(header, [
        ["pairwise rouge_score (measured)", m, f"{pair_s:.2f}", f"{m / pair_s:.0f}", "1.0"],
        ["isheep.rouge_dedup", m, f"{ours_m_s:.2f}", f"{m / ours_m_s:.0f}", f"{pair_s / ours_m_s:.1f}"],
        ["pairwise rouge_score (extrapolated)", n, f"{pair_n_s:.1f}", f"{n / pair_n_s:.0f}", "1.0"],
        ["isheep.rouge_dedup", n, f"{ours_s:.2f}", f"{n / ours_s:.0f}", f"{pair_n_s / ours_s:.1f}"],
    ])
    print("(no matmul-peak column: dedup is sparse integer-like work, not a dense matmul)")
    print(f"n={n} m={m} isheep_s={ours_s:.3f} isheep_m_s={ours_m_s:.3f} pairwise_m_s={pair_s:.3f} "
          f"pairwise_s_est={pair_n_s:.1f} speedup={pair_n_s / ours_s:.1f} speedup_m={pair_s / ours_m_s:.1f} "
          f"kept={sum(ours_keep)} comparisons_n={cmp_n} count_check={cmp_m == pair_cmp} identical={identical}")


if __name__ == "__main__":
    main()
