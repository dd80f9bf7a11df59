#!/usr/bin/env bash
# A real S3 server for local runs and the integration tests: a one-node Ceph cluster (one monitor,
# one in-memory OSD) with the RADOS Gateway serving S3, plus one S3 user.
# Needs: apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd   (or: make system-deps)
#
#   tools/s3-ceph-up.sh start STATE_DIR [ACCESS_KEY] [SECRET_KEY]   start; prints the endpoint and pids
#   tools/s3-ceph-up.sh stop  STATE_DIR                             stop the daemons started there
#
# Ports: RGW_PORT (S3, default 7480) and MON_PORT (monitor, default 6789); the OSD picks free ports.
# Everything lives in STATE_DIR (config, logs, pids); the data is in memory and goes with the OSD.
set -euo pipefail

usage() { echo "usage: $0 start|stop STATE_DIR [ACCESS_KEY] [SECRET_KEY]" >&2; exit 2; }
[ $# -ge 2 ] || usage
MODE=$1
B=$(realpath -m "$2")

stop() {
  local pids=() f pid
  for f in "$B"/run/rgw.pid "$B"/run/osd.pid "$B"/run/mon.pid; do
    [ -f "$f" ] && pid=$(cat "$f") && [ -n "$pid" ] && kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  # The daemons are not our children, so `wait` cannot be used: poll until they are gone. The data is
  # in memory and thrown away, so a daemon slow to stop is killed after 3 s rather than waited for.
  for _ in $(seq 1 15); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

case "$MODE" in
  stop) stop; exit 0 ;;
  start) ;;
  *) usage ;;
esac

AK=${3:-CIACCESSKEY}; SK=${4:-CISECRETKEY123}
RGW_PORT=${RGW_PORT:-7480}; MON_PORT=${MON_PORT:-6789}
for tool in monmaptool ceph-mon ceph-osd ceph radosgw radosgw-admin python3; do
  command -v "$tool" >/dev/null || { echo "$tool not found: run 'make system-deps'" >&2; exit 3; }
done
# The state dir is wiped first; refuse to wipe anything that is not an old state dir of ours.
if [ -e "$B" ] && [ -n "$(ls -A "$B")" ] && [ ! -f "$B/ceph.conf" ]; then
  echo "$B is not empty and holds no ceph.conf: refusing to wipe it" >&2; exit 2
fi
[ -f "$B/ceph.conf" ] && stop
rm -rf "$B"; mkdir -p "$B"/{mon,osd0,run,log}; cd "$B"
FSID=$(python3 -c 'import uuid;print(uuid.uuid4())'); OSDUUID=$(python3 -c 'import uuid;print(uuid.uuid4())')
cat > ceph.conf <<CONF
[global]
fsid = $FSID
# v1 explicitly: Ceph takes any port but 6789 for msgr2, where radosgw cannot authenticate with auth none.
mon host = v1:127.0.0.1:$MON_PORT
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
# Fail in seconds, not the default 5 minutes, when a daemon cannot reach the monitor.
client mount timeout = 30
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
# The script places the OSD in the CRUSH map itself. Left on, the OSD's own start-up updates race its
# first monitor map and fail now and then with "wrong fsid" (Ceph 16).
osd crush update on start = false
osd class update on start = false
run dir = $B/run
log file = $B/log/\$name.log
admin socket = $B/run/\$name.asok
ms bind ipv6 = false
public network = 127.0.0.0/8
osd objectstore = memstore
memstore device bytes = 2147483648
[mon.a]
mon data = $B/mon
[osd.0]
osd data = $B/osd0
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
CONF
export CEPH_CONF=$B/ceph.conf

# A client that talks to a monitor before it has the monitor map is refused ("handle_command on fsid
# 0000..."), more often on a loaded machine. Every step below is idempotent, so it is simply retried.
retry() {
  local i
  for i in 1 2 3 4 5 6 7 8; do
    "$@" && return 0
    echo "retrying ($i): $*" >&2; sleep 1
  done
  return 1
}
rgw_answers() {
  python3 - "$RGW_PORT" <<'PY'
import sys, time, urllib.request
for _ in range(40):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2).read()
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit(1)
PY
}
start_rgw() {
  [ -f run/rgw.pid ] && kill "$(cat run/rgw.pid)" 2>/dev/null
  radosgw -n client.rgw --pid-file "$B/run/rgw.pid" && rgw_answers
}

monmaptool --create --addv a "[v1:127.0.0.1:$MON_PORT]" --fsid "$FSID" monmap >/dev/null
ceph-mon --mkfs -i a --monmap monmap && ceph-mon -i a --pid-file "$B/run/mon.pid"
retry timeout 30 ceph osd new "$OSDUUID" 0 >/dev/null
ceph-osd -i 0 --mkfs --osd-uuid "$OSDUUID" 2>/dev/null
retry timeout 30 ceph osd crush add osd.0 1.0 host=localhost root=default >/dev/null 2>&1
retry ceph-osd -i 0 --pid-file "$B/run/osd.pid" 2>/dev/null
retry start_rgw || { echo "RGW did not answer on port $RGW_PORT; see $B/log" >&2; exit 1; }
retry timeout 60 radosgw-admin user create --uid=ci --display-name=ci --access-key="$AK" --secret="$SK" >/dev/null
echo "RGW ready on http://127.0.0.1:$RGW_PORT (pids: $(cat "$B"/run/mon.pid) $(cat "$B"/run/osd.pid) $(cat "$B"/run/rgw.pid))"
