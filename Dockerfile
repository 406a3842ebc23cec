# seg on a GPU node: training (`seg fit`) and folder inference (`seg predict`) in one image.
#
#   docker build -t seg .
#   docker run --gpus all --ipc=host -v /data:/data -v /runs:/runs -e WANDB_API_KEY seg \
#       fit --config configs/spleen.yaml --data.root /data/Task09_Spleen --trainer.default_root_dir /runs/spleen
#
# The base is an official CUDA PyTorch runtime image; its torch (2.7.1, CUDA 12.8) satisfies the
# project's torch>=2.4,<3, so pip installs no torch of its own. Pick another base with
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<torch>-cuda<cuda>-cudnn9-runtime -t seg .
# Any base works that has python and pip on PATH with a torch 2.x (>= 2.4) installed.
# `make docker-test` builds this file unchanged against a local stand-in of the base (see docker/).
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# ---- build stage: turn the source tree into a wheel (build tools stay in this stage) ----------------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY seg ./seg
# The wheel, and its runtime requirements (Requires-Dist without extras) as a requirements file, so the
# final stage installs the dependencies in a layer that is rebuilt only when they change.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && mkdir /deps \
    && python -c "import email, glob, zipfile; w = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]); m = next(n for n in w.namelist() if n.endswith('.dist-info/METADATA')); print(*(r for r in email.message_from_bytes(w.read(m)).get_all('Requires-Dist', []) if 'extra ==' not in r), sep='\n')" > /deps/requirements.txt \
    && cat /deps/requirements.txt

# ---- final image ---------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

# uid/gid of the non-root user; build with --build-arg SEG_UID=$(id -u) to own what it writes on the host.
ARG SEG_UID=1000
ARG SEG_GID=1000

LABEL org.opencontainers.image.title="seg" \
      org.opencontainers.image.description="Attention U-Net segmentation of NIfTI scans (train, predict, gate overlays)" \
      org.opencontainers.image.licenses="Apache-2.0"

# W&B: pass WANDB_API_KEY (and WANDB_MODE=offline|disabled if wanted) with `docker run -e`; never bake
# them in. Caches (seg's dataset fingerprints, W&B, Triton) go under /runs, so they outlive the container,
# and matplotlib's under /tmp: nothing is written to $HOME, so any uid can run the image (--user).
# albumentations does not look for updates online at import.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/runs/.cache \
    TRITON_CACHE_DIR=/runs/.cache/triton \
    WANDB_DIR=/runs \
    WANDB_CACHE_DIR=/runs/.cache/wandb \
    WANDB_CONFIG_DIR=/runs/.config/wandb \
    WANDB_DATA_DIR=/runs/.cache/wandb-data \
    MPLCONFIGDIR=/tmp/matplotlib \
    NO_ALBUMENTATIONS_UPDATE=1

# Install with the base's own python/pip: first the dependencies, then the project's wheel. torch is
# pinned to the exact build already in the base, so pip keeps it (and its CUDA libraries) and fails
# loudly rather than pull a second torch.
COPY --from=build /deps/requirements.txt /tmp/requirements.txt
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /tmp/torch-pin.txt \
    && python -m pip install --no-cache-dir --constraint /tmp/torch-pin.txt --requirement /tmp/requirements.txt \
    && rm -rf /tmp/* /root/.cache
COPY --from=build /wheels /tmp/wheels
RUN python -m pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && seg --version \
    && rm -rf /tmp/* /root/.cache

# Non-root user; /data (datasets, read) and /runs (checkpoints, logs, predictions, W&B) are the mount points.
RUN groupadd --gid "${SEG_GID}" seg \
    && useradd --create-home --uid "${SEG_UID}" --gid "${SEG_GID}" --shell /bin/bash seg \
    && mkdir -p /data /runs /opt/seg \
    && chown seg:seg /data /runs /opt/seg

WORKDIR /opt/seg
COPY configs ./configs

USER ${SEG_UID}:${SEG_GID}
VOLUME ["/data", "/runs"]
ENTRYPOINT ["seg"]
CMD ["--help"]
