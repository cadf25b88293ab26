"""The `--dry-run` memory plan (mathctl/memory_plan.py) of every shipped sft, rm and grpo recipe, as one table.

Each recipe is loaded as `mathctl STEP --recipe NAME --dry-run` loads it, with launch.gpu_memory_gb set to
the card size asked for (80 GiB by default), and planned. Columns are GiB per process; `rollouts` is GRPO's
second phase (master weights, optimiser and reference beside the awake vLLM engine); `tight`: fits with less
than 10% to spare, which the CUDA context, NCCL buffers and fragmentation (not counted) can take. Recipes
whose model is an earlier run's final/ (not there before that run) have no architecture to read; they are
planned once more with the architecture their comments name, marked `*`. Then one line per recipe for the issue note.
Arithmetic only: no GPU, no model download, a second or two.

    python bench/memory_plan.py
    python bench/memory_plan.py --gpu-gb 141     # an H200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS = ("sft", "rm", "grpo")
# model.path is a previous run's final/; these recipes' header comments say what that model is
STAND_INS = {"instella-math-stage2": "amd/Instella-3B-Instruct", "instella-math-grpo": "amd/Instella-3B-Instruct"}
COLUMNS = ("parameters", "gradients", "optimiser", "activations", "logits", "reference", "engine")


def plans(gpu_gb: float):
    from mathctl.core.config import available_recipes, load_recipe
    from mathctl.memory_plan import plan_memory
    from mathctl.worker import step_module

    for step in STEPS:
        _, config_cls = step_module(step)
        for name in available_recipes(step):
            overrides = [f"launch.gpu_memory_gb={gpu_gb}"]
            cfg, _ = load_recipe(step, config_cls, name, overrides)
            plan = plan_memory(step, cfg)
            yield f"{step}/{name}", plan
            if not plan.known and name in STAND_INS:
                cfg, _ = load_recipe(step, config_cls, name, overrides + [f"model.path={STAND_INS[name]}"])
                yield f"{step}/{name}*", plan_memory(step, cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    args = parser.parse_args()
    from mathctl.memory_plan import gib

    rows = list(plans(args.gpu_gb))
    header = ["recipe", "model", "N", *COLUMNS, "total", "rollouts", f"fits {args.gpu_gb:g}"]
    table = [header]
    for name, plan in rows:
        if not plan.known:
            table.append([name, plan.model, "", *["?"] * (len(header) - 4), "unknown"])
            continue
        ckpt = "c" if plan.checkpointing else ""
        cells = [f"{gib(plan.parts[c]):.1f}" + (ckpt if c == "activations" else "") for c in COLUMNS]
        fits = "NO" if not plan.fits else "tight" if plan.tight else "yes"
        table.append([name, plan.model, str(plan.processes), *cells, f"{gib(plan.total):.1f}",
                      f"{gib(plan.rollouts):.1f}" if plan.rollouts else "-", fits])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nGiB per process; activations marked c: with gradient checkpointing. * planned with the stand-in "
          f"architecture {', '.join(sorted(set(STAND_INS.values())))} (model.path is an earlier run's final/).\n")
    for name, plan in rows:
        if not plan.known:
            print(f"- {name}: not planned ({plan.source})")
            continue
        verdict = "does NOT fit" if not plan.fits else "fits, within 10%" if plan.tight else "fits"
        line = (f"- {name}: {plan.model}, {plan.processes} process(es), {gib(plan.peak):.1f} of {args.gpu_gb:g} GiB "
                f"per GPU, {verdict}")
        print(line + (f": {plan.warning()}" if not plan.fits else ""))


if __name__ == "__main__":
    main()
