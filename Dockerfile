# threadgate: one pod = one process = one uvicorn worker (`threadgate serve`).
# Build:  docker build -t REGISTRY/threadgate:$VERSION-$(git rev-parse --short HEAD) .
# (VERSION: `version` in pyproject.toml). One tag per build, never moved: push to a registry
# with immutable tags, or deploy by digest (docs/deploy.md, "The image"). The DBOS application
# version the pods run under is computed here from the code (below), never from the tag, and
# no manifest sets it: a tag that was moved anyway cannot make two codes share a version.
#
# The base image is pinned by digest (the multi-platform index of python:3.11-slim, Python
# 3.11.15 on Debian trixie, as listed by docker-library/repo-info). To move it:
#   docker buildx imagetools inspect python:3.11-slim   # "Digest:" of the index
# then replace both FROM lines' digest and rebuild (docs/deploy.md, "The image").
ARG PYTHON_IMAGE=python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, exactly as locked (hashes checked), in their own layer: a code change
# does not reinstall them. requirements.lock is pip-compile's output for pyproject.toml,
# build backend (setuptools, wheel) included.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock
# pyproject.toml names README.md as the package's readme: the build needs it.
COPY pyproject.toml README.md ./
COPY app ./app
# The build's identity, from the code itself: the DBOS application version becomes
# <version>+<digest of app/> (app/buildinfo.py), so two images of different code never share
# one, whatever their tags say.
RUN python app/buildinfo.py app > app/BUILD
# Nothing unlocked comes in: the locked setuptools builds it, no dependency is resolved.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 threadgate \
 && useradd --system --uid 10001 --gid threadgate --no-create-home --home-dir /tmp threadgate
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 9090
# Liveness only: /healthz answers while the process is alive (readiness is /readyz).
# python, not curl: the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('THREADGATE_PORT', '8000'), timeout=4)"]
# Exec form: the Python process is PID 1 and receives SIGTERM itself, which starts the
# drain (no new runs, in-flight runs get THREADGATE_DRAIN_TIMEOUT_S to finish).
ENTRYPOINT ["threadgate"]
CMD ["serve"]
