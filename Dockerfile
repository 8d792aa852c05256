# The sessionizer worker: `docker build -t sessionizer .`
# librdkafka, OpenSSL and zlib are built from source and linked statically
# (rdkafka features ssl-vendored, libz-static): the rust image has the
# compiler, make and perl they need, and the final image needs only libc and
# the CA certificates.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY schemas schemas
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin sessionizer

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 sessionizer
COPY --from=build /src/target/release/sessionizer /usr/local/bin/sessionizer
COPY deploy/*.toml /etc/sessionizer/
USER sessionizer
EXPOSE 9464
ENTRYPOINT ["sessionizer"]
CMD ["run", "--config", "/etc/sessionizer/kafka.toml"]
