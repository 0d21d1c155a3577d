# The hpo worker image (also runs the dashboard). CUDA comes with the PyTorch base image;
# the GPU itself is handed in by docker compose (deploy.resources.reservations.devices).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HPO_ARTIFACTS=/artifacts

WORKDIR /app
COPY pyproject.toml README.md ./
COPY hpo ./hpo
COPY studies ./studies
# torch is already in the base image; this adds optuna, the database drivers and the rest.
RUN pip install . \
    && useradd --create-home --uid 1000 hpo \
    && mkdir -p /artifacts && chown hpo /artifacts
USER hpo

# `docker stop` sends SIGTERM: the worker fails and re-queues its running trial, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["hpo"]
CMD ["worker", "--study", "regression", "--device", "cuda"]
