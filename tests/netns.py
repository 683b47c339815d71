"""Several "hosts" on one machine: a network namespace and a UTS namespace (its own hostname) per host, joined
by veth pairs to a bridge, so MPI and UCX traffic between them really crosses a (virtual) network.

MPICH reaches them through its ssh launcher with a wrapper in place of ssh: the wrapper maps a host address to
`ip netns exec NS unshare --uts sh -c 'hostname H; CMD'`. Its own hostname matters: MPICH and hpcembed both tell
hosts apart by hostname, and with one name MPICH would use shared memory between the "hosts".

Used by tests/test_ucx.py and bench/transport.py. Everything it creates is named with a per-run prefix and removed
by stop(), which also runs for whatever a failed start() left behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path


def netns_available() -> tuple[bool, str]:
    """(usable, why not): namespaces need root and iproute2."""
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return False, "needs iproute2's `ip` and util-linux's `unshare`"
    probe = f"hpcprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return False, f"`ip netns add` failed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _free_subnet() -> str:
    """A 10.231.N /24 that no interface here has: a bridge a killed run left behind keeps its address, and a
    second bridge on the same subnet leaves MPICH's connections hanging."""
    taken = _ip("-4", "-o", "addr", "show").stdout
    for n in range(7, 250):
        if f" 10.231.{n}." not in taken:
            return f"10.231.{n}"
    raise RuntimeError("no free 10.231.N/24 subnet for the virtual hosts")


class VirtualHosts:
    def __init__(self, count: int, workdir: Path, subnet: str | None = None):
        tag = f"{os.getpid() % 100000}"
        subnet = subnet or _free_subnet()
        self.count, self.workdir, self.subnet = count, Path(workdir), subnet
        self.bridge = f"hpbr{tag}"
        self.namespaces = [f"hpce{tag}h{i}" for i in range(count)]
        self.veths = [f"hpv{tag}h{i}" for i in range(count)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(count)]
        self.hostnames = [f"vhost{i}" for i in range(count)]
        self.bridge_address = f"{subnet}.254"
        self.launcher = self.workdir / "netns-launcher"

    def start(self) -> "VirtualHosts":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for ns, veth, addr in zip(self.namespaces, self.veths, self.addresses):
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.stop()
            raise
        self._write_launcher()
        return self

    def _write_launcher(self) -> None:
        """The ssh stand-in for MPICH's launcher: `netns-launcher [ssh options] HOST COMMAND...`."""
        cases = "\n".join(f'    {addr}) ns={ns}; name={name} ;;' for addr, ns, name in
                          zip(self.addresses, self.namespaces, self.hostnames))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.launcher.write_text(f"""#!/bin/sh
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case "$host" in
{cases}
    *) echo "netns-launcher: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c "hostname $name; $*"
""")
        self.launcher.chmod(self.launcher.stat().st_mode | stat.S_IXUSR)

    def mpiexec_args(self, ranks_per_host: list[int]) -> list[str]:
        """mpiexec options placing ranks_per_host[i] ranks on host i (MPICH hydra)."""
        hosts = ",".join(f"{a}:{n}" for a, n in zip(self.addresses, ranks_per_host) if n)
        return ["-launcher", "ssh", "-launcher-exec", str(self.launcher), "-iface", self.bridge, "-hosts", hosts,
                "-n", str(sum(ranks_per_host))]

    def limit_rate(self, rate: str | None) -> None:
        """A token-bucket rate limit on every host's link (e.g. '1gbit'); None removes it."""
        for ns in self.namespaces:
            _ip("netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            if rate:
                _ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                    "burst", "256kb", "latency", "50ms")

    def stop(self) -> None:
        # A job killed by its timeout leaves MPICH's proxies (and their ranks) running in the namespaces.
        for ns in self.namespaces:
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", ns, check=False)
        for veth in self.veths:
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)
