"""One GPU's share of a tensor-parallel decode step: rank 0 of Qwen1.5-72B over 8 GPUs (isheep --tp).

What is measured and why: under --tp every rank runs the same decode step on its slice of the model (1/8 of the
heads and of the MLP, a vocabulary slice of the embedding and lm_head), with transformers' collectives in between:
an all_reduce after each o_proj and down_proj, one for the vocab-parallel embedding, an all_gather of the logits.
A 72B step is launch-bound when run eagerly (~10 kernels a layer, plus DTensor's Python); isheep captures it as a
CUDA graph. One process stands in for rank 0: a fake 8-rank process group (its collectives move no data and launch
no kernel, so the logits are garbage, but every shape, kernel and byte is the rank's own). The shard is built on the
meta device, sliced by transformers' own tp_plan (the from_pretrained path, without a checkpoint), then only its
local slices are made on --device with random weights. It has Qwen1.5-72B's layer shape and --layers of its 80.

The batch: --rows rows of a realistic width mix, each a self-instruct seed task in the chat template plus a random
number of tokens already generated (uniform below --max-new-tokens), in a SlotCache laid out as isheep.decode lays
it out under the KV budget of an 80 GB card. Its keys are written directly (random): a step's time depends on the
rows' lengths, not on what the keys hold. We time the eager step and its CUDA graph replay against the step's
per-GPU floor: the bytes it must read (the weight slices it multiplies by, and each row's keys and values up to its
position) over the copy bandwidth measured in the same run. The embedding table is not in the floor: a step reads
only its rows' vectors. The last line is key=value.

    python bench/tp_step.py --device cpu --shape small      # smoke test (no graph on a CPU)
    python bench/tp_step.py --device cuda                   # on a GPU: bf16, 8 of the 80 layers
"""

import argparse
import collections
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import isheep  # noqa: E402
from common import copy_bandwidth, print_table, sync  # noqa: E402

QWEN15_72B = dict(hidden_size=8192, intermediate_size=24576, num_attention_heads=64, num_key_value_heads=64,
                  head_dim=128, vocab_size=152064, full_layers=80)
SHAPES = {"72b": QWEN15_72B, "small": dict(QWEN15_72B, hidden_size=256, intermediate_size=768, num_attention_heads=16,
                                           num_key_value_heads=16, head_dim=16)}
COLLECTIVES = ("c10d.", "_c10d_functional.")


def build_shard(shape, layers, world, device, dtype):
    """Rank 0's shard, through transformers' own TP code: a fake `world`-rank group, the mesh from_pretrained
    makes, the model on the meta device, maybe_distribute_model (parameters become DTensors of meta slices, forwards
    get the collectives), then the local slices made on the device and drawn at random."""
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.distributed import DistributedConfig
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    config = Qwen2Config(**{k: v for k, v in shape.items() if k != "full_layers"}, num_hidden_layers=layers,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    dc, _, mesh = Qwen2ForCausalLM.prepare_distribute_model(DistributedConfig(tp_plan="auto", tp_size=world))
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model = Qwen2ForCausalLM.maybe_distribute_model(model, dc, mesh)
    model.to_empty(device=device)   # DTensors stay DTensors: each gets an empty local slice
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            local.zero_() if name.endswith("bias") else local.fill_(1) if "norm" in name else local.normal_(0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)   # its buffers were left empty
    return model.eval()


def local_bytes(tensors):
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def widths(args, rows):
    """Each row's length: a seed task's prompt in the chat template, plus tokens generated so far."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else \
        isheep.load_tokenizer(isheep.demo_model_ref(), SimpleNamespace(trust_remote_code=False))
    seeds = isheep.load_seeds(args.seeds)
    lengths = [len(isheep.encode_prompt(tok, isheep.format_prompt(tok, s["instruction"], s["input"]))) for s in seeds]
    rnd = random.Random(args.seed)
    return [rnd.choice(lengths) + rnd.randint(1, args.max_new_tokens) for _ in range(rows)], max(lengths)


def count_collectives(step):
    """The collectives one eager step runs, by op name (a dispatch mode sees them as the rank issues them)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith(COLLECTIVES) and "wrap_tensor" not in str(func):
                seen[str(func)] += 1
            return func(*args, **(kwargs or {}))
    with Count():
        step()
    return dict(seen)


def timed(run, device, reps):
    run()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1000


@torch.no_grad()   # as isheep.generate: transformers' TP layers take their local inference path
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the measurement), or cpu (a smoke test: no graph)")
    p.add_argument("--shape", choices=list(SHAPES), default="72b", help="Qwen1.5-72B's layer shape, or a small one")
    p.add_argument("--layers", type=int, help="decoder layers of the shard, of Qwen1.5-72B's 80 (default: 8; small: 2)")
    p.add_argument("--world", type=int, default=8, help="ranks of the fake tensor-parallel group")
    p.add_argument("--rows", type=int, default=60, help="rows decoded at once")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="isheep's response cap: rows have generated "
                                                                    "a uniform share of it")
    p.add_argument("--gen-batch-tokens", type=int, help="KV budget in tokens (default: what 70%% of an 80 GB card "
                                                        "holds beside the full 80-layer shard, as isheep --tp)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: .gpu/tokenizer if there, else the demo model's)")
    p.add_argument("--seeds", help="seed tasks (default: .gpu/ or ../shared/data/self_instruct_seed_tasks.jsonl)")
    p.add_argument("--reps", type=int, help="timed steps of each kind (default: 20 on a GPU, 2 on a CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the width mix and the weights")
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.layers = args.layers or (8 if args.shape == "72b" else 2)
    args.reps = args.reps or (20 if gpu else 2)
    dtype = torch.bfloat16 if gpu else torch.float32
    args.tokenizer = args.tokenizer or next((str(d) for d in [ROOT / ".gpu/tokenizer"] if d.is_dir()), None)
    here = ROOT / ".gpu/self_instruct_seed_tasks.jsonl"
    args.seeds = args.seeds or str(here if here.is_file() else ROOT.parent / "shared/data/self_instruct_seed_tasks.jsonl")
    torch.backends.cuda.enable_cudnn_sdp(False)   # as isheep.main
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    shape = SHAPES[args.shape]
    model = build_shard(shape, args.layers, args.world, args.device, dtype)
    weights = local_bytes(model.parameters())
    table, head = local_bytes([model.model.embed_tokens.weight]), local_bytes([model.lm_head.weight])
    q = model.model.layers[0].self_attn.q_proj.weight
    print(f"shard of rank 0 of {args.world}: {args.layers} layers, {weights / 1e9:.2f} GB on {args.device} "
          f"(q_proj {tuple(q.shape)} -> local {tuple(q.to_local().shape)}), built in {time.perf_counter() - t0:.1f} s")

    # The KV budget: isheep.batch_token_budget's, for the whole 80-layer shard on an 80 GB card.
    kv_heads = shape["num_key_value_heads"] // args.world
    token_kv = 2 * args.layers * kv_heads * shape["head_dim"] * dtype.itemsize   # bytes a token, this shard
    full = shape["full_layers"] / args.layers
    budget = args.gen_batch_tokens or int(0.7 * (80e9 - full * (weights - table - head) - table - head) / (full * token_kv))
    lengths, longest_prompt = widths(args, args.rows)
    columns = longest_prompt + args.max_new_tokens + 2 * args.reps + 16   # as decode's, plus the timed steps
    slots = max(args.rows, min(budget // columns, isheep.MAX_ROWS))
    cache = isheep.SlotCache(slots, columns, args.device)
    cache.batch = isheep.graph_rows(args.rows, slots) if gpu else args.rows
    step = lambda: isheep.decode_step(model, cache, 1.0, 0.95, cascade=not gpu)
    with isheep.attending_slots(model, cache):
        step()   # makes the cache's keys and values, then they are filled and the rows placed
        for k, v in cache.kv.values():   # the rows' slots only: a CPU commits no page of the others
            k[:cache.batch].normal_(), v[:cache.batch].normal_()
        cache.pos[:] = 0
        cache.pos[:args.rows] = torch.tensor(lengths, device=args.device) - 1   # its last token is fed, at its position
        cache.token[:] = torch.randint(0, shape["vocab_size"], (slots,), device=args.device)
        collectives = count_collectives(step)
        eager = timed(step, args.device, max(2, args.reps // 2))
        captured, note = None, None
        if gpu:
            try:
                captured = timed(isheep.capture(step, [cache.pos, cache.token], torch.cuda.graph_pool_handle())[0].replay,
                                 args.device, args.reps)
            except Exception as e:   # as decode does: the same step, eagerly
                note = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                print(f"note: the step could not be captured ({note}); timed eagerly only")
    kv = sum(cache.pos[:cache.batch].tolist()) * token_kv   # the columns every row attended in the last step
    read = weights - table + kv
    bandwidth = copy_bandwidth(args.device)
    floor = read / bandwidth / 1e6
    print(f"{args.rows} rows (batch {cache.batch} of {slots} slots x {columns} columns), lengths {min(lengths)}-"
          f"{max(lengths)}, mean {sum(lengths) / len(lengths):.0f}; the KV budget, {budget} tokens, holds "
          f"{budget // columns} rows of {columns} columns")
    print("collectives in one step:", ", ".join(f"{n} x {op}" for op, n in sorted(collectives.items())))
    print(f"per-GPU floor: {(weights - table) / 1e9:.2f} GB of weights + {kv / 1e9:.2f} GB of KV = {read / 1e9:.2f} GB "
          f"at {bandwidth:.0f} GB/s = {floor:.3f} ms")
    best = captured or eager
    print_table(["step", "ms", "floor_ms", "floor/step", "vs eager"],
                [[name, f"{ms:.3f}", f"{floor:.3f}", f"{floor / ms:.3f}", f"{eager / ms:.2f}x"]
                 for name, ms in [("eager", eager), ("CUDA graph", captured)] if ms])
    print(" ".join(f"{k}={v}" for k, v in dict(
        eager_ms=f"{eager:.3f}", captured_ms=f"{captured:.3f}" if captured else "-", floor_ms=f"{floor:.3f}",
        floor_fraction=f"{floor / best:.3f}", speedup_vs_eager=f"{eager / best:.2f}", rows=args.rows,
        layers=args.layers, kv_gb=f"{kv / 1e9:.3f}", weights_gb=f"{weights / 1e9:.3f}",
        capture="ok" if captured else "failed" if note else "skipped").items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
