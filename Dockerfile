# The hpo worker image (also runs the dashboard). torch and torchvision are the versions the README
# and CI install (tests/test_compose.py checks); PyPI's Linux torch wheels bring their CUDA libraries,
# so the image needs only the host's NVIDIA driver. The GPU itself is handed in by docker compose
# (deploy.resources.reservations.devices) or Kubernetes (nvidia.com/gpu).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HPO_ARTIFACTS=/artifacts

WORKDIR /app
COPY pyproject.toml README.md ./
COPY hpo ./hpo
COPY studies ./studies
RUN pip install torch==2.14.1 torchvision==0.29.1 \
    && pip install . \
    && useradd --create-home --uid 1000 hpo \
    && mkdir -p /artifacts && chown hpo /artifacts
USER hpo

# `docker stop` sends SIGTERM: the worker fails and re-queues its running trial, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["hpo"]
CMD ["worker", "--study", "regression", "--device", "cuda"]
