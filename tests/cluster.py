#!/usr/bin/env python3
"""A cluster of N hosts on this one machine, for tests: network namespaces joined by a bridge.

    from cluster import Cluster
    with Cluster(n_hosts=3, bandwidth="100mbit", second_net=True) as c:
        c.hosts                           # ["node1", "node2", "node3"]
        c.run("node1", "hostname")        # subprocess.run inside node1 -> stdout "node1\\n"
        c.popen("node1", ["ssh", "node2", "true"])   # subprocess.Popen inside node1
        c.processes("node2")              # pids running on node2, besides the cluster's own daemons
        c.kill_host("node2")              # SIGKILL every process of node2 (its sshd and slurmd too)
        c.link_down("node2"); c.link_up("node2")     # pull / plug node2's cable (net 0 by default)
        c.counters("node1")               # {"eth0": (rx_bytes, tx_bytes), "eth1": ...}
        c.start_slurm()                   # munged, slurmctld on node1, one slurmd -N nodeK per host
        job = c.sbatch("node1", [...]); c.wait_job(job)

What a host is:
- a network namespace `abc-ID-nodeK` (ID: 6 hex digits, unique per cluster) with `lo`, `eth0` on the
  first network and, with second_net=True, `eth1` on a second one; each network is a Linux bridge
  `abcIDb0` / `abcIDb1`, and each cable a veth pair (`abcIDKKn` outside, `ethN` inside);
- its own hostname (a UTS namespace held by an anchor process, `sleep infinity`);
- its own /etc/hosts, /etc/ssh and /etc/slurm: `ip netns exec` bind-mounts /etc/netns/abc-ID-nodeK/*
  over /etc/* in the host's private mount namespace, so `ssh node2` and `sbatch` work inside the
  hosts with the system's clients while the machine's own ssh and Slurm settings stay untouched;
- an sshd (port 22 inside its namespace) with the cluster's own host key and authorized_keys;
- the machine's file system, shared as NFS would be: a checkout and its .venv work on every host.

Addresses exist only inside the namespaces (10.X.Y.K, X.Y from the ID); the bridges have none and
nothing is routed to or from the machine. Ports (ssh 22, slurmctld 6817, slurmd 6818) are per
namespace, so clusters never collide. A running dockerd sets the FORWARD policy to DROP, which with
br_netfilter drops bridged traffic too; each bridge therefore gets one `iptables -I FORWARD -i BR -o BR
-j ACCEPT` rule, deleted again at teardown. No other firewall rule is touched.

Teardown (the context manager's exit, `down ID`) kills every process in the cluster's namespaces and
removes the namespaces, bridges, rules, /etc/netns entries and the state dir /run/adabatch-cluster/ID.
A cluster made by a test also gets a watcher process that does the same once the test process is
gone (a kill -9 of pytest leaves nothing behind), and every new cluster first removes the stale
clusters of dead owners.

Command line (a cluster made here lives until `down`):
    python tests/cluster.py up [-n 2] [--second-net] [--bandwidth 100mbit] [--slurm]
    python tests/cluster.py exec ID HOST CMD...      # e.g. exec ID node1 bash
    python tests/cluster.py list | down ID | clean    # clean: clusters whose owner has died
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE_ROOT = Path("/run/adabatch-cluster")
PREFIX = "abc"  # every name this module makes starts with it: netns abc-ID-*, links abcID*
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
TOOLS = ("ip", "unshare", "nsenter", "iptables", "tc", "sshd", "ssh", "ssh-keygen")
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")
ANCHOR = "sleep"  # the process that holds a host's UTS and mount namespaces


class ClusterError(RuntimeError):
    """The cluster cannot be made here; the message is one line that says why."""


def _sh(*cmd, check=True, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    proc = subprocess.run([str(c) for c in cmd], **kw)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout or '').strip().splitlines()[-1:] or ''}")
    return proc


def _start_time(pid: int):
    """A process's start time (clock ticks since boot), to tell it from a later process with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid, start) -> bool:
    return pid is not None and _start_time(pid) == start


def _netns_inode(name: str):
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def pids_by_netns() -> dict:
    """{netns inode: [pid, ...]} over every live process of the machine."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                out.setdefault(os.stat(f"/proc/{entry}/ns/net").st_ino, []).append(int(entry))
            except OSError:  # gone, or a zombie
                pass
    return out


def _kill_all(netns_names, keep=(), timeout=10.0) -> None:
    """SIGKILL every process in these namespaces (except `keep`) until none is left."""
    inodes = {i for i in map(_netns_inode, netns_names) if i is not None}
    end = time.monotonic() + timeout
    while True:
        table = pids_by_netns()
        victims = [p for i in inodes for p in table.get(i, []) if p not in keep]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > end:
            raise ClusterError(f"processes {victims} in {sorted(netns_names)} survive SIGKILL")
        time.sleep(0.05)


def _forward_rule(bridge: str) -> list:
    return ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]


def down(cid: str) -> None:
    """Tear down cluster `cid` from its names alone (works after any crash of its owner)."""
    tag = f"{PREFIX}-{cid}-"
    names = [n for n in (os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []) if n.startswith(tag)]
    _kill_all(names)
    for n in names:
        _sh("ip", "netns", "delete", n, check=False)
    links = _sh("ip", "-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}{cid}"):
            _sh("ip", "link", "delete", name, check=False)
    if shutil.which("iptables"):  # the rules between this cluster's bridges (and no other)
        for rule in _sh("iptables", "-w", "-S", "FORWARD", check=False).stdout.splitlines():
            parts = rule.split()
            if parts[:2] == ["-A", "FORWARD"] and parts[2:6] == ["-i", parts[3], "-o", parts[3]] \
                    and parts[3].startswith(f"{PREFIX}{cid}b"):
                _sh("iptables", "-w", "-D", *parts[1:], check=False)
    for d in ETC_NETNS.glob(f"{tag}*") if ETC_NETNS.is_dir() else []:
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(STATE_ROOT / cid, ignore_errors=True)


def clean_stale() -> list:
    """Tear down every cluster whose owning process has died; return their ids."""
    gone = []
    for d in STATE_ROOT.iterdir() if STATE_ROOT.is_dir() else []:
        try:
            owner = json.loads((d / "owner.json").read_text())
        except (OSError, ValueError):
            # No owner file: a cluster being made right now, or a `cluster.py up` one (persistent).
            if (d / "persistent").exists() or time.time() - d.stat().st_mtime < 120:
                continue
            owner = {"pid": None, "start": None}
        if not _alive(owner["pid"], owner["start"]):
            down(d.name)
            gone.append(d.name)
    return gone


def _check_prerequisites(tools) -> None:
    if os.geteuid() != 0:
        raise ClusterError("the test cluster needs root (network namespaces, bridges, sshd); run the tests as root")
    missing = [t for t in tools if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        raise ClusterError(f"the test cluster needs {', '.join(missing)}: run launch/setup.sh (it apt-installs "
                           f"openssh-server, slurm-wlm, munge, iproute2, iptables)")
    probe = f"{PREFIX}-probe-{os.getpid()}"
    proc = _sh("ip", "netns", "add", probe, check=False)
    _sh("ip", "netns", "delete", probe, check=False)
    if proc.returncode != 0:
        raise ClusterError(f"cannot create a network namespace here: {proc.stderr.strip()}")


class Cluster:
    """N hosts in network namespaces on this machine (see the module docstring)."""

    def __init__(self, n_hosts: int = 2, bandwidth=None, second_net: bool = False, slurm: bool = False,
                 owner: int | None = None):
        """bandwidth: a tc rate ("100mbit") for every cable, or {net: rate}; owner: the pid whose death
        tears the cluster down (default: this process; None from the command line: kept until `down`)."""
        self.n_hosts, self.second_net = n_hosts, second_net
        self.nets = 2 if second_net else 1
        if isinstance(bandwidth, dict):
            self.bandwidth = bandwidth
        else:
            self.bandwidth = {net: bandwidth for net in range(self.nets)} if bandwidth else {}
        self.hosts = [f"node{k}" for k in range(1, n_hosts + 1)]
        self._owner = os.getpid() if owner is None else owner
        self._want_slurm = slurm
        self._anchors, self._daemons, self._children = {}, {}, []
        self.id = None
        if not 1 <= n_hosts <= 99:
            raise ClusterError(f"n_hosts must be 1..99, got {n_hosts}")

    # ---- names ---------------------------------------------------------------------------------
    def netns(self, host: str) -> str:
        return f"{PREFIX}-{self.id}-{host}"

    def bridge(self, net: int = 0) -> str:
        return f"{PREFIX}{self.id}b{net}"

    def cable(self, host: str, net: int = 0) -> str:
        """The outside end of the host's veth on `net` (the inside end is eth<net>)."""
        return f"{PREFIX}{self.id}{self.hosts.index(host) + 1:02d}{net}"

    def address(self, host: str, net: int = 0) -> str:
        return f"{self._subnet(net)}.{self.hosts.index(host) + 1}"

    def _subnet(self, net: int) -> str:
        x = 100 + int(self.id[:2], 16) % 100
        return f"10.{x}.{(int(self.id[2:4], 16) & 0xF8) | net}"

    # ---- life cycle ----------------------------------------------------------------------------
    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()

    def up(self) -> "Cluster":
        _check_prerequisites(TOOLS + (SLURM_TOOLS if self._want_slurm else ()))
        clean_stale()
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        while True:
            self.id = secrets.token_hex(3)
            try:
                (STATE_ROOT / self.id).mkdir()
                break
            except FileExistsError:
                continue
        self.state = STATE_ROOT / self.id
        try:
            if self._owner:
                (self.state / "owner.json").write_text(json.dumps(
                    {"pid": self._owner, "start": _start_time(self._owner)}))
                self._watch()
            else:
                (self.state / "persistent").touch()
            self._keys()
            for net in range(self.nets):
                self._make_bridge(net)
            for host in self.hosts:
                self._make_host(host)
            for host in self.hosts:
                self._wait_ssh(host)
            (self.state / "anchors.json").write_text(json.dumps(self._anchors))
            if self._want_slurm:
                self.start_slurm()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        if self.id is None:
            return
        down(self.id)
        for p in self._children:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.id = None

    def _watch(self) -> None:
        """A detached process that tears the cluster down once its owner has died."""
        log = open(self.state / "watcher.log", "w")
        subprocess.Popen([sys.executable, __file__, "watch", self.id, str(self._owner)], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True, close_fds=True)
        log.close()

    def _keys(self) -> None:
        (self.state / "home").mkdir(mode=0o700)
        ssh = self.state / "ssh"
        ssh.mkdir(mode=0o700)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cluster-{self.id}", "-f", ssh / "id_ed25519")
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh / "ssh_host_ed25519_key")
        shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
        # The /etc/ssh that every host sees: the system's client and server with this cluster's files.
        etc = self.state / "etc-ssh"
        etc.mkdir()
        if Path("/etc/ssh/moduli").exists():
            shutil.copy("/etc/ssh/moduli", etc / "moduli")
        (etc / "sshd_config").write_text(f"""\
# sshd of one cluster host (tests/cluster.py {self.id})
Port 22
HostKey {ssh}/ssh_host_ed25519_key
AuthorizedKeysFile {ssh}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
MaxStartups 200
MaxSessions 200
LogLevel ERROR
Subsystem sftp internal-sftp
""")
        (etc / "ssh_config").write_text(f"""\
# ssh client inside the cluster hosts (tests/cluster.py {self.id})
Host *
    IdentityFile {ssh}/id_ed25519
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
    ConnectTimeout 10
    KexAlgorithms curve25519-sha256
    Ciphers aes128-gcm@openssh.com
""")
        (self.state / "etc-slurm").mkdir()
        hosts = ["127.0.0.1 localhost", "::1 localhost"]
        for net in range(self.nets):
            for h in self.hosts:
                hosts.append(f"{self.address(h, net)} {h if net == 0 else f'{h}-net{net}'}")
        (self.state / "hosts").write_text("\n".join(hosts) + "\n")

    def _make_bridge(self, net: int) -> None:
        br = self.bridge(net)
        _sh("ip", "link", "add", br, "type", "bridge")
        _sh("ip", "link", "set", br, "up")
        _sh("iptables", "-w", "-I", *_forward_rule(br))

    def _make_host(self, host: str) -> None:
        ns = self.netns(host)
        etc = ETC_NETNS / ns
        etc.mkdir(parents=True)
        os.symlink(self.state / "hosts", etc / "hosts")
        os.symlink(self.state / "etc-ssh", etc / "ssh")
        if Path("/etc/slurm").is_dir():
            os.symlink(self.state / "etc-slurm", etc / "slurm")
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        for net in range(self.nets):
            out, inside = self.cable(host, net), f"eth{net}"
            _sh("ip", "link", "add", out, "type", "veth", "peer", "name", inside, "netns", ns)
            _sh("ip", "link", "set", out, "master", self.bridge(net), "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(host, net)}/24", "dev", inside)
            _sh("ip", "-n", ns, "link", "set", inside, "up")
            if self.bandwidth.get(net):
                self.set_bandwidth(host, self.bandwidth[net], net)
        anchor = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "--", "sh", "-c",
                                   f"hostname {host} && exec {ANCHOR} infinity"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  start_new_session=True)
        self._children.append(anchor)
        self._anchors[host] = anchor.pid
        for _ in range(200):  # until the anchor is the sleep with the host's name
            if self._hostname_ready(host):
                break
            if anchor.poll() is not None:
                raise ClusterError(f"cannot start host {host}: {anchor.stderr.read().strip()}")
            time.sleep(0.02)
        else:
            raise ClusterError(f"host {host} did not come up")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir (Debian)
        sshd = self.popen(host, [shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e",
                                 "-o", f"PidFile={self.state}/{host}-sshd.pid"],
                          stdout=open(self.state / f"{host}-sshd.log", "w"), stderr=subprocess.STDOUT,
                          start_new_session=True)
        self._daemons.setdefault(host, []).append(sshd.pid)

    def _hostname_ready(self, host: str) -> bool:
        pid = self._anchors[host]
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            uts = os.readlink(f"/proc/{pid}/ns/uts")
        except OSError:
            return False
        return exe.endswith(f"/{ANCHOR}") and uts != os.readlink("/proc/self/ns/uts")

    def _wait_ssh(self, host: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while True:
            proc = self.run(self.hosts[0], ["ssh", "-o", "ConnectTimeout=2", host, "hostname"], timeout=15)
            if proc.returncode == 0 and proc.stdout.strip() == host:
                return
            if time.monotonic() > end:
                log = (self.state / f"{host}-sshd.log").read_text().strip()
                raise ClusterError(f"ssh {host} from {self.hosts[0]} fails: {proc.stderr.strip()} {log}")
            time.sleep(0.1)

    # ---- using it -----------------------------------------------------------------------------
    def command(self, host: str, cmd, cwd=None) -> list:
        """argv that runs `cmd` (a list, or a string for bash -c) on `host`, in `cwd` (default: ours)."""
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
        # HOME: horovodrun caches each host list's network interfaces in ~/.horovod for an hour, and
        # clusters with the same host names but other networks must not share that cache.
        return ["nsenter", "-t", str(self._anchors[host]), "-n", "-u", "-m",
                f"--wd={cwd or os.getcwd()}", "--", "env", f"HOME={self.state}/home", *argv]

    def run(self, host: str, cmd, cwd=None, **kw) -> subprocess.CompletedProcess:
        """subprocess.run on `host` (text output captured unless told otherwise)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(host, cmd, cwd), **kw)

    def popen(self, host: str, cmd, cwd=None, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(self.command(host, cmd, cwd), **kw)
        self._children.append(proc)
        return proc

    def processes(self, host: str) -> list:
        """Pids on `host` other than the cluster's own (the anchor, sshd, Slurm daemons)."""
        own = {self._anchors[host], *self._daemons.get(host, [])}
        return sorted(p for p in pids_by_netns().get(_netns_inode(self.netns(host)), []) if p not in own)

    def describe(self, pids) -> str:
        lines = []
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            lines.append(f"{pid} (ppid {ppid}): {cmd}")
        return "\n".join(lines)

    def kill_host(self, host: str) -> None:
        """The host dies: SIGKILL every process on it, its sshd and slurmd included."""
        _kill_all([self.netns(host)], keep={self._anchors[host]})
        self._daemons[host] = []

    def link_down(self, host: str, net: int = 0) -> None:
        _sh("ip", "link", "set", self.cable(host, net), "down")

    def link_up(self, host: str, net: int = 0) -> None:
        _sh("ip", "link", "set", self.cable(host, net), "up")

    def set_bandwidth(self, host: str, rate: str, net: int = 0) -> None:
        """Limit the host's cable on `net` to `rate` (tc units, e.g. 100mbit) in both directions."""
        tbf = ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms"]
        _sh("tc", "qdisc", "replace", "dev", self.cable(host, net), *tbf)
        _sh("ip", "netns", "exec", self.netns(host), "tc", "qdisc", "replace", "dev", f"eth{net}", *tbf)

    def counters(self, host: str) -> dict:
        """{interface: (rx_bytes, tx_bytes)} inside `host`."""
        out = {}
        for line in self.run(host, ["cat", "/proc/net/dev"], check=True).stdout.splitlines()[2:]:
            name, data = line.split(":", 1)
            f = data.split()
            out[name.strip()] = (int(f[0]), int(f[8]))
        return out

    # ---- Slurm ---------------------------------------------------------------------------------
    def start_slurm(self, timeout: float = 60.0) -> None:
        """munged, slurmctld on the first host and `slurmd -N HOST` on every host; wait for idle nodes."""
        _check_prerequisites(SLURM_TOOLS)
        head = self.hosts[0]
        s = self.state / "slurm"
        munge = self.state / "munge"
        for d in (s / "ctld", munge):
            d.mkdir(parents=True)
        for h in self.hosts:
            (s / h / "spool").mkdir(parents=True)
            (s / h / "tmp").mkdir()
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        socket = munge / "munge.socket"
        # munged runs as root here (--force): the key, socket and logs are this cluster's own files.
        p = self.popen(head, ["munged", "--foreground", "--force", f"--socket={socket}", f"--key-file={key}",
                              f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                              f"--seed-file={munge}/munged.seed"],
                       stdout=subprocess.DEVNULL, stderr=open(munge / "stderr.log", "w"), start_new_session=True)
        self._daemons.setdefault(head, []).append(p.pid)
        for _ in range(200):
            if socket.exists():
                break
            time.sleep(0.02)
        else:
            raise ClusterError(f"munged did not start: {(munge / 'stderr.log').read_text().strip()}")
        nodes = f"node[1-{self.n_hosts}]" if self.n_hosts > 1 else "node1"
        conf = self.state / "etc-slurm"
        (conf / "slurm.conf").write_text(f"""\
# Slurm of test cluster {self.id} (tests/cluster.py); seen as /etc/slurm inside its hosts
ClusterName=abc{self.id}
SlurmctldHost={head}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again
AuthInfo=socket={socket},cred_expire=15
CredType=cred/munge
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/%n/spool
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/%n/slurmd.pid
SlurmctldLogFile={s}/slurmctld.log
SlurmdLogFile={s}/%n/slurmd.log
# A node's own /tmp for jobs: the hosts share the machine's /tmp, where mpi/pmix of every node would
# make the same per-step dir (spmix_appdir_UID_JOB.STEP: "File exists")
TmpFS={s}/%n/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# (the test jobs are short: schedule every 2 s, not 60/30 s, e.g. a requeued job once its BeginTime is reached)
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName={nodes} CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (conf / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        ctld = self.popen(head, ["slurmctld", "-D", "-i"], stdout=subprocess.DEVNULL,
                          stderr=open(s / "slurmctld.stderr", "w"), start_new_session=True)
        self._daemons[head].append(ctld.pid)
        for h in self.hosts:
            d = self.popen(h, ["slurmd", "-D", "-N", h], stdout=subprocess.DEVNULL,
                           stderr=open(s / h / "slurmd.stderr", "w"), start_new_session=True)
            self._daemons.setdefault(h, []).append(d.pid)
        end = time.monotonic() + timeout
        while True:
            proc = self.run(head, ["sinfo", "-h", "-N", "-o", "%N %t"], timeout=30)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            if proc.returncode == 0 and len(states) == self.n_hosts and set(states.values()) == {"idle"}:
                return
            if time.monotonic() > end:
                raise ClusterError(f"Slurm nodes not idle after {timeout:.0f} s: {proc.stdout.strip()} "
                                   f"{proc.stderr.strip()} (logs in {s})")
            time.sleep(0.2)

    def sbatch(self, host: str, args, cwd=None, env=None) -> str:
        """Submit with sbatch on `host`; return the job id."""
        proc = self.run(host, ["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env, timeout=60)
        if proc.returncode != 0:
            raise ClusterError(f"sbatch failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """scontrol show job, as {field: value}."""
        proc = self.run(self.hosts[0], ["scontrol", "-o", "show", "job", job_id], timeout=30)
        fields = {}
        for item in proc.stdout.split():
            k, _, v = item.partition("=")
            fields.setdefault(k, v)
        return fields

    def wait_job(self, job_id: str, timeout: float = 300.0, states=("COMPLETED", "FAILED", "CANCELLED",
                                                                      "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")):
        """Poll until the job reaches one of `states`; return its fields."""
        end = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > end:
                raise ClusterError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")
            time.sleep(0.3)


def _watch(cid: str, owner: int) -> None:
    start = json.loads((STATE_ROOT / cid / "owner.json").read_text())["start"]
    while (STATE_ROOT / cid).exists() and _alive(owner, start):
        time.sleep(0.5)
    if (STATE_ROOT / cid).exists():
        down(cid)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cluster.py", description="A cluster of hosts on this machine (see the source)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make a cluster that lives until `down ID`")
    up.add_argument("-n", "--hosts", type=int, default=2)
    up.add_argument("--second-net", action="store_true")
    up.add_argument("--bandwidth", default=None, help="tc rate per cable, e.g. 100mbit")
    up.add_argument("--slurm", action="store_true")
    ex = sub.add_parser("exec", help="run a command on a host")
    ex.add_argument("id")
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("list")
    d = sub.add_parser("down")
    d.add_argument("id")
    sub.add_parser("clean", help="tear down the clusters of dead owners")
    w = sub.add_parser("watch")  # internal: the watcher of one cluster
    w.add_argument("id")
    w.add_argument("owner", type=int)
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            c = Cluster(args.hosts, args.bandwidth, args.second_net, args.slurm, owner=0).up()
            print(c.id)
            print(f"hosts: {' '.join(c.hosts)}; shell: {sys.argv[0]} exec {c.id} node1 bash; "
                  f"remove: {sys.argv[0]} down {c.id}", file=sys.stderr)
        elif args.cmd == "exec":
            anchors = json.loads((STATE_ROOT / args.id / "anchors.json").read_text())
            os.execvp("nsenter", ["nsenter", "-t", str(anchors[args.host]), "-n", "-u", "-m", f"--wd={os.getcwd()}",
                                  "--", *(args.argv or ["bash"])])
        elif args.cmd == "list":
            for d in sorted(STATE_ROOT.iterdir()) if STATE_ROOT.is_dir() else []:
                kind = "persistent" if (d / "persistent").exists() else "owned"
                print(d.name, kind)
        elif args.cmd == "down":
            down(args.id)
        elif args.cmd == "clean":
            for cid in clean_stale():
                print(f"removed {cid}")
        elif args.cmd == "watch":
            _watch(args.id, args.owner)
    except (ClusterError, OSError) as e:
        print(f"cluster.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
