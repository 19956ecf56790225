#!/usr/bin/env bash
# A two-node SLURM cluster on this one machine, for trying and testing launch/gvpo_70b.sh for real:
# slurmctld plus two slurmd daemons (nodes gvpo-n1 and gvpo-n2, both this host's CPUs, no GPUs) in one
# partition, authenticated by a munged of their own. Everything lives under $SLURM_TESTBED_DIR (default
# /tmp/gvpo-slurm); nothing is written elsewhere but a line in /etc/hosts that names the nodes (127.0.0.1),
# which `down` removes.
#
#   tools/slurm_testbed.sh install   # Debian's slurm-wlm 22.05 and munge (apt-get, as root)
#   tools/slurm_testbed.sh up        # install if needed, start the daemons, wait for both nodes; prints the
#                                    # `export SLURM_CONF=...` the clients (sbatch, squeue, ...) need
#   tools/slurm_testbed.sh down      # stop every daemon and job, remove the directory and the hosts line
#   tools/slurm_testbed.sh status    # exit 0 when the cluster is up, with sinfo's view
#   tools/slurm_testbed.sh crash N   # node N fails as if its power were cut: its slurmd, the step daemons of its
#                                    # jobs and every process running on it are SIGKILLed; `up` brings it back
#
# `up` and `down` are idempotent: `up` on a running test bed only checks it, `down` on none does nothing.
# One host as several nodes: each slurmd gets its own Port= and NodeAddr=127.0.0.1 (slurmd -N <name>), and
# config_overrides lets both nodes claim the machine's CPUs. A job's processes are tracked in cgroups (v1 freezer,
# /sys/fs/cgroup/freezer/slurm_<node>/...) where the machine lets root make one, so that what a step leaves
# behind dies with it as on a real cluster; otherwise by parent pid (proctrack/linuxproc), which loses processes
# that daemonize. CPUs and memory are not constrained: both nodes share this machine.
set -euo pipefail

DIR=${SLURM_TESTBED_DIR:-/tmp/gvpo-slurm}
NODES=(gvpo-n1 gvpo-n2)
CTLD_PORT=${SLURM_TESTBED_PORT:-16817}  # slurmd i listens on CTLD_PORT + 1 + i
# Each test bed's own line: `down` removes it and leaves another bed's (same names, another directory) alone.
HOSTS_LINE="127.0.0.1 ${NODES[*]} # gvpo-slurm-testbed $DIR"
export SLURM_CONF="$DIR/slurm.conf"

die() { echo "slurm_testbed: $*" >&2; exit 1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
            && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "installing slurm-wlm needs root (apt-get); install slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null || die "no apt-get: install SLURM 22.05+ (slurmctld, slurmd, client) and munge"
    echo "slurm_testbed: installing slurmctld slurmd slurm-client munge (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    # The packages enable systemd units; where systemd runs they would start daemons of their own: stop them.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

cgroup_v1_writable() {
    local probe=/sys/fs/cgroup/freezer/gvpo-testbed-probe-$$
    mkdir "$probe" 2>/dev/null && rmdir "$probe"
}

write_config() {
    local cpus mem proctrack=proctrack/linuxproc task=task/none
    cpus=$(nproc --all)  # not OMP_NUM_THREADS, which nproc alone honours
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MiB per node: half each
    mkdir -p "$DIR"/{state,log,munge,spool}
    chmod 700 "$DIR/munge"
    if [[ ! -f $DIR/munge/munge.key ]]; then
        head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
        chmod 400 "$DIR/munge/munge.key"
    fi
    rm -f "$DIR/cgroup.conf"
    if cgroup_v1_writable; then
        proctrack=proctrack/cgroup task=task/cgroup
        printf '%s\n' "CgroupPlugin=cgroup/v1" "CgroupMountpoint=/sys/fs/cgroup" "ConstrainCores=no" \
            "ConstrainRAMSpace=no" "ConstrainDevices=no" > "$DIR/cgroup.conf"  # read beside slurm.conf
    fi
    {
        echo "ClusterName=gvpo-testbed"
        echo "SlurmctldHost=$(hostname -s)(127.0.0.1)"
        echo "SlurmctldPort=$CTLD_PORT"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$DIR/munge/munge.socket"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$DIR/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/slurmd.%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd.%n.log"
        echo "ProctrackType=$proctrack"
        echo "TaskPlugin=$task"
        echo "MpiDefault=none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "SlurmdParameters=config_overrides"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "ReturnToService=2"
        echo "SlurmdTimeout=30"
        echo "KillWait=30"
        echo "MinJobAge=600"  # a finished job's record lives this long: scontrol requeue needs it
        local i=0
        for node in "${NODES[@]}"; do
            echo "NodeName=$node NodeHostname=$node NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 1 + i)) CPUs=$cpus" \
                 "RealMemory=$mem State=UNKNOWN"
            i=$((i + 1))
        done
        echo "PartitionName=testbed Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" \
             "OverSubscribe=YES"
    } > "$SLURM_CONF"
}

hosts_line() {
    if ! grep -qxF "$HOSTS_LINE" /etc/hosts 2>/dev/null; then
        echo "$HOSTS_LINE" >> /etc/hosts
    fi
}

# A pid file names its daemon while that pid runs the daemon's program (pids of dead daemons are reused).
pid_alive() { [[ -f $1 ]] && grep -qs "$(basename "$1" .pid | cut -d. -f1)" "/proc/$(cat "$1")/cmdline"; }

up() {
    [[ $(id -u) == 0 ]] || die "the test bed's daemons run as root (SlurmUser=root); run as root"
    install
    hosts_line
    if status >/dev/null 2>&1; then
        echo "slurm_testbed: already up"
        echo "export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    write_config
    pid_alive "$DIR/munged.pid" || munged --force --key-file="$DIR/munge/munge.key" \
        --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
    for node in "${NODES[@]}"; do
        mkdir -p "$DIR/spool/$node"
        pid_alive "$DIR/slurmd.$node.pid" || slurmd -f "$SLURM_CONF" -N "$node"
    done
    local deadline=$((SECONDS + 60))
    until status >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            sinfo -N 2>&1 || true
            tail -n 20 "$DIR"/log/*.log >&2 || true
            die "the nodes did not come up in 60 s (logs in $DIR/log)"
        fi
        sleep 1
    done
    echo "slurm_testbed: up: ${NODES[*]} in partition testbed ($(grep -o 'proctrack/[a-z]*' "$SLURM_CONF"))"
    echo "export SLURM_CONF=$SLURM_CONF"
}

status() {
    [[ -f $SLURM_CONF ]] || { echo "slurm_testbed: down (no $SLURM_CONF)"; return 1; }
    local idle node
    for node in "${NODES[@]}"; do  # SLURM takes SlurmdTimeout to notice a dead slurmd
        pid_alive "$DIR/slurmd.$node.pid" || { echo "slurm_testbed: no slurmd for $node"; return 1; }
    done
    idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)/' | wc -l)
    sinfo -N 2>/dev/null || true
    [[ $idle == "${#NODES[@]}" ]]
}

down() {
    if [[ -f $SLURM_CONF ]] && pid_alive "$DIR/slurmctld.pid"; then
        scancel --full --quiet --partition=testbed 2>/dev/null || true
    fi
    local pidfile
    for pidfile in "$DIR"/slurmd.*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
        pid_alive "$pidfile" || continue
        local pid
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [[ -f /etc/hosts ]] && grep -qxF "$HOSTS_LINE" /etc/hosts; then
        # /etc/hosts may be a bind mount (containers): rewrite it in place, never replace the file.
        local kept
        kept=$(grep -vxF "$HOSTS_LINE" /etc/hosts)
        printf '%s\n' "$kept" > /etc/hosts
    fi
    local node
    for node in "${NODES[@]}"; do  # the nodes' empty cgroups (rmdir refuses one that holds processes)
        if [[ -d /sys/fs/cgroup/freezer/slurm_$node ]]; then
            find "/sys/fs/cgroup/freezer/slurm_$node" -depth -type d -exec rmdir {} + 2>/dev/null || true
        fi
    done
    rm -rf "$DIR"
    echo "slurm_testbed: down"
}

crash() {
    local node=${1:-} pid fd environ _
    [[ " ${NODES[*]} " == *" $node "* ]] || die "crash: name one of the nodes: ${NODES[*]}"
    if pid_alive "$DIR/slurmd.$node.pid"; then kill -9 "$(cat "$DIR/slurmd.$node.pid")"; fi
    rm -f "$DIR/slurmd.$node.pid"
    for _ in 1 2; do  # twice: a process may start another while the first pass runs
        for pid in $(pgrep -x slurmstepd); do  # a node's step daemons write to its slurmd's log
            for fd in /proc/"$pid"/fd/*; do
                if [[ $(readlink "$fd" 2>/dev/null) == */slurmd."$node".log ]]; then
                    kill -9 "$pid" 2>/dev/null || true
                    break
                fi
            done
        done
        while IFS= read -r environ; do  # the node's tasks and their children
            pid=${environ#/proc/}
            kill -9 "${pid%/environ}" 2>/dev/null || true
        done < <(grep -lsx --null-data "SLURMD_NODENAME=$node" /proc/[0-9]*/environ)
    done
    echo "slurm_testbed: $node crashed (slurmd and every process on it killed); \`up\` brings it back"
}

case "${1:-}" in
    install) install ;;
    up) up ;;
    down) down ;;
    status) status ;;
    crash) crash "${2:-}" ;;
    *) die "usage: $0 install|up|down|status|crash NODE" ;;
esac
