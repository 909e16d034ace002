# syntax=docker/dockerfile:1
# One image per binary:
#   docker build --build-arg BIN=command-api -t citypicks/command-api .
# compose.yaml builds every service and tool this way.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
ARG BIN
WORKDIR /src
COPY . .
# The registry and target dir live in BuildKit cache mounts (shared by the
# images of all binaries, so the workspace compiles once); the binary is
# copied out of the cache mount into the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    if [ -z "${BIN}" ]; then echo "build with --build-arg BIN=<binary>" >&2; exit 1; fi \
    && cargo build --release --bin "${BIN}" \
    && cp "target/release/${BIN}" /usr/local/bin/app

FROM debian:bookworm-slim AS runtime
# ca-certificates for TLS to managed services; curl for the healthchecks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin app
COPY --from=builder /usr/local/bin/app /usr/local/bin/app
USER app:app
ENV RUST_LOG=info LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/app"]
