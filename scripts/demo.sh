#!/usr/bin/env bash
# The main job, end to end: a private mosquitto, the agent on a real small model, and questions
# asked over MQTT with `edge-agent ask`. Installs what it needs on first run (≈3 minutes).
#   EDGE_AGENT_MODEL=/path/to/phi-3.5-mini-folder scripts/demo.sh   # use another model folder
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup.sh"
cd "$REPO"

MODEL="${EDGE_AGENT_MODEL:-}"
if [ -z "$MODEL" ]; then
    # The builder says a line per layer and per quantizer warning: that goes to a log, not here.
    CACHE="${EDGE_AGENT_MODEL_CACHE:-$HOME/.cache/edge-agent/models}"
    mkdir -p "$CACHE"
    BUILD_LOG="$CACHE/smollm2-build.log"
    echo "demo: building (first run, ≈1-3 minutes) or finding the cached SmolLM2-135M-Instruct model; builder log in $BUILD_LOG" >&2
    if ! MODEL="$(python scripts/build_test_models.py smollm2 2>"$BUILD_LOG" | tail -n 1)"; then
        echo "demo: building the model failed; the end of $BUILD_LOG:" >&2
        tail -n 40 "$BUILD_LOG" >&2
        exit 1
    fi
fi
WORK="$(mktemp -d)"
chmod 777 "$WORK"  # mosquitto drops to its own user
PORT="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n' "$PORT" > "$WORK/mosquitto.conf"
cat > "$WORK/agent.toml" <<TOML
device_id = "demo"
state_dir = "$WORK/state"
[mqtt]
port = $PORT
[model]
path = "$MODEL"
max_new_tokens = 128
TOML

cleanup() {
    [ -n "${AGENT_PID:-}" ] && kill -TERM "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    [ -n "${BROKER_PID:-}" ] && kill -TERM "$BROKER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

"$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
BROKER_PID=$!
edge-agent run --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
echo "demo: broker on 127.0.0.1:$PORT, agent log in $WORK/agent.log" >&2

# Ready = the retained status says so (model loaded and warmed up).
for _ in $(seq 1 120); do
    state="$(mosquitto_sub -p "$PORT" -t edge-agent/demo/status -C 1 -W 1 2>/dev/null || true)"
    case "$state" in *'"state":"ready"'*) break ;; esac
    kill -0 "$AGENT_PID" 2>/dev/null || { cat "$WORK/agent.log" >&2; exit 1; }
done
echo "status: $state"

ask() {
    echo
    echo "Q: $1"
    edge-agent ask --config "$WORK/agent.toml" --json --timeout 120 "$1" | python -c '
import json, sys
a = json.load(sys.stdin)
if not a["ok"]:
    print("error:", a["error"]["code"], "-", a["error"]["message"]); sys.exit(1)
t, u = a["timings"], a["usage"]
print("A:", a["text"].strip())
print(f"   [{a['"'"'model'"'"']} on {a['"'"'provider'"'"']}: {u['"'"'completion_tokens'"'"']} tokens, "
      f"first token {t['"'"'ttft_ms'"'"']} ms, total {t['"'"'total_ms'"'"']} ms, {t['"'"'tokens_per_s'"'"']} tokens/s, "
      f"finish {a['"'"'finish_reason'"'"']}]")'
}
ask "What is the capital of France?"
ask "Name three primary colours."
ask "Write one sentence about the sea."
echo
echo "Q: (a malformed request, straight to the topic with mosquitto_pub)"
mosquitto_sub -p "$PORT" -t edge-agent/demo/response -C 1 -W 10 &
SUB=$!
sleep 0.5
mosquitto_pub -p "$PORT" -q 1 -t edge-agent/demo/request -m '{"id": "bad-1", "prompt": 42}'
wait "$SUB" || true
