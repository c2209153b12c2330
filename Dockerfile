# edgeway in a container: non-root, data on a volume, health from /readyz.
#
#   docker build -t edgeway .                      # EXTRAS=all by default
#   docker build --build-arg EXTRAS=sinks -t edgeway .
#   docker run -d --name edgeway -p 1883:1883 -v edgeway-data:/var/lib/edgeway \
#     -e EDGEWAY_MQTT_PASSWORD_HASH="$(edgeway passwd)" --env-file cloud.env edgeway
#
# Mount your own configuration over /etc/edgeway/edgeway.yaml; secrets go in
# environment variables it references (${CLOUD_TOKEN}). See docs/install.md.
# Multi-arch (Raspberry Pi): docker buildx build --platform linux/arm64 .
#
# BASE is any image with Python >= 3.11 and its venv module: the official
# python:3.11-slim by default, or a Debian bookworm with python3-venv built
# locally where no image registry is reachable (bench/container_image.py
# builds both that base and this file with buildah; docs/install.md).
# The gateway lives in a virtual environment (/opt/edgeway), so the same
# steps work where the system Python is "externally managed" (Debian 12).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --no-cache-dir --no-deps -w /wheels .

FROM ${BASE}
ARG EXTRAS=all
# A fixed uid/gid, so a volume's ownership is the same on every host.
RUN groupadd --system --gid 10001 edgeway \
 && useradd --system --uid 10001 --gid edgeway --home-dir /var/lib/edgeway \
      --shell /usr/sbin/nologin edgeway \
 && mkdir -p /var/lib/edgeway /etc/edgeway \
 && chown edgeway:edgeway /var/lib/edgeway && chmod 0750 /var/lib/edgeway
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/edgeway \
 && /opt/edgeway/bin/pip install --no-cache-dir "$(ls /wheels/edgeway-*.whl)[${EXTRAS}]" \
 && rm -rf /wheels
ENV PATH=/opt/edgeway/bin:$PATH
COPY docker/edgeway.yaml /etc/edgeway/edgeway.yaml

USER 10001:10001
VOLUME ["/var/lib/edgeway"]
# MQTT (devices). The admin API stays on the container's loopback unless the
# mounted configuration says otherwise; the health check runs inside.
EXPOSE 1883
ENV PYTHONUNBUFFERED=1
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9180/readyz', timeout=4).status == 200 else 1)"]
# SIGTERM (docker stop) commits what is in flight; give it the time to.
STOPSIGNAL SIGTERM
ENTRYPOINT ["edgeway"]
CMD ["run", "--config", "/etc/edgeway/edgeway.yaml", "--data-dir", "/var/lib/edgeway"]
