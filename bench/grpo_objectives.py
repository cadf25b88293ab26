"""The GRPO objectives side by side on the quickstart task: held-out reward after training.

What is measured
    Each shipped quickstart grpo recipe (`quickstart-grpo`, `-gspo`, `-cispo`, `-rloo`, `-reinforce-pp`,
    `-dapo`) trains from the same SFT policy (`--sft`, the `quickstart-sft` output) for its 100 steps on
    80 two-operation synthetic problems, once per `--seeds` value (train.seed: the rollout samples). Then
    `mathctl eval` scores the result, and the SFT policy itself, on `--heldout` other two-operation problems
    (a different synthetic seed, every training problem removed): greedy accuracy, and the mean correctness
    of 4 samples at temperature 1 (avg@4: the training reward's own measure, on problems never trained
    on). Also printed: the training reward's mean over the first and last 10 steps (for dapo, of every
    generated completion, `gen_reward`) and each run's seconds. Everything is graded against the gold
    answer.

    The runs are the CLI itself, one at a time; a run folder that already has its result is reused, so an
    interrupted comparison resumes. A 0.85M-parameter model on CPU: read the differences against the
    95% intervals printed with them (about +-0.04 greedy on 500 problems), not as a ranking of the
    objectives at scale.

Run
    mathctl sft --recipe quickstart-sft --run-dir runs/sft/quickstart
    python bench/grpo_objectives.py --sft runs/sft/quickstart/final --out runs/bench/objectives
    python bench/grpo_objectives.py --sft runs/sft/quickstart/final --out runs/bench/objectives --seeds 42,1 \\
        --recipes grpo,gspo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECIPES = ("grpo", "gspo", "cispo", "rloo", "reinforce-pp", "dapo")


def mathctl(*args: str, log: Path) -> None:
    with log.open("w") as handle:
        code = subprocess.call([sys.executable, "-m", "mathctl", *args], stdout=handle, stderr=subprocess.STDOUT,
                               cwd=REPO)
    if code != 0:
        raise SystemExit(f"mathctl {args[0]} failed with exit {code}: see {log}")


def heldout_file(out: Path, n: int) -> Path:
    """`n` two-operation problems from another synthetic seed, none equal to a training problem."""
    from mathctl.synthetic import SyntheticSpec, generate

    path = out / "heldout.jsonl"
    if not path.exists():
        # the recipes train on the first 80 problems of synthetic seed 3; the first 2000 are left out (for --set
        # data.synthetic.num_problems up to 2000)
        train = {r["problem"] for r in generate(SyntheticSpec(num_problems=2000, seed=3, max_digits=1, min_ops=2,
                                                              max_ops=2))}
        rows, seen = [], set()
        for r in generate(SyntheticSpec(num_problems=3 * n, seed=17, max_digits=1, min_ops=2, max_ops=2)):
            if r["problem"] not in train and r["problem"] not in seen:
                seen.add(r["problem"])
                rows.append(r)
        if len(rows) < n:
            raise SystemExit(f"only {len(rows)} distinct held-out problems; ask for fewer with --heldout")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return path


def evaluate(out: Path, name: str, model: Path, heldout: Path) -> dict[str, float]:
    scores = {}
    for kind, extra in (("greedy", []), ("t1", ["--n", "4", "--temperature", "1.0"])):
        run = out / "runs" / "eval" / f"{name}-{kind}"
        if not (run / "summary.json").exists():
            mathctl("eval", "--recipe", "quickstart-eval", str(heldout), "--model", str(model), *extra,
                    "--run-dir", str(run), log=out / "logs" / f"eval-{name}-{kind}.log")
        task = next(iter(json.loads((run / "summary.json").read_text())["tasks"].values()))  # the one task
        scores[kind] = task["score"]
        scores["problems"] = task["problems"]
    return scores


def train_figures(run: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    key = "gen_reward" if "gen_reward" in steps[0] else "reward"  # dapo: every completion, not the kept groups
    first, last = steps[:10], steps[-10:]
    summary = json.loads((run / "summary.json").read_text())
    return {"reward_first10": sum(r[key] for r in first) / len(first),
            "reward_last10": sum(r[key] for r in last) / len(last), "seconds": summary["train_seconds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sft", type=Path, required=True, help="the quickstart SFT policy (runs/sft/NAME/final)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/objectives"))
    p.add_argument("--recipes", default=",".join(RECIPES), help="quickstart-NAME grpo recipes, comma-separated")
    p.add_argument("--seeds", default="42", help="train.seed values, comma-separated (42: the recipes' own)")
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="an extra recipe override for every grpo run (repeatable), e.g. data.synthetic.num_problems=800")
    p.add_argument("--tag", default="", help="suffix of the run names, to keep runs with other --set values apart")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from mathctl.evaluate import wilson_interval  # the interval `mathctl eval` reports
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    sft = args.sft.resolve()
    heldout = heldout_file(out, args.heldout)
    rows = [{"recipe": "sft (start)", "seed": None, **evaluate(out, "sft", sft, heldout)}]
    for name in args.recipes.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            tag = (name if seed == 42 else f"{name}-s{seed}") + (f"-{args.tag}" if args.tag else "")
            run = out / "runs" / "grpo" / tag
            if not (run / "final" / "config.json").exists():
                start = time.time()
                resume = ["--resume"] if (run / "meta.json").exists() else [
                    "--recipe", f"quickstart-{name}", "--model", str(sft), f"train.seed={seed}", *args.overrides]
                mathctl("grpo", *resume, "--run-dir", str(run), log=out / "logs" / f"grpo-{tag}.log")
                print(f"{tag}: trained in {time.time() - start:.0f} s", file=sys.stderr)
            rows.append({"recipe": name + (f" {args.tag}" if args.tag else ""), "seed": seed, **train_figures(run), **evaluate(out, tag, run / "final",
                                                                                          heldout)})
    (out / f"results{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(rows, indent=1))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"held-out: {args.heldout} two-operation problems, graded against the gold; tiny:qwen2-small quickstart "
          f"SFT policy; CPU")
    if args.overrides:
        print("every grpo run with: " + " ".join(args.overrides))
    print(f"{'recipe':<20}{'seed':>5}{'train r first10':>17}{'last10':>8}{'greedy':>8}{'95% CI':>15}"
          f"{'avg@4 t=1':>11}{'95% CI':>15}{'s':>6}")
    for r in rows:
        # over problems, not samples: a problem's 4 samples are not independent, so this interval is the wider one
        g = wilson_interval(r["greedy"] * r["problems"], r["problems"])
        t = wilson_interval(r["t1"] * r["problems"], r["problems"])
        train = (f"{r['reward_first10']:>17.3f}{r['reward_last10']:>8.3f}" if "reward_first10" in r
                 else f"{'':>17}{'':>8}")
        print(f"{r['recipe']:<20}{r['seed'] if r['seed'] is not None else '':>5}{train}{r['greedy']:>8.3f}"
              f"{f'{g[0]:.3f}-{g[1]:.3f}':>15}{r['t1']:>11.3f}{f'{t[0]:.3f}-{t[1]:.3f}':>15}"
              f"{r.get('seconds', 0):>6.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
