# syntax=docker/dockerfile:1
# quotad: build a release binary, run it on a slim Debian as a non-root user.
#   docker build -t quotad .        (or: docker compose up --build)

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# openapi.yaml and the Lua scripts are embedded at compile time (include_str!).
# The caches only speed up rebuilds; the binary is copied out of the cached target dir.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/quotad /usr/local/bin/quotad

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 quotad \
    && useradd --system --uid 10001 --gid quotad --no-create-home --shell /usr/sbin/nologin quotad
WORKDIR /app
COPY --from=builder /usr/local/bin/quotad /app/quotad
COPY openapi.yaml /app/openapi.yaml
ENV QUOTAD_ADDR=0.0.0.0:8080
EXPOSE 8080
USER quotad:quotad
ENTRYPOINT ["/app/quotad"]
