# syntax=docker/dockerfile:1
# The `sluice` binary (every role and ops verb) with the demo config, for
# compose/docker-compose.yml or on its own:
#   docker build -t sluice:local .
#   docker run --rm sluice:local --help

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
COPY config/ /app/config/
USER sluice
# Inside a container the edge must listen on all interfaces, not loopback.
# With the demo configuration it then refuses to start (its secret and keys
# are published) unless SLUICE_INGEST__DEMO=true, as compose sets it: give
# the image a configuration of your own.
ENV SLUICE_HTTP_ADDR=0.0.0.0:8088
EXPOSE 8088
ENTRYPOINT ["sluice"]
CMD ["--config", "/app/config/dev.toml", "serve", "--role", "all"]
