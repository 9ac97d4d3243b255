# syntax=docker/dockerfile:1
#
# Builds the four binaries (api, delay-scheduler, expirer, worker) in one image; docker-compose.yml
# picks the binary with `command:`. librdkafka is built from source by rdkafka-sys, hence the C
# toolchain in the builder stage.

FROM rust:1-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      cmake pkg-config libssl-dev zlib1g-dev libcurl4-openssl-dev build-essential python3 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, against stub sources, so that editing the project does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY migrations ./migrations
# The workspace's other member, the load generator (bench/), is not part of the image: a stub
# lets cargo load the workspace.
COPY bench/Cargo.toml ./bench/
RUN mkdir -p src bin bench/src \
 && echo '' > src/lib.rs \
 && echo '' > bench/src/lib.rs && echo 'fn main() {}' > bench/src/main.rs \
 && for b in api delay-scheduler expirer worker; do echo 'fn main() {}' > "bin/$b.rs"; done \
 && cargo build --release --locked --bins \
 && rm -rf src bin

# The project itself.
COPY src ./src
COPY bin ./bin
RUN touch src/lib.rs bin/*.rs \
 && cargo build --release --locked --bins

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home booking \
 && mkdir -p /var/lib/booking && chown booking /var/lib/booking
COPY --from=builder /src/target/release/api \
                    /src/target/release/delay-scheduler \
                    /src/target/release/expirer \
                    /src/target/release/worker \
                    /usr/local/bin/
USER booking
# Writable working directory (e.g. for a JSON-lines export file given as a relative path).
WORKDIR /var/lib/booking
# api: 8080 (HTTP API); 9101-9104: /metrics and /health of api, delay-scheduler, expirer, worker.
EXPOSE 8080 9101 9102 9103 9104
# No ENTRYPOINT: the command is the binary to run, e.g. `docker run IMAGE api`.
CMD ["api"]
