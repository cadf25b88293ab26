"""MCTS batching: engine calls and seconds per problem, batched trees vs one node per engine call.

What is measured
    `mathctl mcts-sample` (the CLI command, in this process) twice on the same policy and problems:
    once with `search.batch_problems=P` (one engine call expands the chosen nodes of all P trees) and
    once with `search.batch_problems=1` (each engine call expands a single node: the unbatched
    peer). Continuations are seeded by (seed, problem, node), so both runs grow the same trees (up to
    floating-point differences between batch shapes); the bench reports how many trees came out
    identical. Figures come from each run's summary.json: engine calls, seconds, executions.

    Without --model the policy is trained first (`mathctl sft --recipe quickstart-sft-code`, ~50 s
    on 2 CPU cores).

Run
    python bench/mcts.py                                   # CPU, trains the tiny code policy
    python bench/mcts.py --model runs/sft/quickstart-code/final --problems 64
    python bench/mcts.py --model POLICY --device cuda --problems 256 --iterations 8
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
    p.add_argument("--model", default=None, help="Code-format policy; default: train quickstart-sft-code first.")
    p.add_argument("--problems", type=int, default=48)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="n_generate_sample")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from mathctl import cli

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            code = cli.main(["sft", "--recipe", "quickstart-sft-code", "output.save_every_steps=null",
                             "output.plots=false", "--run-dir", f"{tmp}/policy"])
            if code != 0:
                return code
            model = f"{tmp}/policy/final"
        runs = {}
        for label, batch in (("batched", args.problems), ("one_node_per_call", 1)):
            out = Path(tmp) / label
            code = cli.main(["mcts-sample", "--recipe", "quickstart-mcts", "--model", model,
                             f"data.limit={args.problems}", f"data.synthetic.num_problems={args.problems}",
                             f"search.iterations={args.iterations}", f"search.n_generate_sample={args.samples}",
                             f"search.batch_problems={batch}", f"engine.device={args.device}",
                             "--run-dir", str(out)])
            if code != 0:
                return code
            summary = json.loads((out / "summary.json").read_text())
            trees = [json.loads(line) for line in (out / "trees.jsonl").read_text().splitlines()]
            runs[label] = (summary, trees)
    (b, b_trees), (u, u_trees) = runs["batched"], runs["one_node_per_call"]
    same = sum(json.dumps(x["nodes"]) == json.dumps(y["nodes"]) for x, y in zip(b_trees, u_trees))
    figures = {
        "problems": args.problems, "iterations": args.iterations, "n_generate_sample": args.samples,
        "batched_engine_calls": b["engine_calls"], "unbatched_engine_calls": u["engine_calls"],
        "engine_call_ratio": round(u["engine_calls"] / max(b["engine_calls"], 1), 1),
        "batched_s_per_problem": b["seconds_per_problem"], "unbatched_s_per_problem": u["seconds_per_problem"],
        "speedup": round(u["seconds"] / max(b["seconds"], 1e-9), 2),
        "batched_solve_rate": b["solve_rate"], "unbatched_solve_rate": u["solve_rate"],
        "executions": b["executions"], "identical_trees": f"{same}/{len(b_trees)}",
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
