# syntax=docker/dockerfile:1
# The deploy worker's image: `docker compose build worker`, or
#   docker build --build-arg FLYCTL_VERSION=0.4.95 -t turbodeploy .
# The same image runs the offline tools (`turbodeploy flysim`).
FROM python:3.11-slim

# flyctl drives remote image builds; pinned so every worker builds the same way.
ARG FLYCTL_VERSION=0.4.95

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLYCTL_INSTALL=/opt/flyctl \
    PATH=/opt/flyctl/bin:$PATH \
    FLY_NO_UPDATE_CHECK=1

# Without pipefail a failed download would pipe nothing into `sh` and still succeed.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl git \
    && rm -rf /var/lib/apt/lists/*

# flyctl is on neither PyPI nor npm: Fly's installer fetches the pinned release into
# $FLYCTL_INSTALL/bin, which is on PATH for every user.
RUN curl -fsSL https://fly.io/install.sh | sh -s "${FLYCTL_VERSION}" \
    && flyctl version

WORKDIR /app
COPY . .
RUN pip install . \
    && useradd --create-home --uid 10001 --user-group turbodeploy

# Checkouts and flyctl's state live in the user's home; nothing under /app is written.
USER turbodeploy

STOPSIGNAL SIGTERM
CMD ["python", "worker.py"]
