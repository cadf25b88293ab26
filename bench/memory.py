"""Peak memory of one training step's loss (forward and backward) on a model with Qwen2.5's vocabulary
(151,936) and a tiny body, where nearly all memory is logits: mathctl's chunked LM head
(`train.logits_chunk_tokens`, mathctl/losses.py), the full-logits path it replaced (`logits_chunk_tokens=null`),
and transformers' own `labels=` loss on the same tokens. Each figure comes from a fresh process: its peak
resident memory (ru_maxrss) minus its resident memory just before the step, in GB.

Rows: sft (every position trained) at 4096 and 8192 tokens per micro-batch, grpo (log-probs of 4 completions
after 64-token prompts, as grpo's update computes them; transformers: its labels= loss on the completion tokens)
at 4096 tokens. Goals (issue 19): chunked <= 0.5x of
transformers' peak, and at least 4x below the full-logits peak.

    python bench/memory.py            # about 2 minutes on 2 cores, 20 GB of RAM free for the 8k rows
    python bench/memory.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 151_936


def rss_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def one(step: str, mode: str, tokens: int, chunk: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").train()
    rows = 4
    width = tokens // rows
    ids = torch.randint(0, VOCAB, (rows, width))
    before = rss_gb()
    if step == "sft":
        from mathctl.sft import token_nll_sum

        targets = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
        if mode == "transformers":
            labels = ids.clone()
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        else:
            batch = {"input_ids": ids, "targets": targets}
            loss = token_nll_sum(model, batch, torch.device("cpu"), None if mode == "full" else chunk)
    else:
        from mathctl.grpo import build_batch, completion_logprobs

        prompt = 64
        items = [{"prompt_ids": ids[r, :prompt].tolist(), "completion_ids": ids[r, prompt:].tolist()}
                 for r in range(rows)]
        batch = build_batch(items, pad_id=0, device=torch.device("cpu"))
        if mode == "transformers":  # its labels= loss over the completion tokens
            labels = batch["input_ids"].clone()
            labels[:, :prompt] = -100
            loss = model(input_ids=batch["input_ids"], labels=labels, use_cache=False).loss
        else:
            logps, _ = completion_logprobs(model, batch, 1.0, chunk_tokens=None if mode == "full" else chunk)
            loss = -(logps * batch["completion_mask"]).sum()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"step": step, "mode": mode, "tokens": tokens, "chunk": chunk, "peak_gb": round(peak - before, 3),
            "loss": float(loss)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, default=1024, help="train.logits_chunk_tokens of the chunked rows")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    parser.add_argument("--one", nargs=3, metavar=("STEP", "MODE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]), args.chunk)))
        return 0
    plan = [("sft", 4096), ("sft", 8192), ("grpo", 4096)]
    results = []
    for step, tokens in plan:
        for mode in ("chunked", "full", "transformers"):
            out = subprocess.run([sys.executable, __file__, "--one", step, mode, str(tokens), "--chunk", str(args.chunk)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                results.append({"step": step, "mode": mode, "tokens": tokens, "error": out.stderr.strip()[-300:]})
            else:
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"peak memory of one loss forward+backward, vocab {VOCAB}, tiny body (fp32, CPU, "
          f"{os.cpu_count()} cores), chunk {args.chunk} tokens; GB above the process before the step")
    print(f"{'step':6} {'tokens':>7} {'chunked':>9} {'full':>9} {'transformers':>13} {'full/chunked':>13} "
          f"{'chunked/transformers':>21}")
    for step, tokens in plan:
        row = {r["mode"]: r for r in results if r["step"] == step and r["tokens"] == tokens}
        peak = {m: row[m].get("peak_gb") for m in row}
        if any(v is None for v in peak.values()):
            print(f"{step:6} {tokens:7d} failed: " + "; ".join(r.get("error", "") for r in row.values()))
            continue
        print(f"{step:6} {tokens:7d} {peak['chunked']:9.2f} {peak['full']:9.2f} {peak['transformers']:13.2f} "
              f"{peak['full'] / peak['chunked']:12.1f}x {peak['chunked'] / peak['transformers']:20.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
