# The sessionizer worker: `docker build -t sessionizer .`
# librdkafka is built from source with TLS and SASL (rdkafka features ssl,
# sasl), hence the -dev packages in the build stage and their runtime
# libraries in the final one.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev libsasl2-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY schemas schemas
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin sessionizer

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 libsasl2-2 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 sessionizer
COPY --from=build /src/target/release/sessionizer /usr/local/bin/sessionizer
COPY deploy/*.toml /etc/sessionizer/
USER sessionizer
EXPOSE 9464
ENTRYPOINT ["sessionizer"]
CMD ["run", "--config", "/etc/sessionizer/kafka.toml"]
