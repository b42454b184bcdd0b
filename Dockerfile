# agentgate container image.
#
#   docker build -t agentgate .
#   docker run -d -p 443:8443 -e API_KEY=... \
#       -v agentgate-data:/var/lib/agentgate -v /var/orchestrator/certs:/var/orchestrator/certs \
#       agentgate
#
# Port 443 and the non-root user: the simplest way is the one above, publishing the
# container's 8443 as the host's 443 (-p 443:8443); nothing inside needs a privilege.
# To listen on 443 inside the container instead (AGENTGATE_LISTEN=0.0.0.0:443), no setcap
# is needed either: Docker (20.10+) and Podman set net.ipv4.ip_unprivileged_port_start=0
# in a container's own network namespace, and `--sysctl net.ipv4.ip_unprivileged_port_start=443`
# does the same elsewhere. With --network host that sysctl is the host's (1024), and
# --cap-add NET_BIND_SERVICE does not reach a non-root process: publish 8443 instead.
# A host-mounted certificate directory must be writable by uid 10001.

# ---- build
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p agentgate \
    && install -D -m 0755 target/release/agentgate /out/agentgate

# ---- runtime
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 agentgate \
    && useradd --system --uid 10001 --gid agentgate --home-dir /var/lib/agentgate \
        --no-create-home --shell /usr/sbin/nologin agentgate \
    && install -d -o agentgate -g agentgate -m 0750 /var/lib/agentgate \
    && install -d -o agentgate -g agentgate -m 0750 /var/orchestrator/certs
COPY --from=build /out/agentgate /usr/local/bin/agentgate

ENV AGENTGATE_LISTEN=0.0.0.0:8443 \
    AGENTGATE_DATA_DIR=/var/lib/agentgate \
    CERT_STORAGE_DIR=/var/orchestrator/certs
WORKDIR /var/lib/agentgate
USER 10001:10001
EXPOSE 8443
ENTRYPOINT ["agentgate"]
CMD ["serve"]
