#!/usr/bin/env bash
# Regenerates agent/hot-symbols.txt: the functions a ready agent runs, which release builds link
# first and together (see agent/build.rs). Run it after changes that rename or add hot code, or
# after a toolchain or dependency update, then rebuild the release binary:
#
#   cargo build --release --bin ambientd && bash agent/hot-symbols.sh target/release/ambientd
#
# Two agents of the example mesh run on loopback under callgrind (valgrind). Once both are
# ready their counters are zeroed, a client sends traffic through the first one's SOCKS5
# listener to an echo server behind the second (300 connections held open at once, then 8 MiB
# on one), and every function either agent ran from then on is written to the list, by its
# linker name. Needs valgrind and python3; not root. Cleans up after itself.
set -euo pipefail
bin="$(realpath "${1:?usage: hot-symbols.sh path/to/ambientd}")"
out="$(dirname "$(realpath "$0")")/hot-symbols.txt"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
mesh="$(dirname "$(realpath "$0")")/../examples/mesh.yaml"

dir="$(mktemp -d /tmp/ambientd-hot-XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

"$bin" ca init --dir "$dir/ca" >/dev/null

# The echo server is the `echo` workload's application (127.0.0.3:8080 in the example mesh).
python3 - "$dir/echo-ready" <<'EOF' &
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.3", 8080))
s.listen(512)
open(sys.argv[1], "w").close()
def serve(c):
    while data := c.recv(1 << 16):
        c.sendall(data)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
pids+=($!)

agent() { # node, extra flags...
  local node="$1"
  shift
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.$node" "$bin" --log-format json \
    run --mesh "$mesh" --node "$node" --state-dir "$dir/ca" --readiness-address off "$@" \
    >"$dir/$node.log" 2>&1 &
  pids+=($!)
}
agent node-b
agent node-a --socks5 127.0.0.1:15080
for node in node-a node-b; do
  for _ in $(seq 1 300); do
    grep -q '"agent ready"' "$dir/$node.log" && break
    sleep 1
  done
  grep -q '"agent ready"' "$dir/$node.log" || { cat "$dir/$node.log" >&2; echo "$node not ready" >&2; exit 1; }
done
[ -e "$dir/echo-ready" ] || { echo "the echo server did not start" >&2; exit 1; }

for p in "${pids[@]:1}"; do callgrind_control -z "$p" >/dev/null 2>&1; done
python3 - <<'EOF'
import socket, struct
def open_one():
    c = socket.create_connection(("127.0.0.1", 15080), timeout=120, source_address=("127.0.0.2", 0))
    c.sendall(b"\x05\x01\x00")
    assert c.recv(2) == b"\x05\x00"
    c.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.10.1") + struct.pack("!H", 80))
    assert c.recv(10)[1] == 0, "SOCKS5 connect refused"
    return c
def echo(c, n):
    c.sendall(b"x" * n)
    got = 0
    while got < n:
        got += len(c.recv(1 << 20))
held = []
for _ in range(300):
    held.append(open_one())
    echo(held[-1], 1)
for c in held:
    c.close()
c = open_one()
echo(c, 8 << 20)
echo(c, 64)
c.close()
EOF
sleep 2
for p in "${pids[@]:1}"; do callgrind_control -d "$p" >/dev/null 2>&1; done

# callgrind names functions demangled; the linker wants them mangled: map through nm.
python3 - "$bin" "$out" "$dir"/cg.node-*.* <<'EOF'
import re, subprocess, sys
binary, out, dumps = sys.argv[1], sys.argv[2], sys.argv[3:]
ran = set()
for dump in dumps:
    for line in open(dump, errors="replace"):
        m = re.match(r"^c?fn=\(\d+\) (.*)$", line.rstrip("\n"))
        if m:
            ran.add(m.group(1))
def nm(*flags):
    text = subprocess.run(["nm", "--defined-only", *flags, binary], capture_output=True, text=True, check=True).stdout
    return [l.split(" ", 2) for l in text.splitlines()]
hot = []
for (_, kind, mangled), (_, _, plain) in zip(nm(), nm("-C")):
    if kind in "tT" and re.sub(r"::h[0-9a-f]{16}$", "", plain) in ran:
        hot.append(mangled)
open(out, "w").write("".join(s + "\n" for s in dict.fromkeys(hot)))
print(f"{len(ran)} functions ran, {len(hot)} linker symbols written to {out}")
EOF
