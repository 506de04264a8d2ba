# mup-qwen on a CUDA GPU: the project's dependencies on PyTorch's CUDA runtime image, plus
# Jupyter Lab for the notebooks. `make build` builds it and `make run` starts Jupyter Lab.
#
# NOTE: the tag assumes PyTorch publishes a 2.13.0 image with CUDA 12.8 (tags read
# <torch>-cuda<X.Y>-cudnn<N>-runtime). It was not pulled where this file was written: if
# the tag does not exist, pick a 2.13 tag from hub.docker.com/r/pytorch/pytorch/tags and
# run `make build BASE_IMAGE=pytorch/pytorch:<tag>`.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG JUPYTERLAB_VERSION=4.6.6
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/mup

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /workspace

# The image's torch stays: requirements.txt pins the CPU build for .venv, so its torch line is
# dropped, and a constraint on the installed version makes pip fail rather than replace it.
COPY requirements.txt requirements-nodeps.txt /tmp/requirements/
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/requirements/constraints.txt \
    && grep -v '^torch==' /tmp/requirements/requirements.txt > /tmp/requirements/requirements-image.txt \
    && pip install --no-cache-dir -c /tmp/requirements/constraints.txt -r /tmp/requirements/requirements-image.txt \
    && pip install --no-cache-dir --no-deps -r /tmp/requirements/requirements-nodeps.txt \
    && pip install --no-cache-dir -c /tmp/requirements/constraints.txt "jupyterlab==${JUPYTERLAB_VERSION}" \
    && python -c "import torch, transformers, mup, ray; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'transformers', transformers.__version__, 'ray', ray.__version__)" \
    && rm -rf /tmp/requirements

# `make run` passes the host user's ids, so files written to the mounted repository belong to
# that user. Any id can write HOME (Jupyter, Ray and Hugging Face write there) and /workspace,
# and USER gives Python's getpass a name where /etc/passwd has no entry for the id.
RUN mkdir -p /home/mup \
    && chmod 1777 /home/mup /workspace
ENV USER=mup

# `make run` mounts the repository over /workspace; this copy serves runs without the mount.
COPY --chown=1000:1000 . /workspace
USER 1000:1000

EXPOSE 8888
# Jupyter Lab takes its token from JUPYTER_TOKEN, or prints a generated one when it is unset.
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--ServerApp.root_dir=/workspace"]
