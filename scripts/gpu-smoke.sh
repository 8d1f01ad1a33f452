#!/usr/bin/env bash
# GPU smoke test of the node agent against the real NVIDIA library.
#
# On a machine with an NVIDIA GPU and driver, runs
#   gpuscale agent --once --output json --kubernetes off
# against the real libnvidia-ml.so.1 and checks the snapshot:
#   * NVML loaded and at least one GPU reported;
#   * every UUID is GPU-<36 hex/dash> or MIG-<36 hex/dash> (or the old
#     MIG-GPU-<uuid>/<gi>/<ci> form);
#   * every device's memory total is > 0 and memory used <= total;
#   * on Hopper (model name with H100, H200 or GH200): GPM supported and the
#     GPM metrics present (SM utilization, occupancy, tensor activity, DRAM
#     bandwidth), each in 0..1 — --once takes the two samples GPM needs.
# It prints one PASS/FAIL line per check and exits non-zero on any failure.
#
# Usage:
#   scripts/gpu-smoke.sh                    build (cargo build --release) and run
#   scripts/gpu-smoke.sh --bin PATH         run a prebuilt gpuscale binary
#   scripts/gpu-smoke.sh --check FILE       only check a saved snapshot (JSON)
#   scripts/gpu-smoke.sh ... -- FLAGS       extra flags for `gpuscale agent`,
#                                           e.g. -- --nvml-library /usr/lib64/libnvidia-ml.so.1
#
# Needs bash and python3 (no jq). The snapshot and the agent's log are kept
# in $GPU_SMOKE_OUT (default: a temporary directory, printed at the end).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

check_snapshot() {
    local file=$1
    if ! command -v python3 >/dev/null 2>&1; then
        echo "FAIL python3 not found (needed to check the snapshot)"
        return 1
    fi
    python3 - "$file" <<'PY'
import json
import re
import sys

path = sys.argv[1]
failures = 0


def result(ok, what):
    global failures
    print(("PASS " if ok else "FAIL ") + what)
    if not ok:
        failures += 1


try:
    with open(path, encoding="utf-8") as f:
        snap = json.load(f)
except (OSError, ValueError) as e:
    print(f"FAIL snapshot {path} is not readable JSON: {e}")
    sys.exit(1)

agent = snap.get("agent") or {}
gpus = snap.get("gpus") or []
result(agent.get("nvml_available") is True,
       f"NVML loaded (agent.nvml_available = {agent.get('nvml_available')})")
result(len(gpus) > 0, f"GPUs reported: {len(gpus)}")

uuid_re = re.compile(r"^(GPU|MIG)-[0-9a-f-]{36}$")
old_mig_re = re.compile(r"^MIG-GPU-[0-9a-f-]{36}/[0-9]+/[0-9]+$")
hopper_re = re.compile(r"\b(GH200|H100|H200)\b")
gpm_fields = ["sm_util_ratio", "sm_occupancy_ratio", "tensor_active_ratio", "dram_bw_util_ratio"]

for g in gpus:
    info = g.get("info") or {}
    metrics = g.get("metrics") or {}
    uuid = str(info.get("uuid", ""))
    name = str(info.get("model_name", ""))
    label = f"gpu {info.get('index')} {uuid or '(no uuid)'} ({name})"
    result(bool(uuid_re.match(uuid) or old_mig_re.match(uuid)),
           f"{label}: UUID format GPU-/MIG- + 36 hex digits and dashes")
    total = info.get("memory_total_bytes")
    result(isinstance(total, int) and total > 0, f"{label}: memory total {total} > 0")
    used = metrics.get("memory_used_bytes")
    if used is not None and isinstance(total, int):
        result(0 <= used <= total, f"{label}: memory used {used} within total")
    health = metrics.get("health") or {}
    if health.get("state") == "unhealthy":
        print(f"WARN {label}: reported unhealthy: {health.get('reason')}")
    is_mig = info.get("parent_uuid") is not None
    if hopper_re.search(name) and not is_mig:
        result(info.get("gpm_supported") is True, f"{label}: Hopper reports GPM support")
        gpm = metrics.get("gpm") or {}
        missing = [k for k in gpm_fields if gpm.get(k) is None]
        result(not missing, f"{label}: GPM metrics present" + (f" (missing: {', '.join(missing)})" if missing else ""))
        bad = [k for k in gpm_fields if gpm.get(k) is not None and not 0.0 <= gpm[k] <= 1.0]
        result(not bad, f"{label}: GPM ratios within 0..1" + (f" (out of range: {', '.join(bad)})" if bad else ""))

if failures:
    print(f"FAIL {failures} check(s) failed ({path})")
    sys.exit(1)
print(f"PASS all checks ({path})")
PY
}

bin=""
check_file=""
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) bin=${2:?--bin needs a path}; shift 2 ;;
        --check) check_file=${2:?--check needs a file}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "gpu-smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -n "$check_file" ]]; then
    check_snapshot "$check_file"
    exit $?
fi

root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "$bin" ]]; then
    echo "building gpuscale (cargo build --release) ..."
    (cd "$root" && cargo build --release --quiet --bin gpuscale)
    bin="${CARGO_TARGET_DIR:-$root/target}/release/gpuscale"
fi
if [[ ! -x "$bin" ]]; then
    echo "FAIL gpuscale binary not found or not executable: $bin"
    exit 1
fi

out=${GPU_SMOKE_OUT:-$(mktemp -d)}
mkdir -p "$out"
snapshot="$out/snapshot.json"
log="$out/agent.log"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version --format=csv,noheader || true
fi
node=$(hostname 2>/dev/null || echo gpu-smoke)
set +e
RUST_LOG=${RUST_LOG:-info} "$bin" agent --once --output json --kubernetes off \
    --node-name "$node" ${extra[@]+"${extra[@]}"} >"$snapshot" 2>"$log"
status=$?
set -e
if [[ $status -ne 0 ]]; then
    echo "FAIL gpuscale agent --once exited with $status; its log:"
    tail -n 40 "$log"
    exit 1
fi
echo "PASS gpuscale agent --once exited 0 (snapshot $snapshot, log $log)"
grep -E "WARN|ERROR" "$log" | tail -n 10 || true
check_snapshot "$snapshot"
