"""`mathctl eval` end to end on a tiny model and the real benchmark files in ../shared/data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mathctl.core.config import SamplingConfig
from mathctl.engines import Sample

BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"
pytestmark = pytest.mark.skipif(not (BENCH / "math500" / "test.jsonl").is_file(),
                                reason="../shared/data/benchmarks is beside the checkout in CI")


def _results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def greedy_run(lively_model, tmp_path_factory):
    from conftest import run_cli

    folder = tmp_path_factory.mktemp("eval") / "greedy"
    proc = run_cli("eval", "math500", "--model", str(lively_model), "--data-dir", str(BENCH), "--limit", "8",
                   "--max-new-tokens", "24", "--json", "--run-dir", str(folder))
    return folder, proc


def test_math500_end_to_end(greedy_run):
    folder, proc = greedy_run
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    task = summary["tasks"]["math500"]
    assert task["problems"] == 8 and task["n"] == 1 and "accuracy" in task
    assert task["generated_tokens"] > 0 and task["seconds"] > 0 and task["version"] == 1
    assert summary["prompt_format"] == "chat" and summary["chat_template_digest"]
    assert json.loads((folder / "summary.json").read_text())["tasks"] == summary["tasks"]
    assert json.loads((folder / "meta.json").read_text())["status"] == "completed"
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    records = _results(folder)
    assert [r["index"] for r in records] == list(range(8))
    assert records[0]["gold"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert all(len(r["samples"]) == 1 and r["samples"][0]["num_tokens"] > 0 for r in records)
    assert "math500" in proc.stderr and "pass@k" in proc.stderr  # the rich table


def test_sampled_metrics_and_min_score_gate(lively_model, tmp_path, cli):
    proc = cli("eval", "aime24", "--model", str(lively_model), "--data-dir", str(BENCH), "--limit", "3", "--n", "4",
               "--temperature", "1.0", "--max-new-tokens", "8", "--min-score", "0.5", "--json",
               "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 3, proc.stderr
    assert "error: score below --min-score 0.5: aime2024" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    entry = summary["tasks"]["aime2024"]
    assert summary["gate"] == "failed" and entry["n"] == 4 and "avg@4" in entry
    assert list(entry["pass@k"]) == ["1", "2", "4"] and list(entry["maj@k"]) == ["1", "2", "4"]
    assert entry["sampling"]["top_p"] == 0.95  # the task default survives --temperature
    texts = [s["text"] for s in _results(tmp_path / "r")[0]["samples"]]
    assert len(set(texts)) > 1
    ok = cli("eval", "aime24", "--model", str(lively_model), "--data-dir", str(BENCH), "--limit", "1", "--n", "1",
             "--max-new-tokens", "4", "--min-score", "0", "--run-dir", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr


def test_unknown_task_and_bad_inputs_exit_2(tiny_model, tmp_path, cli):
    proc = cli("eval", "math5000", "--model", str(tiny_model), "--data-dir", str(BENCH), "--run-dir", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "unknown eval task 'math5000'" in proc.stderr and "math500" in proc.stderr and "aime2024" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
    proc = cli("eval", "gsm8k", "--model", str(tiny_model), "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "y"))
    assert proc.returncode == 2 and "gsm8k/test.jsonl" in proc.stderr and not (tmp_path / "y").exists()
    from mathctl.engines import vllm_available

    if not vllm_available():  # where it imports, eval on vLLM is what tests/vllm checks
        proc = cli("eval", "gsm8k", "--model", str(tiny_model), "--data-dir", str(BENCH), "engine.backend=vllm",
                   "--run-dir", str(tmp_path / "z"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "vLLM is not installed" in proc.stderr and "pip install" in proc.stderr
    proc = cli("eval", "gsm8k", "--data-dir", str(BENCH))
    assert proc.returncode == 2 and "needs a model" in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = cli("eval", str(empty), "--model", str(tiny_model), "--run-dir", str(tmp_path / "e"))
    assert proc.returncode == 2 and f"no problems in {empty}" in proc.stderr and not (tmp_path / "e").exists()


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_results(lively_model, tmp_path, cli):
    args = ["eval", "gsm8k", "--model", str(lively_model), "--data-dir", str(BENCH), "--limit", "10", "--n", "2",
            "--temperature", "1.0", "--max-new-tokens", "120", "eval.chunk_problems=1"]
    folder = tmp_path / "killed"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "mathctl", *args, "--run-dir", str(folder)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = folder / "results.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and results.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _results(folder)
    assert 3 <= len(before) < 10
    resumed = cli("eval", "--resume", "--run-dir", str(folder), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: " in resumed.stderr
    after = _results(folder)
    assert [r["index"] for r in after] == list(range(10))
    assert after[: len(before)] == before  # nothing written is lost or rewritten
    fresh = cli(*args, "--run-dir", str(tmp_path / "fresh"))
    assert fresh.returncode == 0, fresh.stderr
    strip = [[(s["text"], s["correct"]) for s in r["samples"]] for r in after]
    assert strip == [[(s["text"], s["correct"]) for s in r["samples"]] for r in _results(tmp_path / "fresh")]
    summary = json.loads(resumed.stdout)
    assert summary["tasks"]["gsm8k"]["problems"] == 10
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "completed" and len(meta["resumed"]) == 1


def test_shards_merge_into_the_unsharded_result(greedy_run, lively_model, tmp_path, cli):
    reference, _ = greedy_run
    shards = []
    for i in range(2):
        folder = tmp_path / f"shard{i}"
        proc = cli("eval", "math500", "--model", str(lively_model), "--data-dir", str(BENCH), "--limit", "8",
                   "--max-new-tokens", "24", "--shard", f"{i}/2", "--run-dir", str(folder))
        assert proc.returncode == 0, proc.stderr
        assert [r["index"] for r in _results(folder)] == list(range(i, 8, 2))
        shards.append(folder)
    merged = tmp_path / "merged"
    proc = cli("eval", "merge", *map(str, shards), "--run-dir", str(merged), "--json")
    assert proc.returncode == 0, proc.stderr
    ref_records = _results(reference)
    got = _results(merged)
    assert [r["index"] for r in got] == list(range(8))
    assert [r["samples"][0]["text"] for r in got] == [r["samples"][0]["text"] for r in ref_records]
    summary = json.loads(proc.stdout)
    ref_summary = json.loads((reference / "summary.json").read_text())
    for key in ("problems", "score", "pass@k", "maj@k", "generated_tokens", "truncated"):
        assert summary["tasks"]["math500"][key] == ref_summary["tasks"]["math500"][key]
    assert summary["merged_from"] == [str(s) for s in shards]
    bad = cli("eval", "merge", str(shards[0]), "--run-dir", str(tmp_path / "m2"))
    assert bad.returncode == 2 and "missing [1]" in bad.stderr


def test_two_engine_replicas_give_the_one_process_result(greedy_run, lively_model, tmp_path, cli):
    """engine.data_parallel_size=2: two worker processes, each on every other problem, merged into one run
    folder that equals the one-process run; a resume with another replica count is refused."""
    reference, _ = greedy_run
    folder = tmp_path / "dp"
    args = ("eval", "math500", "--model", str(lively_model), "--data-dir", str(BENCH), "--limit", "8",
            "--max-new-tokens", "24", "engine.data_parallel_size=2")
    proc = cli(*args, "--run-dir", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "[replica 1/2]" in proc.stderr
    for k in range(2):
        assert [r["index"] for r in _results(folder / "replicas" / f"{k}-of-2")] == list(range(k, 8, 2))
    got, want = _results(folder), _results(reference)
    assert [r["index"] for r in got] == list(range(8))
    assert [[s["text"] for s in r["samples"]] for r in got] == [[s["text"] for s in r["samples"]] for r in want]
    summary = json.loads(proc.stdout)
    ref_summary = json.loads((reference / "summary.json").read_text())
    for key in ("problems", "score", "pass@k", "maj@k", "generated_tokens", "truncated"):
        assert summary["tasks"]["math500"][key] == ref_summary["tasks"]["math500"][key]
    assert summary["chat_template_digest"] == ref_summary["chat_template_digest"]
    assert len(summary["replicas"]) == 2 and json.loads((folder / "meta.json").read_text())["replicas"] == 2
    again = cli(*args, "--resume", "--run-dir", str(folder), "--json")  # finished replicas are not rerun
    assert again.returncode == 0, again.stderr
    assert _results(folder) == got and "replica 0/2: " not in again.stderr
    other = cli("eval", "--resume", "--run-dir", str(reference), "engine.data_parallel_size=2")
    assert other.returncode == 2 and "error:" in other.stderr and "Traceback" not in other.stderr


def test_slurm_nodes_merge_into_the_one_process_result(greedy_run, lively_model, tmp_path, cli):
    """launch.num_machines=2 with --slurm: the script's per-node command, run as srun would run it on each
    node, answers every other problem in RUN/nodes/i-of-2; its merge line makes RUN the one-process run."""
    from conftest import run_sbatch_lines

    reference, _ = greedy_run
    folder = tmp_path / "nodes"
    proc = cli("eval", "math500", "--model", str(lively_model), "--data-dir", str(BENCH), "--limit", "8",
               "--max-new-tokens", "24", "launch.num_machines=2", "launch.num_processes=2", "--slurm",
               "--run-dir", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    script = folder / "launch.sbatch"
    assert json.loads(proc.stdout) == {"status": "written", "run_dir": str(folder), "sbatch": str(script)}
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=1" in text and "--node $SLURM_NODEID'" in text
    early = run_sbatch_lines(script, nodes=[1])  # the merge refuses while node 0 has not run
    assert early[0].returncode == 0, early[0].stderr
    assert early[1].returncode == 2 and "nodes/0-of-2 has not finished" in early[1].stderr
    assert "Traceback" not in early[1].stderr
    node, again, merged = run_sbatch_lines(script, nodes=[0, 1])  # node 1 is done: not rerun
    assert node.returncode == 0 and again.returncode == 0 and merged.returncode == 0, merged.stderr
    assert "finished already" in again.stderr
    for k in range(2):
        assert [r["index"] for r in _results(folder / "nodes" / f"{k}-of-2")] == list(range(k, 8, 2))
    got, want = _results(folder), _results(reference)
    assert [[s["text"] for s in r["samples"]] for r in got] == [[s["text"] for s in r["samples"]] for r in want]
    summary = json.loads((folder / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    for key in ("problems", "score", "pass@k", "maj@k", "generated_tokens", "truncated"):
        assert summary["tasks"]["math500"][key] == ref_summary["tasks"]["math500"][key]
    assert summary["nodes"] == [str(folder / "nodes" / f"{k}-of-2") for k in range(2)]
    assert json.loads((folder / "meta.json").read_text())["status"] == "completed"
    local = cli("eval", "--resume", "--run-dir", str(folder))  # without --slurm: refused, nothing touched
    assert local.returncode == 2 and "add --slurm" in local.stderr and _results(folder) == got


class AnsweringEngine:
    """A stand-in for a model that answers problem i correctly when i is even (for the scoring path)."""

    backend = "scripted"
    chat_template = None

    def __init__(self, golds: dict[str, object]):
        self.golds = golds
        self.calls = 0

    def generate(self, prompts, sampling: SamplingConfig, prompt_seeds=None):
        self.calls += 1
        out = []
        for prompt in prompts:
            problem = prompt.split("\nLet's think")[0]
            index, gold = self.golds[problem]
            answer = gold if index % 2 == 0 else "-12345"
            out.append([Sample(text=f"So the answer is \\boxed{{{answer}}}.", token_ids=[1, 2, 3], finish_reason="stop")
                        for _ in range(sampling.n)])
        return out

    def close(self):
        pass


def test_scoring_path_counts_right_answers(tmp_path):
    from mathctl.benchmarks import get_benchmark, load_problems
    from mathctl.core.rundir import RunDir
    from mathctl.evaluate import EvalConfig, run

    cfg = EvalConfig.model_validate({"model": {"path": "unused"}, "eval": {
        "tasks": ["gsm8k", "aime2024"], "data_dir": str(BENCH), "limit": 6, "chunk_problems": 4,
        "per_task": {"aime2024": {"n": 3}}}})
    golds = {}
    for name in ("gsm8k", "aime2024"):
        for p in load_problems(get_benchmark(name), BENCH)[:6]:
            golds[p.problem] = (p.index, p.gold)
    engine = AnsweringEngine(golds)
    summary = run(cfg, RunDir.create(tmp_path / "r", recipe_yaml="x", step="eval", resume=False, seeds={}), engine=engine)
    assert engine.calls == 4  # 6 problems in chunks of 4, per task
    assert summary["tasks"]["gsm8k"]["accuracy"] == 0.5
    aime = summary["tasks"]["aime2024"]
    assert aime["avg@3"] == 0.5 and aime["pass@k"]["3"] == 0.5 and aime["maj@k"]["3"] == 0.5
    assert summary["prompt_format"] == "raw"


def test_scorer_adds_best_of_n(tmp_path):
    from mathctl.benchmarks import get_benchmark, load_problems
    from mathctl.core.rundir import RunDir
    from mathctl.evaluate import EvalConfig, run

    cfg = EvalConfig.model_validate({"model": {"path": "unused"}, "eval": {
        "tasks": ["aime2024"], "data_dir": str(BENCH), "limit": 4, "n": 4}})
    golds = {p.problem: (p.index, p.gold) for p in load_problems(get_benchmark("aime2024"), BENCH)[:4]}

    class OneRightEngine(AnsweringEngine):  # sample 2 of every problem is right, the rest wrong
        def generate(self, prompts, sampling, prompt_seeds=None):
            out = []
            for prompt in prompts:
                _, gold = self.golds[prompt.split("\nLet's think")[0]]
                out.append([Sample(text=f"\\boxed{{{gold if j == 2 else 1000 + j}}}", token_ids=[1], finish_reason="stop")
                            for j in range(sampling.n)])
            return out

    def scorer(prompts, samples):  # a reward model that prefers the third sample
        return [[1.0 if j == 2 else 0.0 for j in range(len(row))] for row in samples]

    summary = run(cfg, RunDir.create(tmp_path / "r", recipe_yaml="x", step="eval", resume=False, seeds={}),
                  engine=OneRightEngine(golds), scorer=scorer)
    entry = summary["tasks"]["aime2024"]
    assert entry["avg@4"] == 0.25 and entry["pass@k"]["4"] == 1.0
    assert entry["bon@k"] == {"1": 0.0, "2": 0.0, "4": 1.0}  # the right sample is the third
    assert entry["maj@k"]["4"] == 0.0  # four different answers: the first one wins the tie
