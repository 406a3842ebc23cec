# Local stand-in for the CUDA PyTorch base image, for `make docker-test` only (never pushed or used
# by users). No registry can be reached here, so docker/test.sh builds this from a debootstrapped
# Debian and tags it with the upstream name that ../Dockerfile names; the project's Dockerfile is
# then built unchanged with --pull=never.
#
# It mimics what the project's Dockerfile relies on in the upstream pytorch/pytorch images: python
# and pip on PATH from an environment under /opt/conda (here a venv), a torch 2.x and numpy installed
# there (the CPU wheel torch==2.13.0 from the host's /opt/wheels, mounted read-only at build time),
# root as the build user, and Python 3.11 like the upstream 2.7.x images.
ARG DEBIAN_BASE=localhost/seg-debian-base
FROM ${DEBIAN_BASE}

ENV PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8

RUN python3 -m venv /opt/conda \
    && /opt/conda/bin/python -m pip install --no-cache-dir --find-links /opt/wheels "torch==2.13.0" numpy \
    && python -c "import torch; print('stand-in torch', torch.__version__)"

WORKDIR /workspace
