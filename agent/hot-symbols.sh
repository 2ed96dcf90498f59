#!/usr/bin/env bash
# Regenerates agent/hot-symbols.txt: the functions a ready agent runs, which release builds link
# first and together (see agent/build.rs and ARCHITECTURE.md). Run it as root after changes that
# add or rename hot code, or after a toolchain, dependency or crate-version change (symbol
# names carry a hash of the crate's metadata), then rebuild the release binary:
#
#   sudo bash agent/hot-symbols.sh && cargo build --release --bin ambientd
#
# It builds the binary it profiles itself, with the command the README and the Dockerfile use:
# the hashes also depend on the features cargo unifies across the packages a command selects,
# so a `-p agent` build (without the `tests` crate's features) names the same functions
# differently, and a list made from one leaves a third of the other's hot code scattered (+1.1
# MiB idle RSS in the loopback agent, measured). An optional argument profiles that binary
# instead.
#
# The agents run under callgrind (valgrind); what they run once ready is the list.
# Two sources of traffic:
#   - loopback: two agents of the example mesh, a client through the first one's SOCKS5
#     listener to an echo server behind the second (300 connections held open, then 8 MiB);
#   - as root: `ambientd bench --agent-bin` on the simulated nodes, mesh and tcp modes, every
#     case once (captured connections, pooled HBONE under load, idle connections, churn).
# Needs valgrind and python3. Cleans up after itself.
set -euo pipefail
here="$(dirname "$(realpath "$0")")"
if [ $# -eq 0 ]; then
  (cd "$here/.." && cargo build --release --bin ambientd)
  set -- "$here/../target/release/ambientd"
fi
bin="$(realpath "$1")"
out="$here/hot-symbols.txt"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

dir="$(mktemp -d /tmp/ambientd-hot-XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

# The agent under callgrind; it execs, so the agent is the process its starter signals. Its
# dumps are cg.<pid>.<n>: one every 20M basic blocks, and one as it gets ready (on entering
# `residency::release_startup_pages`, which is never inlined for this).
cat >"$dir/agent" <<EOF
#!/usr/bin/env bash
exec valgrind --tool=callgrind --vgdb=no --dump-every-bb=20000000 \
  --dump-before='*release_startup_pages*' --callgrind-out-file="$dir/cg.%p" "$bin" "\$@"
EOF
chmod +x "$dir/agent"

echo "loopback: two agents and a SOCKS5 client" >&2
"$bin" ca init --dir "$dir/ca" >/dev/null
python3 - "$dir/echo-ready" <<'EOF' &
# The `echo` workload's application (127.0.0.3:8080 in the example mesh).
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
loopback_agent() { # node, extra flags...
  local node="$1"
  shift
  "$dir/agent" --log-format json run --mesh "$here/../examples/mesh.yaml" --node "$node" \
    --state-dir "$dir/ca" --readiness-address off "$@" >"$dir/loopback-$node.log" 2>&1 &
  pids+=($!)
  echo "$!" >"$dir/loopback-$node.pid"
}
loopback_agent node-b
loopback_agent node-a --socks5 127.0.0.1:15080
for node in node-a node-b; do
  for _ in $(seq 1 300); do
    grep -q '"agent ready"' "$dir/loopback-$node.log" && break
    sleep 1
  done
  grep -q '"agent ready"' "$dir/loopback-$node.log" ||
    { cat "$dir/loopback-$node.log" >&2; echo "$node not ready" >&2; exit 1; }
done
[ -e "$dir/echo-ready" ] || { echo "the echo server did not start" >&2; exit 1; }
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
sleep 3
# SIGTERM: the agents drain and exit, and callgrind writes their last dump.
for node in node-a node-b; do kill "$(cat "$dir/loopback-$node.pid")"; done
for node in node-a node-b; do wait "$(cat "$dir/loopback-$node.pid")" || true; done

if [ "$(id -u)" -eq 0 ]; then
  echo "simulated nodes: ambientd bench with the agents under callgrind" >&2
  "$bin" bench --agent-bin "$dir/agent" --modes mesh,tcp --repeats 1 --duration 1s \
    --idle-conns 1000,3000 >"$dir/bench.out" 2>&1 || { cat "$dir/bench.out" >&2; exit 1; }
else
  echo "not root: the simulated nodes' paths (capture, passthrough) are left out" >&2
fi

# Every dump after the one written as its agent got ready. callgrind names functions
# demangled, the linker wants them mangled: map through nm.
python3 - "$bin" "$out" "$dir" <<'EOF'
import collections, glob, os, re, subprocess, sys
binary, out, dir = sys.argv[1:]
dumps = collections.defaultdict(dict)  # pid -> sequence number -> path
for path in glob.glob(f"{dir}/cg.*"):
    parts = os.path.basename(path).split(".")
    if len(parts) == 3 and os.path.getsize(path) > 0:
        dumps[parts[1]][int(parts[2])] = path
ran, agents, used = set(), 0, 0
for pid, seq in dumps.items():
    ready = [n for n, path in seq.items() if "dump-before" in open(path, errors="replace").read(4096)]
    if not ready:
        continue  # killed before it got ready
    agents += 1
    for n in sorted(seq):
        if n <= min(ready):
            continue
        used += 1
        for line in open(seq[n], errors="replace"):
            m = re.match(r"^c?fn=\(\d+\) (.*)$", line.rstrip("\n"))
            if m:
                ran.add(m.group(1))
if not ran:
    sys.exit("no agent's dumps after it got ready")
def nm(*flags):
    text = subprocess.run(["nm", "--defined-only", *flags, binary], capture_output=True, text=True, check=True).stdout
    return [l.split(" ", 2) for l in text.splitlines()]
# Code valgrind cannot run: it hides VAES from its guest, so under callgrind the agents seal
# and open HBONE records with aws-lc, where on CPUs with VAES they use ring's AVX2 VAES
# AES-GCM (agent/src/tls.rs). Those functions go in by name.
unseen = re.compile(r"(ring_core_\w*(vaes|vpclmulqdq|aes_hw)\w*|<?ring::aead::.*|<?rustls::crypto::ring::tls13::.*)")
hot, by_name = [], 0
for (_, kind, mangled), (_, _, plain) in zip(nm(), nm("-C")):
    name = re.sub(r"::h[0-9a-f]{16}$", "", plain)
    if kind in "tT" and (name in ran or unseen.fullmatch(name)):
        hot.append(mangled)
        by_name += name not in ran
open(out, "w").write("".join(s + "\n" for s in dict.fromkeys(hot)))
print(f"{agents} agents, {used} dumps, {len(ran)} functions ran: {len(hot)} linker symbols in {out}"
      f" ({by_name} of them ring's AES-GCM, by name)")
EOF
