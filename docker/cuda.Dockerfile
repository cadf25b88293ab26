# syntax=docker/dockerfile:1
# mathctl for NVIDIA GPUs: CUDA 13.0, torch 2.13.0, vLLM 0.32.0, flash-attn 2.8.3, Python 3.12.
#
#   docker build -f docker/cuda.Dockerfile -t mathctl:cuda .      # from the repo root
#   docker run --rm --gpus all --ipc=host mathctl:cuda sft --recipe quickstart-sft
#
# How the versions fit together (checked 2026-11; docker/README.md has the details):
# - vllm 0.32.0 pins torch==2.13.0 (also torchvision==0.28.0, torchaudio==2.11.0,
#   transformers>=5.16.1,<5.20.0): the Requires-Dist of its PyPI wheel.
# - torch 2.13.0 is a CUDA 13.0 build (its PyPI wheel requires cuda-toolkit==13.0.3 and
#   nvidia-cudnn-cu13), hence the CUDA 13.0 base image and PyTorch's cu130 index.
# - flash-attn has no official wheel for torch 2.13: PyPI holds only its sdist, and Dao-AILab's
#   release workflow builds torch <= 2.10. The prebuilt cu130/torch2.13/cp312 wheel below is from
#   mjun0812/flash-attention-prebuild-wheels, release v0.9.47 (listed in its doc/packages.md).
# - vllm 0.33.0 (newest on PyPI) pins torch==2.14.0; no flash-attn wheel for torch 2.14 + CUDA 13.0
#   + cp312 could be confirmed, so this image stays on vllm 0.32.0. Move VLLM_VERSION, TORCH_VERSION
#   and FLASH_ATTN_WHEEL together.

# cudnn-devel rather than runtime: FlashInfer and Triton compile kernels at run time (nvcc, headers).
FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG VLLM_VERSION=0.32.0
ARG FLASH_ATTN_WHEEL=https://github.com/mjun0812/flash-attention-prebuild-wheels/releases/download/v0.9.47/flash_attn-2.8.3+cu130torch2.13-cp312-cp312-linux_x86_64.whl
# uid of the non-root user; match it to yours so bind-mounted run folders stay writable
ARG USER_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.12 (Ubuntu 24.04's, matching the cp312 flash-attn wheel); a C compiler and Python
# headers for Triton's runtime builds; git so meta.json can record a mounted checkout's revision.
# Apt versions are left to the pinned base image's Ubuntu release (exact .deb versions leave the
# archive).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# One virtualenv for everything; the HF cache lives under /cache (a volume, see below).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

# torch first, from PyTorch's CUDA index, so that nothing later pulls another build. An extra
# index, not --index-url: the cu130 index has missed pinned dependencies before (pytorch/pytorch
# #172926), so PyPI stays in for those, and pip still prefers the +cu130 build of the same version.
# torch, vLLM and flash-attn get a layer each: bumping one rebuilds only what follows it.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --extra-index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

# vLLM from PyPI (a CUDA 13 build); naming torch again keeps the one installed above.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir "vllm==$VLLM_VERSION" "torch==$TORCH_VERSION"

# flash-attn as a prebuilt wheel (its URL names the exact release file; a source build takes
# hours). Then freeze everything installed so far as pip constraints: the mathctl install below,
# and any `pip install` in an image built from this one, cannot swap torch, vLLM or flash-attn.
# hadolint ignore=DL3013,DL3059
RUN pip install --no-cache-dir "$FLASH_ATTN_WHEEL" \
    && pip list --format=freeze > /opt/venv/constraints.txt
ENV PIP_CONSTRAINT=/opt/venv/constraints.txt

# mathctl itself, editable (mount a checkout over /workspace to run your own code); the `gpu`
# extra is already satisfied by the pins above. docker/cuda.Dockerfile.dockerignore keeps .git,
# .venv, runs/ and caches out of the build context.
WORKDIR /workspace
COPY . .
RUN pip install --no-cache-dir -e ".[gpu]" \
    && python -c "from importlib.metadata import version as v; \
print({p: v(p) for p in ('torch', 'vllm', 'flash-attn', 'transformers', 'mathctl')})" \
    && mathctl --help > /dev/null

# Non-root user (Ubuntu's image ships user `ubuntu` with uid 1000: it makes way). Run folders go
# to /workspace/runs; /cache is writable by any uid, for `docker run --user`.
RUN if id ubuntu > /dev/null 2>&1; then userdel --remove ubuntu 2> /dev/null || true; fi \
    && useradd --create-home --uid "$USER_UID" --shell /bin/bash mathctl \
    && mkdir -p /workspace/runs /cache/huggingface \
    && chown mathctl:mathctl /workspace/runs /cache/huggingface \
    && chmod 1777 /cache /cache/huggingface
USER $USER_UID
VOLUME ["/cache/huggingface"]

ENTRYPOINT ["mathctl"]
CMD ["--help"]
