#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests/cluster/test_slurm.py (the micro DAG through
# `--workflow-profile profiles/slurm`). Debian 12 (SLURM 22.05), run as root:
#
#   sudo bash tests/cluster/setup_single_node_slurm.sh
#
# It installs what is missing (slurmctld, slurmd, slurm-client, slurmdbd, munge, mariadb-server), configures munge,
# a MariaDB database for slurmdbd (so that `sacct` works: the executor plugin polls job states with `sacct`, and
# falls back to `squeue` only where sacct is absent), and a one-node slurm.conf for this machine (its hostname, its
# CPUs and memory as `slurmd -C` reports them, one partition, select/cons_tres, and plugins that need no cgroups, so
# that it also runs in a container), then starts munged, MariaDB, slurmdbd, slurmctld and slurmd and waits until
# `sinfo` shows the node idle. Idempotent: a daemon already running with the same configuration is left alone; a
# changed configuration restarts the daemons that read it. Everything stays on this machine (localhost ports
# 3306, 6817-6819).
#
# Settings (environment): SSL3D_SLURM_PARTITION (default ssl3d, the partition's name; it is the cluster's default
# partition, which is what profiles/slurm uses while its slurm_partition stays commented out),
# SSL3D_SLURM_ACCOUNT (default ssl3d, the account root and $SUDO_USER are added to),
# SSL3D_SLURM_NO_INSTALL=1 (fail instead of running apt-get when a package is missing).
# Stop everything again with: bash tests/cluster/setup_single_node_slurm.sh --stop
set -euo pipefail

PARTITION=${SSL3D_SLURM_PARTITION:-ssl3d}
ACCOUNT=${SSL3D_SLURM_ACCOUNT:-ssl3d}
CLUSTER=ssl3d
HOST=$(hostname -s)
ETC=/etc/slurm
RUN=/run/slurm
LOG=/var/log/slurm
DB_PASSWORD=ssl3d-local-only  # MariaDB listens on localhost only; this database holds only this test's jobs

say() { echo "[slurm-setup] $*"; }
die() { echo "[slurm-setup] error: $*" >&2; exit 1; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {  # pidfile name
    if alive "$1"; then
        local pid
        pid=$(cat "$1")
        say "stopping $2 (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$1"
}

if [[ ${1:-} == --stop ]]; then
    stop_daemon $RUN/slurmd.pid slurmd
    stop_daemon $RUN/slurmctld.pid slurmctld
    stop_daemon $RUN/slurmdbd.pid slurmdbd
    # MariaDB and munged stay up: other services of this machine may use them.
    exit 0
fi

[[ $(id -u) == 0 ]] || die "run as root (it writes /etc/slurm and starts daemons)"

# --- packages -------------------------------------------------------------------------------------------------
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client sacct:slurm-client slurmdbd:slurmdbd \
            munged:munge mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null || PATH=$PATH:/usr/sbin command -v "${pair%%:*}" >/dev/null \
        || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    [[ ${SSL3D_SLURM_NO_INSTALL:-} != 1 ]] || die "missing packages: ${missing[*]}"
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin:/sbin

# --- munge ----------------------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key; else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
fi
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# --- MariaDB for slurmdbd -------------------------------------------------------------------------------------
if ! mariadb-admin ping --silent >/dev/null 2>&1; then
    say "starting MariaDB"
    install -d -o mysql -g mysql /run/mysqld
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    # bind to localhost only; detached from this shell so that it outlives it
    setsid mariadbd-safe --user=mysql --bind-address=127.0.0.1 </dev/null >/dev/null 2>&1 &
    for _ in $(seq 150); do mariadb-admin ping --silent >/dev/null 2>&1 && break; sleep 0.2; done
    mariadb-admin ping --silent >/dev/null 2>&1 || die "MariaDB did not start (see /var/log/mysql/error.log)"
fi
mariadb -u root <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# --- configuration files --------------------------------------------------------------------------------------
install -d -o slurm -g slurm $RUN $LOG /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
install -d $ETC
# This machine as slurmd sees it: "NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=..
# ThreadsPerCore=.. RealMemory=.." (a RealMemory above the real one would drain the node).
NODE=$(slurmd -C | head -n 1)
[[ $NODE == NodeName=* ]] || die "slurmd -C printed no node line: $NODE"

changed=()
write_if_changed() {  # path mode owner: the file's new text on stdin; records the path in $changed if it differs
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else
        install -m "$2" -o "$3" -g "$3" "$tmp" "$1"; rm -f "$tmp"; changed+=("$1"); fi
}

write_if_changed $ETC/slurm.conf 0644 root <<CONF
# Written by tests/cluster/setup_single_node_slurm.sh: a one-node cluster on $HOST for ssl3d's tests.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# No cgroups (containers): processes tracked through /proc, no task binding or confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Accounting through slurmdbd, so that sacct answers (the executor plugin's job status queries) and records
# each job's CPUs, requested memory and peak RSS (sampled every 2 s: the test's jobs are short).
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
# Keep sbatch --comment (the plugin writes rule_<rule>_wildcards_<...> there) in the database, for sacct -o Comment.
AccountingStoreFlags=job_comment
# Finished jobs stay visible to squeue/scontrol for 10 minutes.
MinJobAge=600
$NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

write_if_changed $ETC/slurmdbd.conf 0600 slurm <<CONF
# Written by tests/cluster/setup_single_node_slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
CONF

# task/none and proctrack/linuxproc need no cgroup.conf; an empty one keeps slurmd from probing for defaults.
write_if_changed $ETC/cgroup.conf 0644 root <<CONF
# Written by tests/cluster/setup_single_node_slurm.sh: not used (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none)
CONF

for path in "${changed[@]}"; do
    say "wrote $path"
    case $path in
        */slurmdbd.conf) stop_daemon $RUN/slurmdbd.pid slurmdbd; stop_daemon $RUN/slurmctld.pid slurmctld ;;
        */slurm.conf) stop_daemon $RUN/slurmd.pid slurmd; stop_daemon $RUN/slurmctld.pid slurmctld ;;
    esac
done

# --- daemons ----------------------------------------------------------------------------------------------------
if ! alive $RUN/slurmdbd.pid; then
    say "starting slurmdbd"
    slurmdbd
    for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.3; done
    sacctmgr -n list cluster >/dev/null 2>&1 || die "slurmdbd does not answer (see $LOG/slurmdbd.log)"
fi
if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if [[ -z $(sacctmgr -n -P list account "$ACCOUNT" format=account) ]]; then
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="ssl3d single-node tests" \
        Organization=ssl3d >/dev/null
fi
for user in root ${SUDO_USER:-}; do  # root exists already (account root): give it the test account as default
    if [[ -z $(sacctmgr -n -P list assoc cluster="$CLUSTER" user="$user" account="$ACCOUNT" format=user) ]]; then
        sacctmgr -i add user "$user" Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    fi
    if [[ $(sacctmgr -n -P list user "$user" format=defaultaccount) != "$ACCOUNT" ]]; then
        sacctmgr -i modify user "$user" set DefaultAccount="$ACCOUNT" >/dev/null
    fi
done

if ! alive $RUN/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.3; done
scontrol ping | grep -q UP || die "slurmctld does not answer (see $LOG/slurmctld.log)"
if ! alive $RUN/slurmd.pid; then
    say "starting slurmd"
    slurmd
fi

# --- wait for the node ------------------------------------------------------------------------------------------
state=
for _ in $(seq 120); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1)
    case $state in
        idle) break ;;
        mixed|allocated|completing) break ;;  # jobs of an earlier run still running: the cluster is up
        down*|drain*|fail*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
case $state in
    idle|mixed|allocated|completing) ;;
    *) die "node $HOST is '$state' (see $LOG/slurmd.log, $LOG/slurmctld.log; scontrol show node $HOST)" ;;
esac
say "ready: node $HOST $state in partition $PARTITION (account $ACCOUNT, cluster $CLUSTER)"
sinfo
