#!/usr/bin/env bash
# Build the old tmux releases and the OpenSSH 7.4p1 client of the compatibility matrix once, into a
# cache outside the checkout, from the sources in ../shared/vendor (or $COMPAT_VENDOR).
# A build is reused while its tarball's sha256 is unchanged; prints one "NAME PATH" line per tool.
set -euo pipefail
vendor="${COMPAT_VENDOR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/vendor}"
[ -d "$vendor" ] || vendor=/work/shared/vendor
cache="${COMPAT_CACHE:-${XDG_CACHE_HOME:-/var/cache}/linbit-tunl-compat}"
tmuxes="${COMPAT_TMUX:-1.8 2.7 3.0a 3.2a 3.5a}"
jobs="${COMPAT_JOBS:-2}"
mkdir -p "$cache"

# build NAME TARBALL BIN-RELATIVE-PATH COMMANDS...: skip when the stamp matches the tarball.
build() {
    local name="$1" tarball="$2" bin="$3" script="$4"
    local out="$cache/$name" sum
    sum="$(sha256sum "$tarball" | cut -d' ' -f1)"
    if [ -x "$out/$bin" ] && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$sum" ]; then
        echo "$name $out/$bin"
        return
    fi
    rm -rf "$out" "$out.src"
    mkdir -p "$out.src"
    tar xzf "$tarball" -C "$out.src" --strip-components=1
    if ! (cd "$out.src" && PREFIX="$out" VENDOR="$vendor" JOBS="$jobs" bash -euo pipefail -c "$script") \
        >"$cache/$name.log" 2>&1; then
        echo "building $name failed; the log is $cache/$name.log" >&2
        tail -20 "$cache/$name.log" >&2
        exit 1
    fi
    rm -rf "$out.src"
    echo "$sum" >"$out/.stamp"
    echo "$name $out/$bin"
}

for v in $tmuxes; do
    build "tmux-$v" "$vendor/tmux-$v.tar.gz" bin/tmux \
        'sh autogen.sh && ./configure --prefix="$PREFIX" && make -j"$JOBS" && make install'
done
if [ -z "${COMPAT_NO_SSH:-}" ]; then
    # 7.4 predates OpenSSL 3: built without OpenSSL (ed25519, certificates, chacha20 remain);
    # only the client is needed, installed by hand (make install would want the host keys).
    build openssh-7.4p1 "$vendor/openssh-7.4p1.tar.gz" bin/ssh \
        'patch -p1 < "$VENDOR/openssh-7.4p1-without-openssl.patch" && autoreconf -i &&
         ./configure --prefix="$PREFIX" --without-openssl CFLAGS="-fcommon -O2" && make -j"$JOBS" ssh &&
         mkdir -p "$PREFIX/bin" && cp ssh "$PREFIX/bin/ssh"'
fi
