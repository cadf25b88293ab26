# syntax=docker/dockerfile:1
# mathctl for AMD Instinct GPUs (ROCm): AMD's vLLM image, with mathctl installed on top.
#
#   docker build -f docker/rocm.Dockerfile -t mathctl:rocm .      # from the repo root
#   docker run --rm --device /dev/kfd --device /dev/dri --group-add video --ipc=host \
#       --security-opt seccomp=unconfined mathctl:rocm sft --recipe quickstart-sft
#
# The base is the tag that AMD's "vLLM inference and serving on ROCm" page
# (rocm.docs.amd.com/projects/ai-ecosystem/en/latest/inference/vllm.html, checked 2026-11) says to
# pull: ROCm 7.14.0, PyTorch 2.11.0, vLLM 0.23.0, Python 3.14, a CDNA (Instinct) build. vLLM on
# ROCm is not on PyPI, so torch and vLLM are taken from the image as they are, never reinstalled.
# vllm 0.23.0 accepts transformers>=4.56 except 5.0-5.5.0 (its PyPI metadata), which overlaps
# mathctl's transformers>=5.0,<6.
#
# flash-attn: not installed here. The PyPI package is a source package (a ROCm build takes hours)
# and no prebuilt ROCm wheel (CK or Triton backend) matching this image's torch could be confirmed. If the base image ships one,
# mathctl uses it; otherwise `model.attn_implementation=auto` falls back to sdpa (packed SFT rows
# then run sdpa per packed sample). vLLM brings its own attention kernels on ROCm.

FROM rocm/vllm:rocm7.14.0_cdna_ubuntu24.04_py3.14_pytorch_2.11.0_vllm_0.23.0

# uid of the non-root user; match it to yours so bind-mounted run folders stay writable
ARG USER_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# mathctl goes into the image's own Python, next to torch and vLLM (a plain venv would not see them);
# PIP_BREAK_SYSTEM_PACKAGES lets pip do that if that Python is marked externally managed.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HOME=/cache/huggingface

# Freeze the image's GPU stack as pip constraints, so that installing mathctl (or anything in an
# image built from this one) cannot replace the ROCm torch with a CUDA wheel from PyPI. The grep
# also fails the build early if this python has no torch or vLLM.
RUN python3 -m pip list --format=freeze \
        | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch-triton-rocm|vllm|flash[-_]attn|amdsmi|aiter)==' \
        > /etc/mathctl-constraints.txt \
    && grep -qiE '^torch==' /etc/mathctl-constraints.txt \
    && grep -qiE '^vllm==' /etc/mathctl-constraints.txt
ENV PIP_CONSTRAINT=/etc/mathctl-constraints.txt

# mathctl itself, editable. `-e . vllm` rather than `.[gpu]`: the extra's flash-attn would mean a
# source build; naming vllm (held at the image's version by the constraints) makes pip choose
# transformers and friends within vLLM's requirements too, not only mathctl's.
# docker/rocm.Dockerfile.dockerignore keeps .git, .venv, runs/ and caches out of the context.
WORKDIR /workspace
COPY . .
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir -e . vllm \
    && python3 -c "from importlib.metadata import version as v; \
print({p: v(p) for p in ('torch', 'vllm', 'transformers', 'mathctl')})" \
    && python3 -c "import importlib.util as u; print('flash_attn:', u.find_spec('flash_attn') is not None)" \
    && mathctl --help > /dev/null

# Non-root user in the `video` (and, where it exists, `render`) group, which own /dev/kfd and
# /dev/dri; Ubuntu's user `ubuntu` (uid 1000) makes way. /cache is writable by any uid.
RUN if id ubuntu > /dev/null 2>&1; then userdel --remove ubuntu 2> /dev/null || true; fi \
    && useradd --create-home --uid "$USER_UID" --shell /bin/bash --groups video mathctl \
    && if getent group render > /dev/null; then usermod -aG render mathctl; fi \
    && mkdir -p /workspace/runs /cache/huggingface \
    && chown mathctl:mathctl /workspace/runs /cache/huggingface \
    && chmod 1777 /cache /cache/huggingface
USER $USER_UID
VOLUME ["/cache/huggingface"]

ENTRYPOINT ["mathctl"]
CMD ["--help"]
