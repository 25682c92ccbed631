#!/usr/bin/env bash
# Runs every figure of BENCHMARKS.md in one go on this machine: the raw wrk baseline
# against the load generator's sink, then each scenario. Results land in $OUT as text and
# JSON. Needs wrk (apt-get install wrk) and release builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
cargo build --release -p clickhook -p clickhook-loadtest
LT=target/release/clickhook-loadtest
DAEMON="$PWD/target/release/clickhook"

echo "== machine" | tee "$OUT/summary.txt"
{ nproc; grep -m1 'model name' /proc/cpuinfo; free -h | head -2; df -h . | tail -1; uptime; } | tee -a "$OUT/summary.txt"

echo "== wrk baseline: 32 connections (as many as the daemon keeps to one endpoint, its max_concurrency), one signed webhook with the body the daemon delivers for one click (about 910 bytes), against the same sink" | tee -a "$OUT/summary.txt"
"$LT" sink --wrk-script "$OUT/sink.lua" --no-timestamp-check --for 40s > "$OUT/sink.txt" 2>&1 &
SINK_PID=$!
for _ in $(seq 50); do grep -q "http://" "$OUT/sink.txt" 2>/dev/null && break; sleep 0.1; done
SINK_URL=$(grep -o 'http://[0-9.:]*' "$OUT/sink.txt" | head -1)
wrk -t1 -c32 -d10s -s "$OUT/sink.lua" "$SINK_URL" | tee -a "$OUT/summary.txt"
kill "$SINK_PID" 2>/dev/null || true
wait "$SINK_PID" 2>/dev/null || true

run() {
  local name=$1; shift
  echo "== $name: $LT $*" | tee -a "$OUT/summary.txt"
  "$LT" "$@" --daemon-bin "$DAEMON" -q --json > "$OUT/$name.json" || true
  python3 - "$OUT/$name.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency"]
print(f'  ingest {r["ingest_rate"]:.0f}/s  delivery {r["delivery_rate"]:.0f}/s  delivered {r["delivered"]}/{r["expected_deliveries"]}'
      f'  lost {r["lost"]}  dup {r["duplicates"]}  p50 {l.get("p50_ms")} ms  p99 {l.get("p99_ms")} ms  p99.9 {l.get("p999_ms")} ms'
      f'  daemon cpu {r["daemon"].get("cpu_seconds")} s (starting {r["daemon"].get("startup_cpu_seconds")} s)  peak rss {r["daemon"].get("peak_rss_bytes", 0)/2**20:.0f} MiB  passed {r["passed"]}')
for g in r.get("groups", []):
    print(f'  group {g.get("name")}: {g.get("delivered")} delivered, {g.get("delivery_rate", 0):.0f}/s')
if r.get("backlog"):
    print("  backlog", json.dumps(r["backlog"]))
PY
}

run throughput-http-batch100 throughput --clicks 300000 --batch 100
run throughput-http-single throughput --clicks 100000 --connections 64
run throughput-unix throughput --clicks 300000 --transport unix
run latency-5k throughput --clicks 50000 --rate 5000 --connections 16
run fanout fanout --clicks 20000 --batch 100
run slow-endpoint slow-endpoint --clicks 20000 --batch 100
run many-endpoints many-endpoints --clicks 50000 --batch 100
# Routing alone, then delivery by how many endpoints the clicks spread over: each beside a
# throughput run of the same size.
run throughput-200k throughput --clicks 200000 --batch 100
run routing-10000 many-endpoints --clicks 200000 --batch 100 --links 1
for n in 10 100 1000 10000; do
  run spread-$n many-endpoints --clicks 200000 --batch 100 --endpoints $n
done
# The ratio targets again, from three alternating rounds of the runs they compare, each
# round's ratio and their median: one pair of runs draws within this machine's noise. A
# round whose run failed is left out of its ratios and named, and the script goes on.
echo "== ratio rounds: throughput, routing alone, the spread, fanout and slow-endpoint, three times in turn" | tee -a "$OUT/summary.txt"
for round in 1 2 3; do
  for spec in "throughput throughput --clicks 200000 --batch 100" \
              "routing many-endpoints --clicks 200000 --batch 100 --links 1" \
              "spread many-endpoints --clicks 200000 --batch 100 --endpoints 10000" \
              "fanout fanout --clicks 20000 --batch 100" \
              "slow slow-endpoint --clicks 20000 --batch 100"; do
    read -r name args <<< "$spec"
    # shellcheck disable=SC2086 # the arguments are meant to split
    "$LT" $args --daemon-bin "$DAEMON" -q --json > "$OUT/round$round-$name.json" || true
  done
done
python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt" || true
import json, statistics, sys
out = sys.argv[1]
def report(round, name):
    try:
        with open(f"{out}/round{round}-{name}.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
def rate(r, group=None):
    if r is None:
        return 0.0
    if group is None:
        return r.get("delivery_rate", 0.0)
    return sum(g.get("delivery_rate", 0.0) for g in r.get("groups", []) if g.get("name") == group)
ratios = {"routing alone / throughput": [], "spread over 10,000 / throughput": [], "slow-endpoint's healthy / fanout": []}
passed = True
for round in (1, 2, 3):
    r = {n: report(round, n) for n in ("throughput", "routing", "spread", "fanout", "slow")}
    failed = [n for n, x in r.items() if x is None or not x.get("passed")]
    passed &= not failed
    print(f"  round {round}: " + ", ".join(f"{n} {rate(x) / 1000:.1f}k/s" for n, x in r.items())
          + (f"; did not pass: {', '.join(failed)}" if failed else ""))
    pairs = {
        "routing alone / throughput": (rate(r["routing"]), rate(r["throughput"])),
        "spread over 10,000 / throughput": (rate(r["spread"]), rate(r["throughput"])),
        "slow-endpoint's healthy / fanout": (rate(r["slow"], "fast"), rate(r["fanout"])),
    }
    for what, (part, whole) in pairs.items():
        if part > 0 and whole > 0:
            ratios[what].append(part / whole)
for what, values in ratios.items():
    median = f"; median {statistics.median(values):.2f}" if values else ""
    print(f"  {what}: " + (", ".join(f"{v:.2f}" for v in values) or "no round") + median)
print(f"  every run passed: {passed}")
PY
run flaky flaky --clicks 10000 --batch 100
run backlog backlog --clicks 1000000 --batch 100 --transport unix
echo "== ingest only: clickhook send over the socket, 200,000 compact JSON clicks, no endpoints" | tee -a "$OUT/summary.txt"
IDLE=$(mktemp -d)
python3 - "$IDLE/clicks.ndjson" <<'PY'
import json, sys
ua = "Mozilla/5.0 (Linux; Android 10; SM-G973F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36"
with open(sys.argv[1], "w") as f:
    for i in range(200000):
        f.write(json.dumps({"link": {"id": str(i % 1000), "workspace_id": "w1", "slug": "/abc123", "domain": "links.example",
                "destination": "https://example.com/landing?x=1"}, "click": {"ip": "203.0.113.9", "user_agent": ua,
                "referer": "https://twitter.com/", "country": "US", "region": "CA", "city": "San Francisco"},
                "metadata": {"campaign": "spring"}}, separators=(",", ":")) + "\n")
PY
sed -e 's/^listen = "127.0.0.1:8080"/listen = "127.0.0.1:0"/' -e 's/^listen = "127.0.0.1:9090"/listen = "127.0.0.1:0"/' config.toml > "$IDLE/config.toml"
"$DAEMON" serve --config "$IDLE/config.toml" > "$IDLE/out" 2> "$IDLE/err" &
DPID=$!
for _ in $(seq 100); do grep -q ready "$IDLE/out" && break; sleep 0.1; done
start=$(date +%s.%N)
"$DAEMON" send --socket "$IDLE/clickhook.sock" "$IDLE/clicks.ndjson" | tee -a "$OUT/summary.txt"
end=$(date +%s.%N)
python3 -c "print(f'  socket ingest alone: {200000/($end-$start):.0f} clicks/s')" | tee -a "$OUT/summary.txt"
# The same daemon at rest after that traffic: it now holds the user-agent rules and a warm cache.
sleep 5
t0=$(awk '{print $14+$15}' /proc/$DPID/stat)
sleep 10
t1=$(awk '{print $14+$15}' /proc/$DPID/stat)
echo "  at rest after the ingest: rss $(awk '/VmRSS/{print $2}' /proc/$DPID/status) kB, cpu $(( t1 - t0 )) ticks in 10 s" | tee -a "$OUT/summary.txt"
kill "$DPID"; wait "$DPID" || true

echo "== HTTP ingest alone (no endpoints): wrk posting 100-click arrays on 16 connections, then single clicks on 64" | tee -a "$OUT/summary.txt"
python3 - "$IDLE" <<'PY'
import json, sys
ua = "Mozilla/5.0 (Linux; Android 10; SM-G973F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36"
def click(i):
    return {"link": {"id": str(i % 1000), "workspace_id": "w1", "slug": "/abc123", "domain": "links.example",
            "destination": "https://example.com/landing?x=1"}, "click": {"ip": "203.0.113.9", "user_agent": ua,
            "referer": "https://twitter.com/", "country": "US", "region": "CA", "city": "San Francisco"},
            "metadata": {"campaign": "spring"}}
def lua(body):
    return 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = ' + json.dumps(body) + '\n'
open(sys.argv[1] + "/batch.lua", "w").write(lua(json.dumps([click(i) for i in range(100)])))
open(sys.argv[1] + "/single.lua", "w").write(lua(json.dumps(click(1))))
PY
rm -rf "$IDLE/data"
"$DAEMON" serve --config "$IDLE/config.toml" > "$IDLE/out" 2> "$IDLE/err" &
DPID=$!
for _ in $(seq 100); do grep -q ready "$IDLE/out" && break; sleep 0.1; done
INGEST=$(grep -o 'ingest_http=[0-9.:]*' "$IDLE/out" | head -1 | cut -d= -f2)
wrk -t1 -c16 -d10s -s "$IDLE/batch.lua" "http://$INGEST/v1/clicks" | tee "$IDLE/wrk-batch.txt" | tee -a "$OUT/summary.txt"
python3 -c "import re,sys; r=float(re.search(r'Requests/sec:\s+([0-9.]+)', open(sys.argv[1]).read()).group(1)); print(f'  HTTP ingest alone, 100-click arrays: {r*100:.0f} clicks/s')" "$IDLE/wrk-batch.txt" | tee -a "$OUT/summary.txt"
wrk -t1 -c64 -d10s -s "$IDLE/single.lua" "http://$INGEST/v1/clicks" | tee -a "$OUT/summary.txt"
kill "$DPID"; wait "$DPID" || true

echo "== idle daemon on the shipped config.toml (no endpoints), after 5 s, over 10 s" | tee -a "$OUT/summary.txt"
rm -rf "$IDLE/data"
"$DAEMON" serve --config "$IDLE/config.toml" > "$IDLE/out" 2> "$IDLE/err" &
DPID=$!
sleep 5
t0=$(awk '{print $14+$15}' /proc/$DPID/stat)
sleep 10
t1=$(awk '{print $14+$15}' /proc/$DPID/stat)
rss=$(awk '/VmRSS/{print $2}' /proc/$DPID/status)
echo "  idle rss ${rss} kB, cpu $(( t1 - t0 )) ticks in 10 s" | tee -a "$OUT/summary.txt"
kill "$DPID"; wait "$DPID" || true
rm -rf "$IDLE"
echo "results in $OUT" | tee -a "$OUT/summary.txt"
