# syntax=docker/dockerfile:1
# The `sluice` binary (every role and ops verb), for
# compose/docker-compose.yml or on its own. It carries no configuration: the
# demo's (config/dev.toml, whose secret and keys are published) must never be
# what a container falls back to. Mount yours and name it:
#   docker build -t sluice:local .
#   docker run --rm sluice:local --help
#   docker run -v /etc/sluice:/etc/sluice:ro sluice:local --config /etc/sluice/sluice.toml serve --role all
# (or set SLUICE_CONFIG). Without one, `serve` stops at once: no tenants.

FROM rust:1-bookworm AS build
# A C toolchain and zlib headers: rdkafka builds librdkafka from source.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between
# builds, so the binary is copied out of target/ within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-cli \
    && install -m 0755 target/release/sluice /usr/local/bin/sluice

FROM debian:bookworm-slim
# zlib is the binary's only library beyond libc and libgcc.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin sluice
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
WORKDIR /app
USER sluice
# Inside a container the edge must listen on all interfaces, not loopback.
# It then refuses to start with a published dev secret or demo key unless
# SLUICE_INGEST__DEMO=true, as compose sets it for the demo.
ENV SLUICE_HTTP_ADDR=0.0.0.0:8088
EXPOSE 8088
ENTRYPOINT ["sluice"]
CMD ["serve", "--role", "all"]
