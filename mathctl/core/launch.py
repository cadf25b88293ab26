"""Run a step in this process, or start its workers with `accelerate launch`, or write an sbatch script.

The CLI process validates the recipe and writes the run folder; with more than one process it then
runs `accelerate launch ... -m mathctl.worker RUN_DIR/recipe.yaml` (accelerate knows the
multi-node arguments; the worker owns sharding, see training.py). `--slurm` renders a script that
does the same on every node of an allocation.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from mathctl.core.config import LaunchConfig
from mathctl.core.errors import ConfigError


def needs_launcher(launch: LaunchConfig) -> bool:
    return launch.num_processes > 1 or launch.num_machines > 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_args(launch: LaunchConfig, *, machine_rank: str, main_ip: str, main_port: str) -> list[str]:
    """`accelerate launch` flags. `--multi_gpu` selects accelerate's torchrun path, which is also
    what starts several CPU processes (the workers then use gloo)."""
    return [
        "--multi_gpu",
        "--num_processes", str(launch.num_processes),
        "--num_machines", str(launch.num_machines),
        "--machine_rank", machine_rank,
        "--main_process_ip", main_ip,
        "--main_process_port", main_port,
        "--mixed_precision", "no",  # precision is the recipe's (train.precision), applied by the worker
        "--dynamo_backend", "no",
    ]


# The launcher (torch elastic under accelerate) reports a failed worker with log lines like this one,
# then its own traceback; that report is noise when the worker already printed a user error.
_LAUNCHER_FAILURE = re.compile(r"torch/distributed/elastic/.*(failed \(exitcode|closing signal)")


def launch_local(launch: LaunchConfig, recipe_path: Path, user_error: Callable[[], bool] = lambda: False) -> int:
    """Start all processes on this machine and wait; returns their exit code.

    Worker output is forwarded to stderr as it comes. Once the launcher starts reporting a failed
    worker, its lines are held back and shown only if the failure was not a user error (for which
    the worker printed the one `error:` line already).
    """
    if launch.num_machines > 1:
        raise ConfigError(
            f"launch.num_machines={launch.num_machines} needs one launcher per machine",
            hint="add --slurm to write (and --submit to submit) an sbatch script that starts every node",
        )
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.num_processes))
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           *accelerate_args(launch, machine_rank="0", main_ip="127.0.0.1", main_port=str(free_port())),
           "-m", "mathctl.worker", str(recipe_path)]
    process = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    held: list[str] = []
    assert process.stderr is not None
    for line in process.stderr:
        if held or _LAUNCHER_FAILURE.search(line):
            held.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
    code = process.wait()
    if held and not (code != 0 and user_error()):
        sys.stderr.writelines(held)
    return code


def render_slurm(step: str, launch: LaunchConfig, run_dir: Path, *, engine=None, one_worker: bool = False) -> str:
    """An sbatch script that starts `accelerate launch` once per node with that node's rank.

    With `one_worker` (a step that places its own processes: eval's and mcts-sample's engine replicas) each node
    runs one plain worker that gets the GPUs of its replicas: on one node that worker is the run; on M nodes
    worker `--node i` answers the i-th of M slices of the problems in RUN/nodes/i-of-M (mathctl/nodes.py), and
    once every node is done `--merge-nodes` combines their folders into RUN, as `merge` does with shards."""
    slurm = launch.slurm
    per_node = launch.processes_per_machine
    if one_worker:
        replicas = max(launch.num_processes, getattr(engine, "data_parallel_size", 1))
        per_node = max(1, replicas // launch.num_machines) * getattr(engine, "tensor_parallel_size", 1)
    run_dir = run_dir.resolve()
    recipe = run_dir / "recipe.yaml"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=mathctl-{step}-{run_dir.name}",
        f"#SBATCH --nodes={launch.num_machines}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}",
        f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
        f"#SBATCH --time={slurm.time}",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
    ]
    if slurm.partition:
        lines.append(f"#SBATCH --partition={slurm.partition}")
    if slurm.account:
        lines.append(f"#SBATCH --account={slurm.account}")
    lines += [f"#SBATCH {extra}" for extra in slurm.extra_sbatch]
    lines += ["", f"# Written by mathctl {step}; starts the same job on every node.", "set -euo pipefail", ""]
    lines += slurm.setup
    # The first node of the allocation hosts the rendezvous.
    lines += [
        'export MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MAIN_PORT={launch.main_process_port}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        "",
    ]
    worker = f"{shlex.quote(sys.executable)} -m mathctl.worker {shlex.quote(str(recipe))}"
    if one_worker and launch.num_machines == 1:
        lines.append(f"srun --nodes=1 --ntasks=1 {worker}")
        return "\n".join(lines) + "\n"
    if one_worker:
        # single quotes: $SLURM_NODEID must expand on each node. A node that fails leaves the others running
        # (their folders resume); the merge runs only when every node finished (set -e stops the script before it).
        lines.append(f"srun --nodes={launch.num_machines} --ntasks-per-node=1 bash -c "
                     f"{shlex.quote(worker + ' --node $SLURM_NODEID')}")
        lines.append(f"{worker} --merge-nodes")
        return "\n".join(lines) + "\n"
    args = accelerate_args(launch, machine_rank="$SLURM_NODEID", main_ip="$MAIN_IP", main_port="$MAIN_PORT")
    launcher = " ".join(shlex.quote(a) if not a.startswith("$") else a for a in args)
    inner = (f"{shlex.quote(sys.executable)} -m accelerate.commands.launch {launcher} "
             f"-m mathctl.worker {shlex.quote(str(recipe))}")
    # single quotes: $SLURM_NODEID must expand on each node, not where sbatch runs
    lines.append(f"srun --kill-on-bad-exit=1 --nodes={launch.num_machines} --ntasks-per-node=1 bash -c "
                 f"{shlex.quote(inner.replace('$MAIN_IP', '${MAIN_IP}').replace('$MAIN_PORT', '${MAIN_PORT}'))}")
    return "\n".join(lines) + "\n"
