# The pipeline on a CUDA machine: `dvc repro` by default (docs/pipeline.md), and the image that
# cluster.yaml's nodes run (the project at /workspace/echo-rd, the WORKDIR, where `ray submit`
# runs the sweep stage and where cluster.yaml mounts params.yaml and the prepared data).
#
#   docker build -t ghcr.io/YOUR-ORG/echo-rd:0.1.0 .      # tag: pyproject.toml's version
#   docker run --gpus all --shm-size=8g -v "$PWD":/workspace/echo-rd echo-rd:0.1.0   # this checkout
#   docker run --gpus all --shm-size=8g echo-rd:0.1.0 sh -c "cp params.paper.yaml params.yaml && dvc repro"
#
# Mounting the checkout keeps results, the DVC cache, ray_results/ and mlflow.db on the host;
# without a mount the image runs its own snapshot. Ray needs a large /dev/shm (--shm-size).
#
# It runs as the user `echo` (uid 1000, gid 1000, home /home/echo), never root. A mounted
# checkout must belong to that uid (DVC writes to it and git refuses a repository of another
# owner; no safe.directory exception is made): if yours is not uid 1000, build with
# --build-arg UID=$(id -u) --build-arg GID=$(id -g). On cluster.yaml's nodes the files Ray
# mounts belong to the SSH user, ubuntu, uid 1000.
#
# BASE_IMAGE is pinned by digest (the tag only says which it is): the CUDA PyTorch image, whose
# torch (2.5.1) the project uses. Another base (docs/pipeline.md builds one on a local CPU base):
# --build-arg BASE_IMAGE=<name>@sha256:<digest> of any Debian/Ubuntu image with python3.11, pip,
# setuptools and torch >= 2.1. Every other Python package comes from requirements.lock, pinned
# with hashes (made by .ci/lock.py from pyproject.toml; CI checks that they agree).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime@sha256:c8268a92a69bd500f8be0e665b2630ee006dadaf7bfbc24249141b15ff622755
FROM ${BASE_IMAGE}

ARG UID=1000
ARG GID=1000
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# DVC drives Git; Ray's cluster launcher copies files into a running container with rsync.
RUN apt-get update && apt-get install -y --no-install-recommends git rsync \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${GID}" echo \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash echo

WORKDIR /workspace/echo-rd
# The locked dependencies first (a layer of their own), each file checked against its hash;
# --no-deps: nothing outside the lock is installed, and pip check proves the set complete.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
COPY . .
RUN pip install --no-deps --no-build-isolation -e . && pip check \
    && chown -R echo:echo /workspace/echo-rd

USER echo
# DVC needs a Git repository and .git is not copied (.dockerignore): snapshot the tree, as the
# user who owns it.
RUN git init -q && git add -A \
    && git -c user.name=echo-rd -c user.email=echo-rd@localhost commit -qm "image snapshot"

CMD ["dvc", "repro"]
