"""Data-parallel inference: N engine replicas on one machine, each on its own GPUs and its own problems.

`eval` and `mcts-sample` with `engine.data_parallel_size: N` (or `launch.num_processes: N`, which says the
same) start N worker processes (`python -m mathctl.worker REPLICA/recipe.yaml`). Replica k searches or answers
every N-th problem from k of this run's problems (after `--shard`, so shards and replicas compose; across
machines `--slurm` does that split itself, mathctl/nodes.py) with CUDA_VISIBLE_DEVICES set to its own
`engine.tensor_parallel_size` GPUs (on a machine without GPUs: CPU replicas sharing the cores).

Each replica writes an ordinary run folder under `RUN/replicas/k-of-N` and resumes it on its own; the parent
shows one progress bar fed by the lines the replicas append, and once every replica has finished it merges
their files into RUN the way `merge` combines `--shard` runs. A replica that fails leaves the others running
to the end; rerunning with `--resume` continues only what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mathctl.core.errors import ConfigError, EngineError


def parse_slice(text: str) -> tuple[int, int]:
    """`k/N` -> (k, N) with 0 <= k < N (the form of --shard and of a replica's slice)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"a shard must look like i/N, e.g. 0/4 (got {text!r})") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"a shard i/N needs 0 <= i < N (got {text!r})")
    return k, n


def take_slice(rows: list, text: str | None) -> list:
    """Every N-th row from k (all rows when `text` is None)."""
    if not text:
        return rows
    k, n = parse_slice(text)
    return rows[k::n]


def device_groups(count: int, tensor_parallel: int, device: str = "auto") -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each replica: consecutive groups of `tensor_parallel` of the visible GPUs;
    None for every replica when the engines run on CPU (`device: cpu`, or no GPU visible).

    Raises:
        ConfigError: fewer visible GPUs than replicas x tensor_parallel.
    """
    if device == "cpu":
        return [None] * count
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
    else:
        try:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]  # NVML: does not initialise CUDA here
        except Exception:  # noqa: BLE001 - no torch or a broken driver: CPU replicas
            ids = []
    if not ids:
        if device == "cuda":
            raise ConfigError("engine.device=cuda but no GPU is visible", hint="run on a GPU machine, or set engine.device=cpu")
        return [None] * count
    need = count * tensor_parallel
    if len(ids) < need:
        raise ConfigError(f"{count} engine replicas x tensor_parallel_size {tensor_parallel} need {need} GPUs; "
                          f"{len(ids)} are visible ({','.join(ids)})",
                          hint="lower engine.data_parallel_size (or launch.num_processes), or make more GPUs visible")
    return [",".join(ids[k * tensor_parallel:(k + 1) * tensor_parallel]) for k in range(count)]


def check_layout(run_dir, count: int) -> None:
    """A run keeps its number of replicas: each one's problems depend on it (meta.json `replicas`).

    Raises:
        ConfigError: a resume with another number of replicas than the run started with.
    """
    before = run_dir.read_meta().get("replicas", 1 if (run_dir.path / "summary.json").exists()
                                      or _has_rows(run_dir.path) else None)
    if before is not None and before != count:
        raise ConfigError(f"{run_dir.path} ran with {before} engine replica(s); this resume asks for {count}",
                          hint=f"resume with engine.data_parallel_size={before} (or launch.num_processes="
                               f"{before}), or start a new run folder")
    run_dir.update_meta(replicas=count)


def _has_rows(folder: Path) -> bool:
    return any((folder / name).is_file() and (folder / name).stat().st_size > 0
               for name in ("results.jsonl", "trees.jsonl"))


class _LineCounter:
    """New lines appended to a file since the last call (the replicas' results.jsonl / trees.jsonl)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_lines(self) -> int:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        return data.count(b"\n")


def run_replicas(step: str, configs: Sequence[Any], folder: Path, *, engine, rows_file: str, total: int,
                 label: str) -> list[Path]:
    """Run one worker per config (replica k gets `configs[k]`, a recipe of one engine and its slice) in
    `folder/replicas/k-of-N`, wait for all, and return their folders; finished replicas are not rerun.

    Raises:
        EngineError: a replica failed (its own output says why); the others ran to their end.
    """
    from mathctl.core.config import dump_yaml
    from mathctl.core.console import log, progress
    from mathctl.core.rundir import RunDir

    count = len(configs)
    groups = device_groups(count, engine.tensor_parallel_size, engine.device)
    folders = [folder / "replicas" / f"{k}-of-{count}" for k in range(count)]
    processes: list[subprocess.Popen | None] = []
    counters = []
    already = 0
    for k, (cfg, sub) in enumerate(zip(configs, folders)):
        counter = _LineCounter(sub / rows_file)
        already += counter.new_lines()
        counters.append(counter)
        if RunDir(sub).completed_summary() is not None:
            processes.append(None)
            continue
        resume = (sub / "recipe.yaml").is_file()
        run = RunDir.create(sub, recipe_yaml=dump_yaml(cfg), step=step, resume=resume, seeds=cfg.seeds())
        env = dict(os.environ, MATHCTL_NO_PROGRESS="1", MATHCTL_LOG_PREFIX=f"[replica {k}/{count}] ")
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # each replica is a process of its own, not a rank of ours
        if groups[k] is not None:
            env["CUDA_VISIBLE_DEVICES"] = groups[k]
        elif "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
        where = f"GPU {groups[k]}" if groups[k] is not None else "CPU"
        log(f"replica {k}/{count}: {where}, run folder {run.path}" + (" (resumed)" if resume else ""))
        processes.append(subprocess.Popen([sys.executable, "-m", "mathctl.worker", str(run.recipe_path)], env=env))
    codes: list[int] = [0] * count
    try:
        with progress(f"{label} ({count} replicas)", total) as advance:
            advance(already)
            while True:
                running = [p for p in processes if p is not None and p.poll() is None]
                fresh = sum(counter.new_lines() for counter in counters)
                if fresh:
                    advance(fresh)
                if not running:
                    break
                time.sleep(0.5)
    except BaseException:
        for process in processes:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in processes:
            if process is not None:
                process.wait()
        raise
    for k, process in enumerate(processes):
        if process is not None:
            codes[k] = process.wait()
    failed = [k for k, code in enumerate(codes) if code != 0]
    if failed:
        reasons = []
        for k in failed:
            error = RunDir(folders[k]).read_meta().get("error")
            reasons.append(f"replica {k} (exit {codes[k]}{': ' + error if error else ''})")
        raise EngineError(f"{len(failed)} of {count} engine replicas failed: {'; '.join(reasons)}",
                          hint=f"see their output above and {folders[failed[0]]}; fix the cause and rerun with "
                               "--resume (finished replicas are kept)")
    return folders
