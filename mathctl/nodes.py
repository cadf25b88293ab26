"""Data-parallel inference across machines: `eval` and `mcts-sample` with `launch.num_machines: M` and `--slurm`.

The sbatch script (core/launch.py `render_slurm`) runs `python -m mathctl.worker RUN/recipe.yaml --node i` on
node i of the allocation. That worker takes the i-th of M slices of the problems (every M-th from i, the same
split as `--shard i/M`) into an ordinary run folder RUN/nodes/i-of-M, with `launch.num_processes / M` engine
replicas on the node's GPUs (mathctl/replicas.py), and resumes it when rerun. When every node has finished,
`--merge-nodes` combines the node folders into RUN the way `merge` combines shards. The step module supplies two
hooks: `node_config(cfg, i, m)` (the node's recipe) and `merge_nodes(cfg, run_dir, folders)` (the merged
summary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mathctl.core.errors import ConfigError


def node_folders(run_path: Path, machines: int) -> list[Path]:
    return [run_path / "nodes" / f"{i}-of-{machines}" for i in range(machines)]


def per_node_replicas(replicas: int, machines: int) -> int:
    """Engine replicas on each node: the run's replicas (launch.num_processes, or engine.data_parallel_size,
    counted over all machines) split evenly.

    Raises:
        ConfigError: a count that does not split evenly.
    """
    if replicas % machines:
        raise ConfigError(f"{replicas} engine replicas do not split evenly over launch.num_machines={machines}",
                          hint="make launch.num_processes (or engine.data_parallel_size) a multiple of "
                               "launch.num_machines; it counts replicas over all machines")
    return replicas // machines


def parse_node(text: str, machines: int) -> int:
    try:
        node = int(text)
    except ValueError:
        node = -1
    if not 0 <= node < machines:
        raise ConfigError(f"--node {text!r}: this run has launch.num_machines={machines} nodes, 0..{machines - 1}",
                          hint="the sbatch script passes $SLURM_NODEID; run it with sbatch")
    return node


def run_node(step: str, module: Any, cfg: Any, run_path: Path, node: int) -> dict[str, Any]:
    """Node `node`'s slice into RUN/nodes/i-of-M; a finished node folder is not rerun."""
    from mathctl.core.config import dump_yaml
    from mathctl.core.console import log
    from mathctl.core.rundir import RunDir

    machines = cfg.launch.num_machines
    sub_cfg = module.node_config(cfg, node, machines)
    folder = node_folders(run_path, machines)[node]
    done = RunDir(folder).completed_summary()
    if done is not None:
        log(f"node {node}/{machines}: {folder} finished already")
        return done
    resume = (folder / "recipe.yaml").is_file()
    run = RunDir.create(folder, recipe_yaml=dump_yaml(sub_cfg), step=step, resume=resume, seeds=sub_cfg.seeds())
    log(f"node {node}/{machines}: run folder {run.path}" + (" (resumed)" if resume else ""))
    with run.failing():
        return module.run(sub_cfg, run)


def merge_nodes(module: Any, cfg: Any, run_dir) -> dict[str, Any]:
    """Every node's folder, finished, merged into `run_dir` by the step's hook.

    Raises:
        ConfigError: a node that has not finished (its folder and status named).
    """
    from mathctl.core.rundir import RunDir

    folders = node_folders(run_dir.path, cfg.launch.num_machines)
    for folder in folders:
        if RunDir(folder).completed_summary() is None:
            status = RunDir(folder).read_meta().get("status", "not started") if (folder / "meta.json").is_file() \
                else "not started"
            raise ConfigError(f"node folder {folder} has not finished ({status})",
                              hint="submit the sbatch script again: finished nodes are kept, the others resume")
    return module.merge_nodes(cfg, run_dir, folders)
