# syntax=docker/dockerfile:1
# kinesis-fanout: multi-stage build, small non-root runtime.
#   docker build --build-arg GIT_SHA=$(git rev-parse --short=12 HEAD) -t kinesis-fanout .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Dependencies first, against stub sources, so that this layer is cached until Cargo.lock changes.
COPY Cargo.toml Cargo.lock build.rs ./
# The allocator's settings, compiled into the binary when jemalloc builds.
COPY .cargo ./.cargo
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin kinesis-fanout \
    && rm -rf src
COPY src ./src
ARG GIT_SHA=unknown
ENV KINESIS_FANOUT_GIT_SHA=${GIT_SHA}
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin kinesis-fanout \
    && mkdir -p /out/var/lib/kinesis-fanout

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /src/target/release/kinesis-fanout /usr/local/bin/kinesis-fanout
COPY config/kinesis-fanout.toml /etc/kinesis-fanout/config.toml
# The only writable path (file checkpoint backend); mount a volume here with a read-only root.
COPY --from=builder --chown=nonroot:nonroot /out/var/lib/kinesis-fanout /var/lib/kinesis-fanout
# The binary brings its own allocator settings (jemalloc, configured at build time: .cargo/config.toml),
# so resident memory follows `memory.limit` with no allocator variables here or in the task.
ENV KINESIS_FANOUT_CONFIG=/etc/kinesis-fanout/config.toml \
    KINESIS_FANOUT__METRICS__LISTEN=0.0.0.0:9090 \
    KINESIS_FANOUT__CHECKPOINT__PATH=/var/lib/kinesis-fanout/checkpoints.json \
    KINESIS_FANOUT__LOG__FORMAT=json
USER nonroot
EXPOSE 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/kinesis-fanout", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/kinesis-fanout"]
CMD ["run"]
