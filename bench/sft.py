"""Benchmark step 7's SFT loop: how isheep forms micro-batches vs. shuffled fixed-size ones.

What is measured and why: on CPU (and on a GPU without packing) an SFT step costs in proportion
to the *padded* tokens it computes, while only the real tokens teach anything. isheep.sft groups
examples of similar length into optimizer steps (isheep.epoch_steps: sort within windows of 8
steps, shuffle the steps), then sorts a step by length and cuts it into contiguous
micro-batches. The baseline is the usual loader: a random order cut into fixed-size
micro-batches, each padded to its longest example. Both run the same examples, the same number
of optimizer steps of --batch-size examples, the same loss (summed token CE over the step's
supervised tokens), backward and AdamW, from the same weights; we report real tokens per second,
padding, and the fraction of the machine's fp32 matmul peak the loop reaches (6 x params x real
tokens / time, the usual estimate; LoRA: 4 x params, frozen weights get no weight gradient).

    python bench/sft.py             # SmolLM2-135M, full fine-tuning, fp32, 4 timed steps (~5-8 min on 2 idle cores)
    python bench/sft.py --n 24 --batch-size 2 --micro 1 --steps 1 --max-len 64 --threads 1   # smoke test
    python bench/sft.py --device cuda --dtype bf16 --shape 0.5b --tokenizer DIR   # a GPU machine (bf16 autocast)
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import isheep  # noqa: E402
from common import add_model_args, load_bench_model, prepare_machine, prepare_model_machine, print_table, sync  # noqa: E402



def plans(examples, steps, batch_size, micro, seed):
    """Each method's micro-batches for the same optimizer steps: {method: [[micro-batch, ...], ...]}.
    `steps` are isheep's (from epoch_steps); the baseline reshuffles the same examples."""
    order = [i for s in steps for i in s]
    random.Random(seed).shuffle(order)
    baseline = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    by_length = [sorted(s, key=lambda i: len(examples[i][0])) for s in steps]   # as isheep.sft does
    return {
        "shuffled, padded micro-batches (baseline)":
            [[s[k:k + micro] for k in range(0, len(s), micro)] for s in baseline],
        "isheep: epoch_steps, step sorted and cut":
            [[s[k:k + micro] for k in range(0, len(s), micro)] for s in by_length],
    }


def token_counts(examples, plan):
    """(real tokens, computed tokens incl. padding) of a plan."""
    real = sum(len(examples[i][0]) for step in plan for mb in step for i in mb)
    padded = sum(len(mb) * max(len(examples[i][0]) for i in mb) for step in plan for mb in step)
    return real, padded


def train_step(model, optimizer, params, examples, step, pad_id, autocast):
    """One optimizer step as isheep.sft makes it: each micro-batch adds its summed token CE
    divided by the step's supervised-token count; clip to 1.0; AdamW. autocast: bf16 compute
    on fp32 master weights, as isheep trains on a GPU."""
    step_tokens = sum(sum(y != -100 for y in examples[i][1]) for mb in step for i in mb)
    for mb in step:
        ids, labels, mask = (t.to(model.device) for t in isheep.collate([examples[i] for i in mb], pad_id))
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=-100, reduction="sum") / step_tokens
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)



def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/isheep_qwen72b_iter3_filtered.json"),
                   help="JSON list (or JSONL) of {instruction, input, output} pairs")
    p.add_argument("--n", type=int, default=512, help="pairs sampled from --data; isheep.epoch_steps plans an epoch over them")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (isheep's --batch-size)")
    p.add_argument("--micro", type=int, default=4, help="examples per micro-batch: batch-size/micro micro-batches per step")
    p.add_argument("--steps", type=int, default=4, help="K: timed optimizer steps per method, drawn from the epoch, after 1 untimed warm-up step")
    p.add_argument("--max-len", type=int, default=1024, help="tokenize_pair's max_len")
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning in fp32 (measures the loop itself); >0: isheep's LoRA")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (speed does not depend on it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, the epoch plan and the baseline's shuffle")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice); on a shared machine use fewer, "
                                               "as oversubscribed threads make small ops 10x slower")
    add_model_args(p)
    args = p.parse_args()
    if args.batch_size % args.micro:
        p.error("--batch-size must be a multiple of --micro")
    prepare_machine(args.threads)
    peak = prepare_model_machine(args)

    # Data: real pairs, tokenized exactly as isheep.sft does.
    path = Path(args.data)
    try:
        pairs = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        pairs = isheep.read_jsonl(path)
    pairs = random.Random(args.seed).sample(pairs, min(args.n, len(pairs)))
    margs = SimpleNamespace(trust_remote_code=False, tp=False, lora_rank=args.lora_rank, gen_batch_tokens=8192,
                            no_progress=True)
    tok, model = load_bench_model(args, margs, training=True)
    examples = [e for e in (isheep.tokenize_pair(tok, dict(p, input=p.get("input") or ""), args.max_len)
                            for p in pairs) if e is not None]

    # The epoch as isheep plans it; time K of its steps drawn at random, warm up on one more.
    # Drawn, not the first K: epoch_steps sorts lengths within windows of 8 steps, so K
    # neighbouring steps hold similar lengths and their reshuffle would flatter the baseline.
    # The baseline reshuffles exactly the timed steps' examples: every method sees the same examples.
    epoch = isheep.epoch_steps(examples, args.batch_size, random.Random(args.seed))
    epoch = [s for s in epoch if len(s) == args.batch_size]   # drop the epoch's one short step
    k = min(args.steps, len(epoch) - 1)
    if k < 1:
        p.error(f"{len(examples)} examples make {len(epoch)} full steps; need at least 2 (raise --n)")
    *timed, warmup = random.Random(args.seed).sample(epoch, k + 1)
    timed_plans = plans(examples, timed, args.batch_size, args.micro, args.seed)
    warmup_plans = plans(examples, [warmup], args.batch_size, args.micro, args.seed)
    epoch_plans = plans(examples, epoch, args.batch_size, args.micro, args.seed)
    lengths = sorted(len(e[0]) for e in examples)
    print(f"{len(examples)} examples, tokens per example: median {lengths[len(lengths) // 2]}, "
          f"mean {sum(lengths) / len(lengths):.0f}, max {lengths[-1]}; {len(epoch)} steps per epoch, {k} timed; "
          f"{args.batch_size} per step in {args.batch_size // args.micro} micro-batches of {args.micro}")

    if args.lora_rank:
        params = isheep.add_lora(model, args.lora_rank, 2 * args.lora_rank)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    autocast = args.dtype == "bf16" and model.dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = (4 if args.lora_rank else 6) * n_params
    start = {name: t.clone() for name, t in model.state_dict().items()}

    results = []
    for method, plan in timed_plans.items():
        model.load_state_dict(start)   # every method starts from the same weights and a fresh AdamW
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        train_step(model, optimizer, params, examples, warmup_plans[method][0], tok.pad_token_id, autocast)
        sync(args.device)
        t0 = time.perf_counter()
        for step in plan:
            train_step(model, optimizer, params, examples, step, tok.pad_token_id, autocast)
        sync(args.device)
        seconds = time.perf_counter() - t0
        real, padded = token_counts(examples, plan)
        epoch_real, epoch_padded = token_counts(examples, epoch_plans[method])
        # The K timed steps are a small sample; the epoch projection assumes cost per computed
        # (padded) token stays what it was in them, and applies it to the whole epoch's padding.
        results.append(dict(method=method, s=seconds, real=real, padded=padded, tok_s=real / seconds,
                            pad=1 - real / padded, epoch_pad=1 - epoch_real / epoch_padded,
                            epoch_tok_s=epoch_real / (epoch_padded * seconds / padded),
                            peak=flops_per_token * real / seconds / 1e9 / peak))
        print(f"  {method}: {seconds:.1f} s, {real / seconds:.0f} real tok/s", flush=True)

    base, ours = results
    print()
    print_table(["method", "steps", "time_s", "real_tok", "padded_tok", "pad_frac", "real_tok/s", "ratio", "peak_frac",
                 "pad_frac_epoch", "epoch_tok/s", "epoch_ratio"],
                [[r["method"], k, f"{r['s']:.1f}", r["real"], r["padded"], f"{r['pad']:.3f}", f"{r['tok_s']:.0f}",
                  f"{r['tok_s'] / base['tok_s']:.2f}", f"{r['peak']:.3f}", f"{r['epoch_pad']:.3f}",
                  f"{r['epoch_tok_s']:.0f}", f"{r['epoch_tok_s'] / base['epoch_tok_s']:.2f}"] for r in results])
    print(f"({'LoRA r=' + str(args.lora_rank) if args.lora_rank else 'full fine-tuning'}, {args.dtype}, {n_params / 1e6:.1f}M params; "
          f"peak_frac = {flops_per_token // n_params} x params x real tokens / time / {peak:.1f} GFLOP/s;\n"
          f" *_epoch: the same split over the whole epoch of {len(epoch)} steps, time projected from the timed "
          f"steps' seconds per computed token)")
    print(f"ratio_vs_padded={ours['tok_s'] / base['tok_s']:.3f} peak_fraction={ours['peak']:.4f} "
          f"peak_fraction_baseline={base['peak']:.4f} pad_frac_baseline={base['pad']:.3f} pad_frac_ours={ours['pad']:.3f} "
          f"ratio_vs_padded_epoch={ours['epoch_tok_s'] / base['epoch_tok_s']:.3f} "
          f"pad_frac_epoch_baseline={base['epoch_pad']:.3f} pad_frac_epoch_ours={ours['epoch_pad']:.3f} "
          f"tok_s_ours={ours['tok_s']:.1f} tok_s_baseline={base['tok_s']:.1f} peak_gflops={peak:.1f} steps={k} "
          f"batch_size={args.batch_size} micro={args.micro}")


if __name__ == "__main__":
    main()
