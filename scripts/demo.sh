#!/usr/bin/env bash
# The local demo: the test relay (a real sshd on 127.0.0.1, the broker, the signing API) with its
# support console in a tmux session of its own, and a linbit-tunl session against it in this
# terminal. Act as support from another terminal with the command printed below.
set -euo pipefail
cd "$(dirname "$0")/.."
SESSION=${1:-swift-fox-jumps-barrel}
TOKEN=123456
BIN=$PWD/target/debug
D=$(mktemp -d /tmp/tunl-demo.XXXXXX)
SOCK=$D/support.sock
cleanup() {
    # The relay stops its sshd and removes its PAM service and temp dir on `quit`; a signal
    # would leave them behind.
    tmux -S "$SOCK" send-keys -t support quit Enter 2>/dev/null || true
    for _ in $(seq 1 50); do
        tmux -S "$SOCK" has-session 2>/dev/null || break
        sleep 0.1
    done
    tmux -S "$SOCK" kill-server 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT

tmux -S "$SOCK" -f /dev/null new-session -d -s support -x 160 -y 40 \
    "$BIN/relay-double serve --session $SESSION --token $TOKEN --out $D/support.out --target-sshd $D/authorized_keys"
# The relay prints the environment the client needs once its sshd and API are up.
for _ in $(seq 1 300); do
    tmux -S "$SOCK" capture-pane -p -t support | grep '^export ' > "$D/env" || true
    grep -q TUNL_TARGET_PORT "$D/env" && break
    sleep 0.1
done
grep -q TUNL_TARGET_PORT "$D/env" || { echo "demo: the test relay did not start"; tmux -S "$SOCK" capture-pane -p -t support; exit 1; }

cat <<MSG
linbit-tunl demo
  relay:    a real sshd on 127.0.0.1 (see $D/env); a second sshd stands in for this host's
            own, so a granted tunnel really logs support in
  support:  in another terminal run   tmux -S $SOCK attach -t support
            then type: k TEXT (keys; \\r is Enter) | chat TEXT | note TEXT | upgrade | revoke | close
  customer: this terminal, in 2 seconds (Ctrl-b Q ends the session)
MSG
sleep 2
# shellcheck disable=SC1091
source "$D/env"
export TUNL_AUTHKEYS_FILE=$D/authorized_keys USER=${USER:-$(id -un)}
status=0
"$BIN/linbit-tunl" --token "$TOKEN" "$SESSION" || status=$?
echo "demo: linbit-tunl exited with status $status"
exit "$status"
