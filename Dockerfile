# roe service image. Models are not baked in: mount the folder filled by
# scripts/fetch-models.sh at /models (read-only). The expert library lives on /data.
# It listens on 0.0.0.0, so it needs API keys: docker run -e ROE_ADMIN_KEYS=... -e
# ROE_READ_KEYS=... (or -e ROE_ALLOW_UNAUTHENTICATED=true on a network you trust). With keys,
# the HTTP API also needs TLS (-e ROE_TLS_CERT=... -e ROE_TLS_KEY=..., HTTPS with gRPC's
# certificate), or -e ROE_HTTP_ALLOW_PLAINTEXT=true when a proxy terminates TLS in front or
# the port is published only on the host's loopback (-p 127.0.0.1:8080:8080).
FROM rust:1.92-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin roe

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/roe /usr/local/bin/roe
COPY --from=build /src/assets /opt/roe/assets
ENV ROE_MODELS_DIR=/models ROE_DATA_DIR=/data/library ROE_ADDR=0.0.0.0:50051 ROE_HTTP_ADDR=0.0.0.0:8080 RUST_LOG=info
WORKDIR /opt/roe
EXPOSE 50051 8080
VOLUME ["/data"]
ENTRYPOINT ["roe"]
CMD ["serve"]
