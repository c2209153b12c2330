# edgeway in a container: non-root, data on a volume, health from /readyz.
#
#   docker build -t edgeway .                      # EXTRAS=all by default
#   docker build --build-arg EXTRAS=sinks -t edgeway .
#   docker run -d --name edgeway -p 1883:1883 -v edgeway-data:/var/lib/edgeway \
#     -e EDGEWAY_MQTT_PASSWORD_HASH="$(edgeway passwd)" --env-file cloud.env edgeway
#
# Mount your own configuration over /etc/edgeway/edgeway.yaml; secrets go in
# environment variables it references (${CLOUD_TOKEN}). See docs/install.md.
# Multi-arch (Raspberry Pi): docker buildx build --platform linux/arm64,linux/arm/v7 .

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim
ARG EXTRAS=all
# A fixed uid/gid, so a volume's ownership is the same on every host.
RUN groupadd --system --gid 10001 edgeway \
 && useradd --system --uid 10001 --gid edgeway --home-dir /var/lib/edgeway \
      --shell /usr/sbin/nologin edgeway \
 && mkdir -p /var/lib/edgeway /etc/edgeway \
 && chown edgeway:edgeway /var/lib/edgeway && chmod 0750 /var/lib/edgeway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/edgeway-*.whl)[${EXTRAS}]" && rm -rf /wheels
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
