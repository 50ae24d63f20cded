# Spindle server image. The entrypoint is spindle-launcher; arguments after the image name are its flags.
#
#   docker build -t spindle .                               # CUDA (default)
#   docker build -t spindle:cpu --build-arg DEVICE=cpu .    # CPU only (smaller)
#   docker run --gpus all -p 8080:8080 spindle --model-id /models/demo --num-shard 1
#
# Every launcher flag can also be given as an environment variable (MAX_INPUT_TOKENS=...), which is how
# deploy/configmap.yaml configures it.
ARG DEVICE=cuda

# ---- bases: one per device; DEVICE picks which one the final stage starts from -------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
# Default PyPI wheels of torch on x86_64 Linux are the CUDA builds.
ENV TORCH_INDEX_URL=https://pypi.org/simple

FROM python:3.11-slim AS base-cpu
# g++ builds the C++ CPU kernels for the CPU the container runs on, at its first start (cached in /data).
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---- the image ------------------------------------------------------------------------------------------
FROM base-${DEVICE} AS final
ARG TORCH_VERSION=2.13.0
ENV VIRTUAL_ENV=/opt/spindle \
    PATH=/opt/spindle/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data \
    SPINDLE_KERNEL_CACHE=/data/kernels \
    TRITON_CACHE_DIR=/data/triton \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    PORT=8080
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

WORKDIR /src
# Dependency layers first: the packages change more often than torch.
COPY proto/ proto/
COPY kernels/ kernels/
COPY server/ server/
COPY router/ router/
# torch's CUDA wheels bring their matching triton (the kernels' GPU path); the CPU wheel does not need it.
RUN pip install --no-cache-dir ./proto ./kernels ./server ./router \
 && rm -rf /src
COPY models/demo/ /models/demo/

RUN useradd --create-home --uid 1000 spindle && mkdir -p /data && chown spindle /data
# Mount /data (-v spindle-data:/data): downloaded models, the CPU kernels and the compiled Triton kernels
# (TRITON_CACHE_DIR) survive restarts, so a restarted server skips the compiles its Warmup would redo.
VOLUME ["/data"]
USER 1000
WORKDIR /home/spindle
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/health')"]
# --hostname is explicit: the container's HOSTNAME is its id, and the launcher never reads it.
ENTRYPOINT ["spindle-launcher", "--hostname", "0.0.0.0"]
CMD ["--model-id", "/models/demo"]
