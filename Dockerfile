# ambientd image: build with the Rust toolchain, run on a minimal Debian with the netfilter
# tools the capture rules need (iptables in both nft and legacy flavours, nft, ip).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bin ambientd

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ambientd /usr/local/bin/ambientd
ENTRYPOINT ["/usr/local/bin/ambientd"]
