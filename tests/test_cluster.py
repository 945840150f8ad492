"""The test cluster itself (tests/cluster.py): hosts, ssh, shared files, firewall, limits, teardown."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cluster
from conftest import ROOT


def leftovers(cid, inodes=()):
    """Everything named after cluster `cid` that still exists on the machine, and any process left in
    its network namespaces (given by inode: a namespace outlives its name while a process holds it)."""
    found = [n for n in os.listdir(cluster.NETNS_DIR) if cid in n] if cluster.NETNS_DIR.is_dir() else []
    found += [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
              .splitlines() if f"abc{cid}" in line]
    found += [r for r in subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True)
              .stdout.splitlines() if f"abc{cid}" in r]
    found += [str(p) for p in (cluster.ETC_NETNS.glob(f"*{cid}*") if cluster.ETC_NETNS.is_dir() else [])]
    found += [str(cluster.STATE_ROOT / cid)] if (cluster.STATE_ROOT / cid).exists() else []
    table = cluster.pids_by_netns()
    found += [f"process {pid}" for i in inodes for pid in table.get(i, [])]
    return found


def test_hosts_have_names_addresses_ssh_and_share_the_file_system(make_cluster, tmp_path):
    c = make_cluster(n_hosts=3, second_net=True, bandwidth={1: "50mbit"})
    assert c.hosts == ["node1", "node2", "node3"]
    for h in c.hosts:
        assert c.run(h, "hostname").stdout.strip() == h
        proc = c.run("node1", ["ssh", h, f"hostname; ip -4 -o addr show; echo {h} > {tmp_path}/{h}"], timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"{h}\n"), proc.stdout
        assert c.address(h, 0) in proc.stdout and c.address(h, 1) in proc.stdout
        assert (tmp_path / h).read_text() == f"{h}\n"  # written on the host, read here: one file system
    assert c.run("node3", ["ssh", "node1-net1", "hostname"], timeout=30).stdout.strip() == "node1"
    mine = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    assert c.address("node1", 0) not in mine and c.address("node1", 1) not in mine  # only inside
    qdisc = c.run("node2", "tc qdisc show dev eth1; tc qdisc show dev eth0").stdout
    assert "tbf" in qdisc and "rate 50Mbit" in qdisc and qdisc.count("tbf") == 1, qdisc
    assert subprocess.run(["tc", "qdisc", "show", "dev", c.cable("node2", 1)], capture_output=True,
                          text=True).stdout.count("rate 50Mbit") == 1
    assert os.readlink("/proc/self/ns/net") != c.run("node1", "readlink /proc/self/ns/net").stdout.strip()


def test_kill_host_and_link_down(make_cluster):
    c = make_cluster(n_hosts=2)
    job = c.popen("node2", ["sleep", "600"])
    end = time.monotonic() + 30
    while job.pid not in c.processes("node2") and time.monotonic() < end:
        time.sleep(0.05)  # nsenter has entered node2 and become the sleep
    assert job.pid in c.processes("node2") and job.pid not in c.processes("node1")
    c.link_down("node2")
    assert c.run("node1", ["ssh", "-o", "ConnectTimeout=2", "node2", "true"], timeout=30).returncode != 0
    c.link_up("node2")
    c._wait_ssh("node2")
    c.kill_host("node2")
    assert job.wait(10) == -9 and c.processes("node2") == []
    assert c.run("node1", ["ssh", "-o", "ConnectTimeout=2", "node2", "true"], timeout=30).returncode != 0


def test_bridged_traffic_survives_a_forward_drop(make_cluster):
    """What dockerd does (FORWARD policy DROP with br_netfilter), for this cluster's bridge only: a DROP
    rule after the cluster's ACCEPT, and netfilter switched on for this bridge."""
    c = make_cluster(n_hosts=2)
    if not Path("/proc/sys/net/bridge").exists():
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    assert Path("/proc/sys/net/bridge").exists(), "br_netfilter is not available (modprobe br_netfilter)"
    br = c.bridge(0)
    subprocess.run(["ip", "link", "set", br, "type", "bridge", "nf_call_iptables", "1"], check=True)
    subprocess.run(["iptables", "-w", "-A", "FORWARD", "-i", br, "-o", br, "-j", "DROP"], check=True)
    ssh = ["ssh", "-o", "ConnectTimeout=3", "node2", "hostname"]
    assert c.run("node1", ssh, timeout=30).stdout.strip() == "node2"
    accept = ["FORWARD", "-i", br, "-o", br, "-j", "ACCEPT"]
    subprocess.run(["iptables", "-w", "-D", *accept], check=True)
    try:
        assert c.run("node1", ssh, timeout=30).returncode != 0  # without the cluster's rule: cut off
    finally:
        subprocess.run(["iptables", "-w", "-I", *accept], check=True)


def test_teardown_after_the_owner_is_killed_leaves_nothing(tmp_path):
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import cluster; "
            "c = cluster.Cluster(2, second_net=True, slurm=True).up(); "
            "print(c.id, *[cluster._netns_inode(c.netns(h)) for h in c.hosts], flush=True); "
            "os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr
    cid, *inodes = proc.stdout.split()
    inodes = [int(i) for i in inodes]
    assert len(cid) == 6 and len(inodes) == 2, proc.stdout
    end = time.monotonic() + 30
    while leftovers(cid, inodes) and time.monotonic() < end:
        time.sleep(0.2)
    assert leftovers(cid, inodes) == []


def test_without_root_it_says_why_in_one_line():
    # The script goes in on stdin: a checkout under `mktemp -d` (mode 0700) is unreadable to user 65534.
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-", "up"],
                          input=(ROOT / "tests/cluster.py").read_text(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == "cluster.py: the test cluster needs root (network namespaces, bridges, sshd); run the " \
                          "tests as root\n"
