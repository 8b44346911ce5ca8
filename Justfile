# linbit-tunl developer recipes. `just setup` makes a fresh Debian machine ready.

set shell := ["bash", "-euo", "pipefail", "-c"]

musl := "x86_64-unknown-linux-musl"
bin := "target/" + musl + "/release/linbit-tunl"

# List the recipes.
default:
    @just --list

# Install what building and testing need (Debian packages, the musl target). Idempotent.
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    for p in tmux openssh-server openssh-client socat musl-tools binutils openssl procps curl file; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
    fi
    rustup target list --installed | grep -qx {{musl}} || rustup target add {{musl}}

# Debug build.
build:
    cargo build --workspace

# The single static x86_64 binary, checked to have no interpreter and no shared libraries.
static:
    cargo build --release --target {{musl}} --bin linbit-tunl
    just check-static {{bin}}

# Fail unless FILE is one static executable; print its size.
check-static FILE:
    #!/usr/bin/env bash
    set -euo pipefail
    if readelf -lW "{{FILE}}" | grep -q INTERP; then echo "{{FILE}}: has an INTERP header (dynamic)"; exit 1; fi
    if readelf -dW "{{FILE}}" | grep -q NEEDED; then echo "{{FILE}}: needs shared libraries"; exit 1; fi
    echo "{{FILE}}: static, $(stat -c %s "{{FILE}}") bytes"

# Cross-build one architecture with `cross` (x86_64, aarch64, ppc64le, s390x); needs docker or podman.
cross ARCH:
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{ARCH}}" in
        x86_64) t=x86_64-unknown-linux-musl ;;
        aarch64) t=aarch64-unknown-linux-musl ;;
        ppc64le) t=powerpc64le-unknown-linux-musl ;;
        s390x) t=s390x-unknown-linux-musl ;;
        *) echo "unknown ARCH {{ARCH}} (x86_64, aarch64, ppc64le, s390x)"; exit 1 ;;
    esac
    CROSS_CONFIG=cross/Cross.toml cross build --release --target "$t" --bin linbit-tunl
    just check-static "target/$t/release/linbit-tunl"

# All four release architectures.
cross-all: (cross "x86_64") (cross "aarch64") (cross "ppc64le") (cross "s390x")

# Formatting and lints, as CI wants them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# The whole test suite: unit tests and end-to-end tests against real tmux, ssh and sshd.
test: lint
    cargo build --workspace --bins
    cargo test --workspace -- --test-threads=4

# The test relay on its own: a real sshd on 127.0.0.1, the broker and the signing API.
relay SESSION="swift-fox-jumps-barrel" TOKEN="123456":
    cargo run -q -p tunl-relay -- serve --session {{SESSION}} --token {{TOKEN}}

# A local demo: the test relay and a session against it in this terminal.
demo SESSION="swift-fox-jumps-barrel":
    cargo build -q --workspace --bins
    scripts/demo.sh {{SESSION}}

# Figures against their limits (see design.md); writes target/bench.json. Takes about 3 minutes
# (the idle phase alone is 60 s); reports only, never fails on a target.
bench:
    cargo build -q --release --workspace --bins
    cargo build -q --release --target {{musl}} --bin linbit-tunl
    cargo test --release --test bench -- --ignored --nocapture --test-threads=1
