# threadgate: one pod = one process = one uvicorn worker (`threadgate serve`).
# Build:  docker build -t threadgate:0.1.0 .   (the tag is the version: keep it equal to
#         THREADGATE_APP_VERSION in k8s/base/statefulset.yaml and docker-compose.yml)

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
# pyproject.toml names README.md as the package's readme: the build needs it.
COPY pyproject.toml README.md ./
COPY app ./app
RUN /opt/venv/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 threadgate \
 && useradd --system --uid 10001 --gid threadgate --no-create-home --home-dir /tmp threadgate
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Liveness only: /healthz answers while the process is alive (readiness is /readyz).
# python, not curl: the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('THREADGATE_PORT', '8000'), timeout=4)"]
# Exec form: the Python process is PID 1 and receives SIGTERM itself, which starts the
# drain (no new runs, in-flight runs get THREADGATE_DRAIN_TIMEOUT_S to finish).
ENTRYPOINT ["threadgate"]
CMD ["serve"]
