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
    # iproute2 and nftables: the link-fault tests (tests/faults.rs) put the relay in a network namespace.
    for p in tmux openssh-server openssh-client socat musl-tools binutils openssl procps curl file asciinema iproute2 nftables; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    # The share tests drive a full-screen editor as support would.
    command -v vi >/dev/null || need+=(vim-tiny)
    if [ ${#need[@]} -gt 0 ]; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        # One stale or broken index (a foreign architecture added by cross-setup, a mirror mid-sync)
        # makes update exit 100 although everything we need is installable: install decides.
        $sudo apt-get update -qq || echo "setup: apt-get update reported errors; installing from the indexes that loaded" >&2
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

# The static x86_64 binary's size beside the previous figure and the target, the biggest
# contributors by crate (from an unstripped build of the same code in target/size), and the crate count.
size:
    cargo build -q --release --target {{musl}} --bin linbit-tunl
    just check-static {{bin}}
    CARGO_PROFILE_RELEASE_STRIP=false cargo build -q --release --target {{musl}} --bin linbit-tunl --target-dir target/size
    scripts/size.sh {{bin}} target/size/{{musl}}/release/linbit-tunl {{size_previous}} {{size_target}}
    @echo "crates in the client's tree: $(cargo tree -q -p linbit-tunl -e normal --prefix none | sed 's/ (\*)//' | sort -u | wc -l) ($(cargo tree -q -p linbit-tunl -e normal,no-proc-macro --prefix none | sed 's/ (\*)//' | sort -u | wc -l) without build-time proc-macros)"

# Bytes of the static x86_64 binary at fd8a673, before the ureq 3 move (ureq 2 with url/idna/ICU),
# and design.md's target.
size_previous := "2269920"
size_target := "1600000"

# Fail unless FILE is one static executable; print its size.
check-static FILE:
    #!/usr/bin/env bash
    set -euo pipefail
    if readelf -lW "{{FILE}}" | grep -q INTERP; then echo "{{FILE}}: has an INTERP header (dynamic)"; exit 1; fi
    if readelf -dW "{{FILE}}" | grep -q NEEDED; then echo "{{FILE}}: needs shared libraries"; exit 1; fi
    echo "{{FILE}}: static, $(stat -c %s "{{FILE}}") bytes"

# Nightly toolchain for the targets without a prebuilt std (ppc64le, s390x); override with
# `just nightly=nightly-2026-05-19 cross s390x` to pin one.
nightly := "nightly"

# musl-dev:ARCH brings Debian's cross gcc and a <triple>-linux-musl-gcc wrapper; qemu-user-static
# runs the results; rustup gives the aarch64 std and nightly's rust-src (std for ppc64le/s390x).
# Install what `just cross` needs (foreign-arch musl, qemu-user, rustup parts). Idempotent.
cross-setup:
    #!/usr/bin/env bash
    set -euo pipefail
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    for a in arm64 ppc64el s390x; do
        dpkg --print-foreign-architectures | grep -qx "$a" || $sudo dpkg --add-architecture "$a"
    done
    need=()
    for p in musl-tools binutils file qemu-user-static musl-dev:arm64 musl-dev:ppc64el musl-dev:s390x; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        $sudo apt-get update -qq || true   # a foreign arch's index mid-sync must not stop us
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
    fi
    for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
        rustup target list --installed | grep -qx "$t" || rustup target add "$t"
    done
    rustup toolchain list | grep -q "^{{nightly}}" || rustup toolchain install {{nightly}} --profile minimal
    rustup +{{nightly}} component list --installed | grep -q '^rust-src' || rustup +{{nightly}} component add rust-src

# No containers; `just cross-setup` first. See cross/README.md.
# Build ARCH (x86_64, aarch64, ppc64le, s390x) natively, check it is static, run it under qemu.
cross ARCH:
    #!/usr/bin/env bash
    set -euo pipefail
    root="{{justfile_directory()}}"
    buildstd=""
    case "{{ARCH}}" in
        x86_64) t=x86_64-unknown-linux-musl; cc=""; qemu="" ;;
        aarch64) t=aarch64-unknown-linux-musl; cc=aarch64-linux-musl-gcc; qemu=qemu-aarch64-static ;;
        # No prebuilt std for these on rustup (s390x-musl is tier 3; ppc64le-musl's rust-std is
        # not downloadable here): build std from source with nightly.
        ppc64le) t=powerpc64le-unknown-linux-musl; cc=powerpc64le-linux-musl-gcc; qemu=qemu-ppc64le-static; buildstd=1 ;;
        s390x) t=s390x-unknown-linux-musl; cc=s390x-linux-musl-gcc; qemu=qemu-s390x-static; buildstd=1 ;;
        *) echo "unknown ARCH {{ARCH}} (x86_64, aarch64, ppc64le, s390x)"; exit 1 ;;
    esac
    T="${t^^}"; T="${T//-/_}"
    if [ -n "$cc" ]; then
        command -v "$cc" >/dev/null || { echo "$cc missing: run just cross-setup"; exit 1; }
        # ring's C and the final link both go through Debian's musl-gcc wrapper for the target.
        export "CC_${t//-/_}=$cc" "CARGO_TARGET_${T}_LINKER=$cc"
    fi
    if [ -n "$buildstd" ]; then
        # A std built from source has no self-contained musl crt/libc/libunwind: link Debian's
        # musl instead, and let std's -lunwind find the cross gcc's libgcc_eh.a under that name.
        lib="$root/target/cross-lib/$t"
        mkdir -p "$lib"
        ln -sf "$("$cc" -print-file-name=libgcc_eh.a)" "$lib/libunwind.a"
        "$cc" -O2 -c "$root/cross/dl_find_object.c" -o "$lib/dl_find_object.o"
        export "CARGO_TARGET_${T}_RUSTFLAGS=-C link-self-contained=no -L native=$lib -C link-arg=$lib/dl_find_object.o"
        cargo +{{nightly}} build -Zbuild-std=std,panic_abort --release --target "$t" --bin linbit-tunl
    else
        cargo build --release --target "$t" --bin linbit-tunl
    fi
    just check-static "target/$t/release/linbit-tunl"
    just cross-run {{ARCH}}

# Run a `just cross` result (under qemu-user for foreign ARCH): --version, --help, a bad option.
cross-run ARCH:
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{ARCH}}" in
        x86_64) t=x86_64-unknown-linux-musl; qemu="" ;;
        aarch64) t=aarch64-unknown-linux-musl; qemu=qemu-aarch64-static ;;
        ppc64le) t=powerpc64le-unknown-linux-musl; qemu=qemu-ppc64le-static ;;
        s390x) t=s390x-unknown-linux-musl; qemu=qemu-s390x-static ;;
        *) echo "unknown ARCH {{ARCH}} (x86_64, aarch64, ppc64le, s390x)"; exit 1 ;;
    esac
    b="target/$t/release/linbit-tunl"
    want="linbit-tunl $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
    got="$($qemu "$b" --version)"
    [ "$got" = "$want" ] || { echo "{{ARCH}}: --version said '$got', want '$want'"; exit 1; }
    $qemu "$b" --help >/dev/null || { echo "{{ARCH}}: --help failed"; exit 1; }
    rc=0; $qemu "$b" --no-such-option 2>/dev/null || rc=$?
    [ "$rc" = 1 ] || { echo "{{ARCH}}: a bad option gave exit $rc, want 1"; exit 1; }
    echo "{{ARCH}}: runs${qemu:+ under $($qemu --version | head -1)}: '$got', --help ok, bad option exit 1"

# All four release architectures, natively.
cross-all: (cross "x86_64") (cross "aarch64") (cross "ppc64le") (cross "s390x")

# The alternative: cross-rs in docker or podman (`cargo install --locked cross`); cross/Cross.toml.
cross-docker ARCH:
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

# Formatting and lints, as CI wants them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# The whole test suite: unit tests and end-to-end tests against real tmux, ssh and sshd.
test: lint
    cargo build --workspace --bins
    cargo test --workspace -- --test-threads=4

# The test double relay on its own: a real sshd on 127.0.0.1, the broker and the signing API.
relay SESSION="swift-fox-jumps-barrel" TOKEN="123456":
    cargo run -q -p relay-double -- serve --session {{SESSION}} --token {{TOKEN}}

# The product relay (tunl-relay) under a prefix: accounts tunl and tunl-support, a throwaway TLS CA,
# everything else under ROOT. Idempotent. Then `just relay-serve` runs its sshd and API until Ctrl-C.
relay-init ROOT="/tmp/tunl-relay-demo" PORT="2222" API_PORT="8443":
    cargo build -q -p tunl-relay
    mkdir -p {{ROOT}} && chmod 755 {{ROOT}}
    target/debug/tunl-relay init --root {{ROOT}} --port {{PORT}} --api-port {{API_PORT}} --listen 127.0.0.1 --tls-self-signed

relay-serve ROOT="/tmp/tunl-relay-demo":
    cargo build -q -p tunl-relay
    target/debug/tunl-relay serve --root {{ROOT}}

# The whole system on one machine (root): the product relay from `tunl-relay init --root` on a temp
# prefix, the customer's linbit-tunl and the engineer's `tunl join` in two windows of one tmux.
demo:
    cargo build -q --workspace --bins
    cargo run -q -p tunl --example demo

# The client alone against the test relay, whose console stands in for support.
demo-double SESSION="swift-fox-jumps-barrel":
    cargo build -q --workspace --bins
    scripts/demo.sh {{SESSION}}

# Figures against their limits (see design.md); writes target/bench.json. Takes about 3 minutes
# (the idle phase alone is 60 s); reports only, never fails on a target.
bench:
    cargo build -q --release --workspace --bins
    cargo build -q --release --target {{musl}} --bin linbit-tunl
    cargo test --release --test bench -- --ignored --nocapture --test-threads=1
    cargo test --release -p tunl-relay --test fanout -- --ignored --nocapture
    cargo test --release -p tunl --test bench -- --ignored --nocapture --test-threads=1
    cargo build -q --release --target {{musl}} -p tunl-relay --bin tunl-relay
    TUNL_RELAY_BIN=target/{{musl}}/release/tunl-relay cargo test --release -p tunl-relay --test idle -- --ignored --nocapture

# Endurance (issue 13): the real client against the test relay for MINUTES while a shell prints at
# random rates, the relay sends random valid and invalid lines, chat goes both ways, tunnels are
# granted and revoked and links dropped; then checks keys, processes, files, RSS and fds, and every
# keystroke. Not part of `just test`. Figures on stdout and in target/soak.txt (see README, Endurance).
soak MINUTES="10":
    cargo build -q --workspace --bins
    TUNL_SOAK_MINUTES={{MINUTES}} cargo test -q --test soak -- --ignored --nocapture

# Install what `just compat` builds the old tmux and OpenSSH releases with. Idempotent.
compat-setup:
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    for p in build-essential autoconf automake pkg-config bison libevent-dev libncurses-dev zlib1g-dev; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get update -qq || echo "compat-setup: apt-get update reported errors; installing from the indexes that loaded" >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
    fi

# The compatibility matrix: the share, attach and tunnel suites with each old tmux (1.8 2.7 3.0a 3.2a
# 3.5a, or the VERSIONS given) as the client's tmux, the link suite with OpenSSH 7.4's client. The
# tools are built once from ../shared/vendor into $XDG_CACHE_HOME or /var/cache/linbit-tunl-compat.
# Writes target/compat-matrix.md. See scripts/compat.sh.
compat *VERSIONS: compat-setup
    scripts/compat.sh {{VERSIONS}}

# Fuzz one parser for SECONDS (nightly, cargo-fuzz): relay_line, tmux_control, json_object,
# chat_editor, wire_line, authkeys, cli_env, relay_input or relay_api. Seeds from the unit tests are in fuzz/seeds/TARGET; what the fuzzer
# finds new goes to fuzz/corpus/TARGET, a crash to fuzz/artifacts/TARGET (see README, Fuzzing).
fuzz TARGET SECONDS="60":
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    mkdir -p fuzz/corpus/{{TARGET}}
    cd fuzz && cargo +nightly fuzz run -O {{TARGET}} corpus/{{TARGET}} seeds/{{TARGET}} -- \
        -max_total_time={{SECONDS}} -print_final_stats=1
