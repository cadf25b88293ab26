"""Worker entry started by `accelerate launch`: `python -m mathctl.worker RUN_DIR/recipe.yaml`.

It takes nothing but the resolved recipe; the step is named inside it (`step: sft`). The sbatch script of a
multi-node inference run adds `--node I` (node I's slice of the problems) or `--merge-nodes` (mathctl/nodes.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mathctl.core.errors import ConfigError, MathctlError

STEPS = {"sft": ("mathctl.sft", "SFTConfig"), "eval": ("mathctl.evaluate", "EvalConfig"),
         "data": ("mathctl.data", "PrepareConfig"), "rm": ("mathctl.rm", "RMConfig"),
         "grpo": ("mathctl.grpo", "GRPOConfig"), "mcts": ("mathctl.mcts_sample", "MCTSConfig"),
         "dpo": ("mathctl.dpo", "DPOConfig"), "pairs": ("mathctl.pairs", "PairsConfig"),
         "pipeline": ("mathctl.pipeline", "PipelineConfig")}
RECIPELESS = {"convert-ckpt": "mathctl.convert"}  # steps without a recipe (their config is their arguments)


def step_module(step: str):
    import importlib

    if step in RECIPELESS:
        return importlib.import_module(RECIPELESS[step]), None
    module_name, config_name = STEPS[step]
    module = importlib.import_module(module_name)
    return module, getattr(module, config_name)


def main(argv: list[str] | None = None) -> int:
    import yaml

    from mathctl.core.config import validate
    from mathctl.core.console import console, is_rank_zero
    from mathctl.core.rundir import RunDir

    args = list(sys.argv[1:] if argv is None else argv)
    node: str | None = None
    merge = "--merge-nodes" in args
    if merge:
        args.remove("--merge-nodes")
    if "--node" in args[:-1]:
        at = args.index("--node")
        node = args[at + 1]
        del args[at:at + 2]
    if len(args) != 1 or (merge and node is not None):
        print("usage: python -m mathctl.worker RUN_DIR/recipe.yaml [--node I | --merge-nodes]", file=sys.stderr)
        return 2
    recipe_path = Path(args[0])
    run_dir = RunDir(recipe_path.parent)
    try:
        data = yaml.safe_load(recipe_path.read_text())
        step = data.get("step", "sft")
        module, config_cls = step_module(step)
        cfg = validate(config_cls, data, source=str(recipe_path))
        if node is not None or merge:
            from mathctl import nodes

            if not hasattr(module, "node_config"):
                raise ConfigError(f"{step} does not split its work by node", hint="run the step without --node")
            if node is not None:
                nodes.run_node(step, module, cfg, run_dir.path, nodes.parse_node(node, cfg.launch.num_machines))
                return 0
            run_dir.finish("completed", nodes.merge_nodes(module, cfg, run_dir))
        else:
            module.run(cfg, run_dir)
    except MathctlError as exc:
        if is_rank_zero():
            from rich.text import Text

            console.print(Text("error: ", style="red") + Text(exc.message))
            if exc.hint:
                console.print(Text(f"hint: {exc.hint}"))
            run_dir.update_meta(status="failed", error=exc.message)
        return exc.exit_code
    except BaseException:
        if is_rank_zero() and run_dir.meta_path.exists():
            run_dir.update_meta(status="failed")
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
