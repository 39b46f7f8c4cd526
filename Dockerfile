# The pipeline on a CUDA machine: `dvc repro` by default (docs/pipeline.md), and the image that
# cluster.yaml's nodes run (the project at /workspace/echo-rd, the WORKDIR, where `ray submit`
# runs the sweep stage and where cluster.yaml mounts params.yaml and the prepared data).
#
#   docker build -t echo-rd .
#   docker run --gpus all --shm-size=8g -v "$PWD":/workspace/echo-rd echo-rd       # this checkout
#   docker run --gpus all --shm-size=8g echo-rd sh -c "cp params.paper.yaml params.yaml && dvc repro"
#
# Mounting the checkout keeps results, the DVC cache, ray_results/ and mlflow.db on the host;
# without a mount the image runs its own snapshot. Ray needs a large /dev/shm (--shm-size).
# BASE_IMAGE: any Debian/Ubuntu-based image with python3, pip and torch >= 2.1 (docs/pipeline.md
# builds it on a local CPU base: --build-arg BASE_IMAGE=localhost/echo-rd-base).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# DVC drives Git; a mounted checkout belongs to another user id than the container's root.
# Ray's cluster launcher copies files into a running container with rsync (`ray submit`).
RUN apt-get update && apt-get install -y --no-install-recommends git rsync \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*'

WORKDIR /workspace/echo-rd
COPY . .
# The base image's CUDA torch satisfies the torch requirement, so pip keeps it.
RUN pip install -e ".[pipeline]" \
    # DVC needs a Git repository and .git is not copied (.dockerignore): snapshot the tree.
    && git init -q && git add -A \
    && git -c user.name=echo-rd -c user.email=echo-rd@localhost commit -qm "image snapshot"

CMD ["dvc", "repro"]
