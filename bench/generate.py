"""Benchmark generation: isheep.generate against the Hugging Face generate paths, on the decode that runs.

What is measured and why: generation is most of an I-SHEEP round (instructions, responses, judge).
isheep.generate decodes with continuous batching on one static KV cache in which each row reads only
its own keys. On the response-stage workload (the self-instruct seed tasks in the chat template, one
of them with a 1,350-token input; T = 1.0, top-p 0.95, stop at EOS) it runs beside:
  - HF generate, one prompt at a time (--seq-n prompts);
  - HF generate on length-sorted static batches (--hf-batch-size; "max": the largest batch whose KV
    cache fits isheep's own budget, i.e. every prompt at once on this workload);
  - HF continuous batching, model.generate_batch (and with use_cuda_graph=True, --cb-cuda-graph).
ratio_vs_best_hf is against the best of those, named by best_hf_method. The figure of merit is
useful tokens per second: tokens up to and including EOS, for every method alike (a static batch's
rows that ended still cost it compute until the batch ends; that is what batching trades). On a CPU,
isheep samples through a top-k cascade (the top 64 tokens first); the row "whole-vocabulary sort"
runs the same decode sorting every row's whole vocabulary, as a GPU's fixed-shape step does, to
show what that CPU-only path buys.

A random model (--shape) rarely says EOS, so every row would run to the cap; --eos-every N gives its
EOS a logit bias so that a sampled token ends its row with probability ~1/N, and rows end at mixed
lengths, as a real model's do.

roofline_fraction: over the timed decode, each step's bytes (the weights, plus the KV cache its rows
hold) summed, over the copy bandwidth measured in the same run, over the decode's time: how close
the whole decode (prefills and host work included) comes to reading its memory once a step.
padding_waste: the share of the keys read that belong to no row's own columns (here only a CUDA
graph's spare rows read any); for comparison, what one width for every row (the longest) would waste.

    python bench/generate.py --greedy                 # responses, 64 prompts x <=256 tokens (~15 min on 2 cores)
    python bench/generate.py --stage judge            # the judge workload (prefill-bound)
    python bench/generate.py --n 4 --seq-n 2 --max-new-tokens 8 --greedy --threads 1   # smoke test
    python bench/generate.py --device cuda --dtype bf16 --shape 7b --n 128 --tokenizer DIR --eos-every 150
    python bench/generate.py ... --isheep OTHER/isheep.py   # another version of isheep on the same workload

The last line is key=value: isheep_tok_s, ratio_vs_best_hf, best_hf_method, roofline_fraction, ...
"""

import argparse
import copy
import importlib.util
import inspect
import math
import random
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import isheep  # noqa: E402
from common import (add_model_args, copy_bandwidth, load_bench_model, prepare_machine, prepare_model_machine,  # noqa: E402
                    print_table, profile_by_kind, sync)


SORTED = "isheep.generate, whole-vocabulary sort"   # a CPU's decode sampling as a GPU's does


def useful(row, eos):
    """Generated tokens up to and including the first EOS (all of them if none)."""
    return next((k + 1 for k, t in enumerate(row) if t in eos), len(row))


def run_isheep(model, tok, prompts, batch_tokens, trace=None, captures=None, **kw):
    """isheep.generate over all prompts: (results by index, seconds, tokens). trace, a list, gets every window of
    every decode (from this isheep's decode, if it records them); captures, a list, the seconds of each CUDA graph
    capture (part of the time: a decode captures each row count it steps at)."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=model.device.type == "cpu")
    decode, capture = isheep.decode, getattr(isheep, "capture", None)
    if trace is not None and "trace" in inspect.signature(decode).parameters:
        isheep.decode = lambda *a, **k: decode(*a, trace=trace, **k)
    if captures is not None and capture is not None:
        def timed_capture(*a, **k):
            sync(model.device)
            t0 = time.perf_counter()
            try:
                return capture(*a, **k)
            finally:
                sync(model.device)
                captures.append(time.perf_counter() - t0)
        isheep.capture = timed_capture
    if "args" in inspect.signature(isheep.generate).parameters:   # an older isheep: its settings came as args
        kw["args"] = SimpleNamespace(tp=False, gen_batch_tokens=batch_tokens, no_progress=True)
    else:
        kw.update(batch_tokens=batch_tokens, progress=False)
    out, t0 = {}, time.perf_counter()
    try:
        for chunk in isheep.generate(model, tok, prompts, acc=acc, **kw):
            out.update(chunk)
    finally:
        isheep.decode = decode
        if capture is not None:
            isheep.capture = capture
    sync(model.device)
    return out, time.perf_counter() - t0, sum(r["tokens"] for r in out.values())


@torch.no_grad()
def run_hf_batches(model, prompts, config, batch_size, eos, pad):
    """HF generate on length-sorted static batches of batch_size, left-padded (batch_size 1: one prompt at a
    time, no padding). Returns (seconds, useful tokens)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    tokens, t0 = 0, time.perf_counter()
    for s in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[s:s + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        tokens += sum(useful(row, eos) for row in new[:, width:].tolist())
    sync(model.device)
    return time.perf_counter() - t0, tokens


def run_hf_continuous(model, prompts, config, eos, max_batch_tokens, cuda_graph=None):
    """HF continuous batching (paged KV cache, requests join and leave the batch every step).
    Left alone on CPU it takes 60% of the machine's RAM for its cache; we give it exactly the
    blocks this workload needs (every request in flight at once). An untimed tiny call first pays
    the one-time costs; the timed call still pays its per-call setup."""
    from transformers import ContinuousBatchingConfig

    def cb_config(ps):
        per_request = math.ceil((max(map(len, ps)) + config.max_new_tokens) / 256)   # 256: the default page size
        return ContinuousBatchingConfig(num_blocks=len(ps) * per_request, max_batch_tokens=max_batch_tokens,
                                        use_cuda_graph=cuda_graph)
    model.generate_batch(inputs=prompts[:2], generation_config=copy.deepcopy(config),
                         continuous_batching_config=cb_config(prompts[:2]), max_new_tokens=2)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=cb_config(prompts))
    sync(model.device)
    seconds = time.perf_counter() - t0
    rows = [o.generated_tokens for o in out.values() if o.error is None]
    if len(rows) < len(prompts):
        errors = {o.error for o in out.values() if o.error is not None}
        raise RuntimeError(f"{len(prompts) - len(rows)} of {len(prompts)} requests failed: {errors or 'missing'}")
    return seconds, sum(useful(r, eos) for r in rows)


@torch.no_grad()
def greedy_check(model, tok, prompts, budget, max_new_tokens, eos, pad):
    """On how many prompts isheep's batched greedy token ids equal HF generate's on the prompt alone."""
    from transformers import GenerationConfig
    new, _ = isheep.decode(model, tok, prompts, [0] * len(prompts), budget=budget, max_new_tokens=max_new_tokens,
                           temperature=0, top_p=1.0, eos=eos, pad=pad)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, top_k=0, eos_token_id=eos, pad_token_id=pad)
    matches = 0
    for p, ours in zip(prompts, new):
        row = model.generate(input_ids=torch.tensor([p], device=model.device),
                             attention_mask=torch.ones(1, len(p), dtype=torch.long, device=model.device),
                             generation_config=config)[0, len(p):].tolist()
        matches += ours == row[:useful(row, eos)]
    return matches


@torch.no_grad()
def raise_eos(model, prompts, eos_id, every):
    """Give a random model's EOS a logit bias so that each sampled token ends its row with probability ~1/every:
    the bias that lifts EOS to 1/(every - 1) of the rest of the probability mass, averaged over real positions."""
    head = model.get_output_embeddings()
    ids = torch.tensor([p[:32] for p in prompts[:16] if len(p) >= 32], device=model.device)
    logits = model(input_ids=ids).logits.float()
    rest = torch.cat([logits[..., :eos_id], logits[..., eos_id + 1:]], -1).logsumexp(-1)
    bias = float((rest - logits[..., eos_id]).mean() - math.log(every - 1))
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, device=head.weight.device,
                             dtype=head.weight.dtype)
    biased.weight = head.weight
    biased.bias.data.zero_()[eos_id] = bias
    model.set_output_embeddings(biased)
    return bias


def decode_roofline(trace, weight_bytes, kv_bytes, bandwidth, seconds):
    """(floor seconds, fraction of the floor's speed, padding waste, one-width waste) of a decode's windows."""
    held = read = one_width = floor = 0
    for steps, batch, lengths in trace:
        for j in range(steps):
            used = sum(n + j for n in lengths)
            held += used
            read += used + (batch - len(lengths))   # a graph's spare rows read their one column
            one_width += batch * (max(lengths) + j)
            floor += (weight_bytes + used * kv_bytes) / bandwidth / 1e9
    return floor, floor / seconds, 1 - held / read, 1 - held / one_width


@torch.no_grad()
def profile_step(model, prompts, budget):
    """[(kind, kernels, ms)] of one eager decode step of isheep's engine with every prompt prefilled, from the
    profiler's CUDA kernels: what a step's GPU time goes to."""
    rows = prompts[:min(len(prompts), isheep.MAX_ROWS)]
    cache = isheep.SlotCache(len(rows), max(map(len, rows)) + 4, model.device)
    with isheep.attending_slots(model, cache):
        for s in range(0, len(rows), 16):
            cache.prefill(model, rows[s:s + 16], s, pad=0)
        cache.batch = len(rows)
        isheep.decode_step(model, cache, 1.0, 0.95, cascade=False)
        sync(model.device)
        return profile_by_kind(lambda: isheep.decode_step(model, cache, 1.0, 0.95, cascade=False), model.device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", default=str(ROOT.parent / "shared/data/self_instruct_seed_tasks.jsonl"),
                   help="seed tasks (isheep.load_seeds): the prompts of every stage")
    p.add_argument("--stage", choices=["responses", "instructions", "judge"], default="responses",
                   help="workload: responses (all methods), or instructions / judge (isheep.generate only)")
    p.add_argument("--n", type=int, default=64, help="prompts: the first n seed tasks (instructions: n few-shot prompts)")
    p.add_argument("--seq-n", type=int, default=16, help="prompts run one at a time for the sequential baseline (0: skip)")
    p.add_argument("--hf-batch-size", nargs="*", default=["max", "16"],
                   help="batch sizes of the sorted static-batch HF baseline; max: the largest whose cache fits")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length cap (responses stage)")
    p.add_argument("--synth-max-new-tokens", type=int, help="task-list length cap, instructions stage (default: 2 x max-new-tokens, as isheep)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of responses and instructions (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (paper: 0.95)")
    p.add_argument("--eos-every", type=int, help="a random model's rows end with probability ~1/N a token (EOS logit raised)")
    p.add_argument("--gen-batch-tokens", type=int, help="isheep's KV-cache token budget (default: isheep's own)")
    p.add_argument("--no-continuous", action="store_true", help="skip HF continuous batching")
    p.add_argument("--cb-cuda-graph", action="store_true", help="also run generate_batch with use_cuda_graph=True")
    p.add_argument("--cb-batch-tokens", type=int, default=2048,
                   help="continuous batching's max tokens per forward (its dense attention mask grows with it)")
    p.add_argument("--isheep", help="measure this isheep.py instead of the repository's (e.g. an older commit's)")
    p.add_argument("--greedy", action="store_true", help="also check isheep's greedy token ids equal HF generate's on each prompt alone")
    p.add_argument("--greedy-n", type=int, default=4, help="prompts in the --greedy check")
    p.add_argument("--profile", action="store_true", help="GPU: what one decode step's kernels spend, by kind")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and few-shot choice")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice); on a shared machine use fewer, "
                                               "as oversubscribed threads make small ops 10x slower")
    add_model_args(p)
    args = p.parse_args()
    if args.isheep:   # every isheep.* below is that file's
        global isheep
        spec = importlib.util.spec_from_file_location("isheep_measured", args.isheep)
        isheep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(isheep)
    prepare_machine(args.threads)
    peak = prepare_model_machine(args)

    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)   # transformers' deprecation notes
    tok, model = load_bench_model(args, SimpleNamespace(trust_remote_code=False, lora_rank=0, tp=False))
    n_params = sum(q.numel() for q in model.parameters())
    weight_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    eos = isheep.stop_token_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    seeds = isheep.load_seeds(args.seeds)
    c = model.config
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * (getattr(c, "head_dim", None) or
                                                                   c.hidden_size // c.num_attention_heads) * model.dtype.itemsize

    # The three workloads, built as isheep's stages build them.
    if args.stage == "responses":
        seeds = [seeds[k % len(seeds)] for k in range(args.n)]   # more prompts than seeds: they repeat
        prompts = [isheep.encode_prompt(tok, isheep.format_prompt(tok, s["instruction"], s["input"])) for s in seeds]
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    elif args.stage == "instructions":
        prompts = [isheep.encode_prompt(tok, isheep.synthesis_prompt(
            random.Random(isheep.seed_for(args.seed, "few-shot", k)).sample(seeds, isheep.FEW_SHOT)), raw=True)
            for k in range(args.n)]
        kw = dict(max_new_tokens=args.synth_max_new_tokens or 2 * args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, stop_strings=[f"Task {isheep.STOP_AT_TASK}"])
    else:
        seeds = [seeds[k % len(seeds)] for k in range(args.n)]
        prompts = [isheep.encode_prompt(tok, isheep.format_prompt(tok, isheep.QUALITY_PROMPT.format(**s))) for s in seeds]
        kw = dict(max_new_tokens=isheep.JUDGE_MAX_NEW_TOKENS, temperature=0, top_p=1.0, stop_strings=["||"])
    if args.eos_every:
        bias = raise_eos(model, prompts, tok.eos_token_id, args.eos_every)
        print(f"EOS logit raised by {bias:.2f}: a sampled token ends its row with probability ~1/{args.eos_every}")
    prompt_tokens = sum(map(len, prompts))
    lengths = sorted(map(len, prompts))
    print(f"stage {args.stage}: {len(prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens "
          f"(mean {prompt_tokens / len(prompts):.0f}), max_new_tokens {kw['max_new_tokens']}, temperature {kw['temperature']}; "
          f"{f'random Qwen2-{args.shape}-shaped' if args.shape else 'demo'} model, {n_params / 1e6:.1f}M params, {args.dtype}"
          + (f"; isheep from {args.isheep}" if args.isheep else ""))
    model.generate(input_ids=torch.tensor([prompts[0]], device=model.device), max_new_tokens=2, pad_token_id=pad)   # warm-up
    if "batch_tokens" in inspect.signature(isheep.batch_token_budget).parameters:
        budget = isheep.batch_token_budget(model, args.gen_batch_tokens)
    else:   # an older isheep
        budget = isheep.batch_token_budget(model, SimpleNamespace(gen_batch_tokens=args.gen_batch_tokens, tp=False))

    # Each row: (method, prompts, their prompt tokens, useful new tokens, seconds).
    torch.manual_seed(args.seed)
    trace, captures = [], []
    _, seconds, tokens = run_isheep(model, tok, prompts, args.gen_batch_tokens, trace=trace, captures=captures,
                                    seed=args.seed, **kw)
    rows = [("isheep.generate", len(prompts), prompt_tokens, tokens, seconds)]
    print(f"  isheep.generate: {tokens} tokens in {seconds:.1f} s" + (f", of which {len(captures)} CUDA graph captures "
          f"{sum(captures):.2f} s" if captures else ""), flush=True)
    if args.device == "cpu" and "cascade" in inspect.signature(isheep.sample).parameters and args.temperature > 0:
        sample = isheep.sample   # what the CPU's top-k cascade buys: the same decode sorting the whole vocabulary
        isheep.sample = lambda logits, temperature, top_p, uniforms, cascade=True: sample(logits, temperature, top_p,
                                                                                         uniforms, cascade=False)
        try:
            _, sort_s, sort_tokens = run_isheep(model, tok, prompts, args.gen_batch_tokens, seed=args.seed, **kw)
        finally:
            isheep.sample = sample
        rows.append((SORTED, len(prompts), prompt_tokens, sort_tokens, sort_s))
        print(f"  {SORTED}: {sort_tokens} tokens in {sort_s:.1f} s", flush=True)
    notes, greedy, roof = [], None, None
    if trace:
        bandwidth = copy_bandwidth(args.device)
        floor, fraction, waste, one_width = decode_roofline(trace, weight_bytes, kv_bytes, bandwidth, seconds)
        roof = dict(floor_s=floor, fraction=fraction, waste=waste, one_width=one_width, bandwidth=bandwidth,
                    steps=sum(s for s, _, _ in trace))
    if args.stage == "responses":
        config = GenerationConfig(max_new_tokens=kw["max_new_tokens"], do_sample=args.temperature > 0,
                                  temperature=args.temperature if args.temperature > 0 else None,
                                  top_p=args.top_p if args.temperature > 0 else None, top_k=0,
                                  eos_token_id=eos, pad_token_id=pad)
        widest = max(map(len, prompts)) + kw["max_new_tokens"]
        sizes = [min(len(prompts), max(1, budget // widest)) if b == "max" else int(b) for b in args.hf_batch_size]
        runs = [("HF generate, one prompt at a time", 1, prompts[:args.seq_n])] * bool(args.seq_n) + [
            (f"HF generate, sorted static batches of {b}", b, prompts) for b in dict.fromkeys(sizes)]
        for name, batch, ps in runs:
            seconds, tokens = run_hf_batches(model, ps, config, batch, eos, pad)
            rows.append((name, len(ps), sum(map(len, ps)), tokens, seconds))
            print(f"  {name}: {tokens} tokens in {seconds:.1f} s", flush=True)
        if args.greedy:   # before continuous batching, which swaps the model's attention for its own
            g = prompts[:args.greedy_n]
            greedy = f"{greedy_check(model, tok, g, budget, args.max_new_tokens, eos, pad)}/{len(g)}"
        for name, graph in [("HF continuous batching (generate_batch)", None),
                            ("HF generate_batch, use_cuda_graph=True", True)][:1 + args.cb_cuda_graph] * (not args.no_continuous):
            try:
                seconds, tokens = run_hf_continuous(model, prompts, config, eos, args.cb_batch_tokens, cuda_graph=graph)
                rows.append((name, len(prompts), prompt_tokens, tokens, seconds))
                print(f"  {name}: {tokens} tokens in {seconds:.1f} s", flush=True)
            except Exception as e:   # not every build runs it on CPU
                notes.append(f"{name} skipped: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    elif args.greedy:
        notes.append("--greedy runs with --stage responses only")

    print()
    rate = {r[0]: r[3] / r[4] for r in rows}
    seq_rate = rate.get("HF generate, one prompt at a time")
    print_table(["method", "prompts", "new_tok", "time_s", "new_tok/s", "ratio_vs_seq", "peak_frac", "peak_frac_incl_prompt"],
                [[m, n, tokens, f"{s:.1f}", f"{tokens / s:.1f}", f"{tokens / s / seq_rate:.2f}" if seq_rate else "-",
                  f"{2 * n_params * tokens / s / 1e9 / peak:.4f}", f"{2 * n_params * (tokens + pt) / s / 1e9 / peak:.4f}"]
                 for m, n, pt, tokens, s in rows])
    print(f"(new tokens: generated up to and including EOS, or up to the token that completes a stop string; "
          f"peak_frac = 2 x params x new tokens / time / {peak:.1f} GFLOP/s; incl_prompt also counts the prompt tokens)")
    if roof:
        print(f"isheep's decode: {roof['steps']} steps; reading the weights ({weight_bytes / 1e9:.2f} GB) and the KV cache its "
              f"rows hold once a step takes {roof['floor_s']:.2f} s at {roof['bandwidth']:.0f} GB/s: "
              f"{roof['fraction']:.3f} of the floor's speed. Padding: {roof['waste']:.3f} of the keys read "
              f"(one width for every row, the longest: {roof['one_width']:.3f})")
    if args.profile and args.device == "cuda" and hasattr(isheep, "SlotCache"):
        kernels = profile_step(model, prompts, budget)
        busy = sum(ms for _, _, ms in kernels)
        print(f"one eager decode step with all {len(prompts)} prompts in: {busy:.2f} ms of GPU time")
        print_table(["kind", "kernels", "ms", "share"], [[k, n, f"{ms:.3f}", f"{ms / busy:.2f}"] for k, n, ms in kernels])
    for note in notes:
        print("note:", note)
    if greedy is not None:
        print(f"greedy check: isheep's token ids == HF generate alone on {greedy} prompts")

    ours = rate["isheep.generate"]
    summary = dict(stage=args.stage, n=len(prompts), isheep_tok_s=f"{ours:.2f}",
                   peak_fraction=f"{2 * n_params * ours / 1e9 / peak:.4f}",
                   prompt_peak_fraction=f"{2 * n_params * rows[0][2] / rows[0][4] / 1e9 / peak:.4f}")   # prefill's share
    if roof:
        summary.update(roofline_fraction=f"{roof['fraction']:.3f}", padding_waste=f"{roof['waste']:.4f}",
                       padding_waste_one_width=f"{roof['one_width']:.3f}")
    if args.stage == "responses":
        hf = {m: r for m, r in rate.items() if m.startswith("HF")}
        best = max(hf, key=hf.get) if hf else None
        summary.update(ratio_vs_best_hf=f"{ours / hf[best]:.3f}" if best else "-",
                       best_hf_method=best.replace(" ", "_").replace(",", "") if best else "-",
                       ratio_vs_sequential=f"{ours / seq_rate:.3f}" if seq_rate else "-")
        if greedy is not None:
            summary["greedy_ids_match"] = greedy
    if SORTED in rate:
        summary["cascade_speedup"] = f"{ours / rate[SORTED]:.3f}"
    if captures:
        summary.update(captures=len(captures), capture_s=f"{sum(captures):.3f}")
    summary["peak_gflops"] = f"{peak:.1f}"
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
