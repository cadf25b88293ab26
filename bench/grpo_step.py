"""Where the time of one GRPO step goes: generation, reward, training, weight push.

What is measured
    `mathctl grpo` itself (the CLI command, in this process) for `--steps` steps on a random-
    initialised model of `--preset`, with `--prompts` prompts x `--group` completions of exactly up to
    `--max-new-tokens` tokens; the figures are the `generation_s`, `reward_s`, `train_s` and
    `weight_sync_s` that the run writes to metrics.jsonl, from the last step (the first one pays for
    warm-up). A random model rarely emits EOS, so completions run to the token budget: the
    generation figure is the worst case for that budget.

Run
    python bench/grpo_step.py                                         # CPU, tiny:qwen2-small
    python bench/grpo_step.py --device cuda --preset qwen2.5-0.5b --prompts 16 --group 8 \\
        --max-new-tokens 512 --precision bf16                         # GPU: Qwen2.5-0.5B-sized
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--preset", default="qwen2-small")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from mathctl import cli

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        code = cli.main(["grpo", "--recipe", "quickstart-grpo", f"model.path=tiny:{args.preset}",
                         f"grpo.prompts_per_step={args.prompts}", f"grpo.group_size={args.group}",
                         f"grpo.max_completion_len={args.max_new_tokens}", f"train.max_steps={args.steps}",
                         f"train.micro_batch_size={args.micro_batch_size}", f"train.precision={args.precision}",
                         f"engine.backend={args.backend}", f"engine.device={args.device}",
                         "data.synthetic.num_problems=256", "output.save_every_steps=null", "output.plots=false",
                         "output.save_hf_checkpoints=false", "--run-dir", str(run)])
        if code != 0:
            return code
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    figures = {"preset": args.preset, "device": args.device, "completions": args.prompts * args.group,
               "completion_tokens_mean": round(last["completion_len"], 1),
               **{k: round(last[k], 3) for k in ("generation_s", "reward_s", "train_s", "weight_sync_s")}}
    figures["step_s"] = round(sum(figures[k] for k in ("generation_s", "reward_s", "train_s", "weight_sync_s")), 3)
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
