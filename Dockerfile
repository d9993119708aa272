# hms-ach container image (docs/deployment.md). Two stages: the first builds the wheel and every
# dependency's wheel, the second installs them offline into a slim image and runs as a non-root user.
# Nothing is downloaded when the container runs.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md channels.yaml ./
COPY hms_ach ./hms_ach
COPY mappings ./mappings
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /srv/hms-ach --create-home hms-ach
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels hms-ach && rm -rf /wheels
COPY scripts/docker-entrypoint.sh /usr/local/bin/hms-ach-entrypoint
USER hms-ach
WORKDIR /srv/hms-ach
# The deployment folder (channels.yaml, mappings/, data/ with the keys, the SQLite database):
# mount a volume here; the entry script scaffolds it with `hms-ach init` on first start.
VOLUME ["/srv/hms-ach"]
ENV HMS_ACH_HOME=/srv/hms-ach
# HTTP (FHIR R4, /api/v1, /health, /metrics) and MLLP
EXPOSE 8080 2575
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=4).status != 200)"
# SIGTERM drains (docs/reliability.md); give it more than engine.shutdown_grace_seconds (30 s)
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/hms-ach-entrypoint"]
CMD ["run"]
