"""Benchmark generation: isheep.generate against plain Hugging Face generate paths.

What is measured and why: generation is most of an I-SHEEP round (instructions, responses,
judge). isheep.generate decodes with continuous batching on the model's own KV cache: prompts
join a running batch under a token budget, in lanes of similar width (each lane its own
left-padded cache), and a row leaves the batch and the cache as soon as it ends. On the response-stage workload (seed tasks in the chat
template, sampling at T=1.0, top-p 0.95, stop at EOS) we compare it with HF generate one prompt
at a time, HF generate on length-sorted batches of 16, and HF continuous batching
(model.generate_batch) where this transformers build runs it. The figure of merit is useful
tokens per second: generated tokens up to and including EOS (a batched row that finished early
still costs HF generate compute until its batch ends; that waste is
exactly what batching choices trade). peak_frac = 2 x params x useful tokens / time / the
machine's fp32 matmul peak; decoding is memory-bound, so it is low. --stage instructions|judge
times isheep.generate alone on the other two workloads; --greedy checks that isheep's batched
greedy text equals HF generate on each prompt alone.

    python bench/generate.py                          # responses, 64 prompts x <=256 tokens (~5 min on 2 idle cores)
    python bench/generate.py --stage judge            # the judge workload (prefill-bound)
    python bench/generate.py --n 4 --seq-n 2 --max-new-tokens 8 --greedy --threads 1   # smoke test
    python bench/generate.py --device cuda --dtype bf16 --shape 7b --n 128 --tokenizer DIR --seq-n 0   # a GPU
    python bench/generate.py ... --isheep OTHER/isheep.py   # another version of isheep on the same workload

On a GPU it also times one decode step of isheep's engine at --step-rows rows (a CUDA graph
replay) against its memory floor: the bytes of the weights and of the KV cache it attends, over
the copy bandwidth measured in the same run. The last line is key=value, with ratio_vs_best_hf,
step_ms, floor_ms and roofline_fraction.
"""

import argparse
import copy
import importlib.util
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
                    print_table, sync)



def useful(row, eos):
    """Generated tokens up to and including the first EOS (all of them if none)."""
    return next((k + 1 for k, t in enumerate(row) if t in eos), len(row))


def run_isheep(model, tok, prompts, gen_args, **kw):
    """isheep.generate over all prompts: (results by index, seconds, useful tokens)."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=model.device.type == "cpu")
    out, t0 = {}, time.perf_counter()
    for chunk in isheep.generate(model, tok, prompts, acc=acc, args=gen_args, **kw):
        out.update(chunk)
    return out, time.perf_counter() - t0, sum(r["tokens"] for r in out.values())


@torch.no_grad()
def run_hf_batches(model, prompts, config, batch_size, eos, pad):
    """HF generate on length-sorted batches of batch_size, left-padded (batch_size 1: one
    prompt at a time, no padding). Returns (seconds, useful tokens)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    tokens, t0 = 0, time.perf_counter()
    for s in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[s:s + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        tokens += sum(useful(row, eos) for row in new[:, width:].tolist())
    return time.perf_counter() - t0, tokens


@torch.no_grad()
def step_time(model, rows, width, reps=20):
    """ms of one decode step of isheep's engine at `rows` rows whose positions reach `width`
    columns, as decode runs it on this device (a CUDA graph replay on a GPU), and the step's
    memory floor in bytes: the weights, and the KV cache of the real columns."""
    lane = isheep.Lane(rows, width + reps + 2, model.device)   # room for the warm-up, the replays and one profiled step
    lane.add(model, [[0]] * rows, list(range(rows)), pad=0)   # makes the cache; its contents don't change the time
    lane.pos[:], lane.lengths = width - 1, [width - 1] * rows
    lane.batch, lane.width = isheep.graph_shape(lane, rows, width) if model.device.type == "cuda" else (rows, width)
    with isheep.lane_attention(model):
        step = lambda: isheep.decode_step(model, [lane], 1.0, 0.95, cascade=model.device.type != "cuda")
        run = step
        if model.device.type == "cuda":
            try:
                run = isheep.capture(step, [lane.pos, lane.token], torch.cuda.graph_pool_handle())[0].replay
            except Exception as e:   # as decode does: the same step, eagerly
                print(f"note: the step could not be captured ({type(e).__name__}: {str(e).splitlines()[0][:200]}); timed eagerly")
        run()
        sync(model.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        sync(model.device)
        ms = (time.perf_counter() - t0) / reps * 1000
        kernels = step_kernels(step) if model.device.type == "cuda" else []
    kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in lane.kv.values()) / lane.columns / rows
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return ms, weights + rows * width * kv, kernels


# What a decode step's GPU time goes to, by kernel name (cuBLAS/CUTLASS names, SDPA's, cub's sorts).
KERNEL_KINDS = [("matmul", r"gemm|gemv|cutlass|nvjet|xmma|cublas|splitk"), ("attention", r"fmha|attention|flash|efficient"),
                ("sort (top-p)", r"sort|radix|onesweep"), ("softmax, cumsum, search", r"softmax|scan|cumsum|searchsorted"),
                ("indexing, copies", r"index|copy|memcpy|memset|cat|gather|scatter|fill")]


def step_kernels(step):
    """[(kind, kernels, ms)] of one eager run of step, from the profiler's CUDA kernels: their sum
    against the replay's time is what launches and gaps cost."""
    import re
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync("cuda")
    total = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total:
            kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, event.name, re.I)), "other (norms, rotary, activations)")
            n, ms = total.get(kind, (0, 0.0))
            total[kind] = n + 1, ms + event.device_time_total / 1000
    return sorted(((kind, n, ms) for kind, (n, ms) in total.items()), key=lambda r: -r[2])


def run_hf_continuous(model, prompts, config, eos, max_batch_tokens, cuda_graph=None):
    """HF continuous batching (paged KV cache, requests join and leave the batch every step).
    Left alone on CPU it takes 60% of the machine's RAM for its cache; we give it exactly the
    blocks this workload needs (every request in flight at once). An untimed tiny call first pays
    the one-time costs; the timed call still pays its per-call setup (buffers are sized and
    filled each call: seconds on CPU)."""
    from transformers import ContinuousBatchingConfig

    def cb_config(ps):
        per_request = math.ceil((max(map(len, ps)) + config.max_new_tokens) / 256)   # 256: the default page size
        return ContinuousBatchingConfig(num_blocks=len(ps) * per_request, max_batch_tokens=max_batch_tokens,
                                        use_cuda_graph=cuda_graph)
    model.generate_batch(inputs=prompts[:2], generation_config=copy.deepcopy(config),
                         continuous_batching_config=cb_config(prompts[:2]), max_new_tokens=2)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=cb_config(prompts))
    seconds = time.perf_counter() - t0
    rows = [o.generated_tokens for o in out.values() if o.error is None]
    if len(rows) < len(prompts):
        errors = {o.error for o in out.values() if o.error is not None}
        raise RuntimeError(f"{len(prompts) - len(rows)} of {len(prompts)} requests failed: {errors or 'missing'}")
    return seconds, sum(useful(r, eos) for r in rows)


@torch.no_grad()
def greedy_check(model, tok, prompts, gen_args, max_new_tokens, eos, pad):
    """How many of isheep's batched greedy texts equal HF generate on the prompt alone."""
    from transformers import GenerationConfig
    out, _, _ = run_isheep(model, tok, prompts, gen_args, max_new_tokens=max_new_tokens, temperature=0, top_p=1.0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, top_k=0, eos_token_id=eos, pad_token_id=pad)
    matches = 0
    for i, p in enumerate(prompts):
        row = model.generate(input_ids=torch.tensor([p], device=model.device),
                             attention_mask=torch.ones(1, len(p), dtype=torch.long, device=model.device),
                             generation_config=config)[0, len(p):].tolist()
        end = next((k for k, t in enumerate(row) if t in eos), len(row))
        matches += out[i]["text"] == tok.decode(row[:end], skip_special_tokens=True)
    return matches



def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", default=str(ROOT.parent / "shared/data/self_instruct_seed_tasks.jsonl"),
                   help="seed tasks (isheep.load_seeds): the prompts of every stage")
    p.add_argument("--stage", choices=["responses", "instructions", "judge"], default="responses",
                   help="workload: responses (all methods), or instructions / judge (isheep.generate only)")
    p.add_argument("--n", type=int, default=64, help="prompts: the first n seed tasks (instructions: n few-shot prompts)")
    p.add_argument("--seq-n", type=int, default=16, help="prompts run one at a time for the sequential baseline (its tok/s is what compares)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length cap (responses stage)")
    p.add_argument("--synth-max-new-tokens", type=int, help="task-list length cap, instructions stage (default: 2 x max-new-tokens, as isheep)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of responses and instructions (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (paper: 0.95)")
    p.add_argument("--gen-batch-tokens", type=int, help="isheep's KV-cache token budget (default: isheep's own)")
    p.add_argument("--hf-batch-size", type=int, default=16, help="batch size of the sorted-batches HF baseline")
    p.add_argument("--no-continuous", action="store_true", help="skip HF continuous batching")
    p.add_argument("--cb-cuda-graph", action="store_true", help="also run generate_batch with use_cuda_graph=True")
    p.add_argument("--step-rows", type=int, default=128, help="rows of the timed decode step (GPU)")
    p.add_argument("--isheep", help="measure this isheep.py instead of the repository's (e.g. an older commit's)")
    p.add_argument("--cb-batch-tokens", type=int, default=2048,
                   help="continuous batching's max tokens per forward (its dense attention mask grows with it)")
    p.add_argument("--greedy", action="store_true", help="also check isheep's greedy text equals HF generate on each prompt alone")
    p.add_argument("--greedy-n", type=int, default=4, help="prompts in the --greedy check")
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
    margs = SimpleNamespace(trust_remote_code=False, tp=False, lora_rank=0, gen_batch_tokens=args.gen_batch_tokens,
                            no_progress=True)
    tok, model = load_bench_model(args, margs)
    n_params = sum(q.numel() for q in model.parameters())
    eos = isheep.stop_token_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    seeds = isheep.load_seeds(args.seeds)

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
    prompt_tokens = sum(map(len, prompts))
    print(f"stage {args.stage}: {len(prompts)} prompts, {prompt_tokens / len(prompts):.0f} prompt tokens on average, "
          f"max_new_tokens {kw['max_new_tokens']}, temperature {kw['temperature']}; "
          f"{f'random Qwen2-{args.shape}-shaped' if args.shape else 'demo'} model, {n_params / 1e6:.1f}M params, {args.dtype}"
          + (f"; isheep from {args.isheep}" if args.isheep else ""))
    model.generate(input_ids=torch.tensor([prompts[0]], device=model.device), max_new_tokens=2, pad_token_id=pad)   # warm-up, untimed

    # Each row: (method, prompts, their prompt tokens, useful new tokens, seconds).
    torch.manual_seed(args.seed)
    _, seconds, tokens = run_isheep(model, tok, prompts, margs, seed=args.seed, **kw)
    rows = [("isheep.generate", len(prompts), prompt_tokens, tokens, seconds)]
    print(f"  isheep.generate: {tokens} tokens in {seconds:.1f} s", flush=True)
    notes, greedy = [], None
    if args.stage == "responses":
        config = GenerationConfig(max_new_tokens=kw["max_new_tokens"], do_sample=args.temperature > 0,
                                  temperature=args.temperature if args.temperature > 0 else None,
                                  top_p=args.top_p if args.temperature > 0 else None, top_k=0,
                                  eos_token_id=eos, pad_token_id=pad)
        seq = prompts[:args.seq_n]
        for name, batch, ps in [("HF generate, one prompt at a time", 1, seq),
                                (f"HF generate, sorted batches of {args.hf_batch_size}", args.hf_batch_size, prompts)]:
            if not batch or not ps:   # --seq-n 0, --hf-batch-size 0: skipped (slow on a 7B model)
                continue
            seconds, tokens = run_hf_batches(model, ps, config, batch, eos, pad)
            rows.append((name, len(ps), sum(map(len, ps)), tokens, seconds))
            print(f"  {name}: {tokens} tokens in {seconds:.1f} s", flush=True)
        if args.greedy:   # before continuous batching, which swaps the model's attention for its own
            g = prompts[:args.greedy_n]
            greedy = f"{greedy_check(model, tok, g, margs, args.max_new_tokens, eos, pad)}/{len(g)}"
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
    step = None
    if args.device == "cuda" and args.stage == "responses" and hasattr(isheep, "Lane"):
        width = round(prompt_tokens / len(prompts)) + args.max_new_tokens // 2   # the workload's mean row, half way
        step_ms, floor_bytes, kernels = step_time(model, args.step_rows, width)
        bandwidth = copy_bandwidth(args.device)
        step = dict(step_ms=step_ms, floor_ms=floor_bytes / bandwidth / 1e6)
        print(f"one decode step at {args.step_rows} rows, {width} columns: {step_ms:.2f} ms; memory floor "
              f"{floor_bytes / 1e9:.2f} GB / {bandwidth:.0f} GB/s = {step['floor_ms']:.2f} ms "
              f"({step['floor_ms'] / step_ms:.2f} of the floor's speed)")
        if kernels:
            busy = sum(ms for _, _, ms in kernels)
            print(f"its kernels, run eagerly once under the profiler: {busy:.2f} ms of GPU time "
                  f"({step_ms - busy:+.2f} ms for launches and gaps in the replay)")
            print_table(["kind", "kernels", "ms", "share"], [[k, n, f"{ms:.3f}", f"{ms / busy:.2f}"] for k, n, ms in kernels])
            step["kernels_ms"] = busy
    print_table(["method", "prompts", "new_tok", "time_s", "new_tok/s", "ratio_vs_seq", "peak_frac", "peak_frac_incl_prompt"],
                [[m, n, tokens, f"{s:.1f}", f"{tokens / s:.1f}", f"{tokens / s / seq_rate:.2f}" if seq_rate else "-",
                  f"{2 * n_params * tokens / s / 1e9 / peak:.4f}", f"{2 * n_params * (tokens + pt) / s / 1e9 / peak:.4f}"]
                 for m, n, pt, tokens, s in rows])
    print(f"(new tokens: generated up to and including EOS; peak_frac = 2 x params x new tokens / time / {peak:.1f} GFLOP/s; "
          f"incl_prompt also counts the prompt tokens prefilled)")
    for note in notes:
        print("note:", note)
    if greedy is not None:
        print(f"greedy check: isheep.generate text == HF generate alone on {greedy} prompts")

    ours = rate["isheep.generate"]
    summary = dict(stage=args.stage, n=len(prompts), isheep_tok_s=f"{ours:.2f}",
                   peak_fraction=f"{2 * n_params * ours / 1e9 / peak:.4f}",
                   peak_fraction_incl_prompt=f"{2 * n_params * (rows[0][2] + rows[0][3]) / rows[0][4] / 1e9 / peak:.4f}",
                   prompt_peak_fraction=f"{2 * n_params * rows[0][2] / rows[0][4] / 1e9 / peak:.4f}")   # prefill's share, over the whole time
    if args.stage == "responses":
        hf = {m: r for m, r in rate.items() if m != "isheep.generate"}
        best = max(hf, key=hf.get) if hf else None
        summary.update(ratio_vs_best_hf=f"{ours / hf[best]:.3f}" if best else "-",
                       ratio_vs_sequential=f"{ours / seq_rate:.3f}" if seq_rate else "-",
                       best_hf="-" if not best else "cuda_graph" if "cuda_graph" in best else "continuous"
                       if "continuous" in best else "batched" if "batches" in best else "sequential",
                       **{f"hf_{key}_tok_s": f"{rate[m]:.2f}" for key, m in [
                           ("sequential", "HF generate, one prompt at a time"),
                           ("batched", f"HF generate, sorted batches of {args.hf_batch_size}"),
                           ("continuous", "HF continuous batching (generate_batch)"),
                           ("cuda_graph", "HF generate_batch, use_cuda_graph=True")] if m in rate})
        if step:
            summary.update(step_ms=f"{step['step_ms']:.3f}", floor_ms=f"{step['floor_ms']:.3f}",
                           **({"kernels_ms": f"{step['kernels_ms']:.3f}"} if "kernels_ms" in step else {}),
                           roofline_fraction=f"{step['floor_ms'] / step['step_ms']:.3f}")
        if greedy is not None:
            summary["greedy_match"] = greedy
    summary["peak_gflops"] = f"{peak:.1f}"
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
