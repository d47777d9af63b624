"""A real Redis Cluster for the tests: N primaries (and replicas) of redis-server on loopback.

Every node gets its own free client port and cluster-bus port (``cluster-port``), its own
directory and ``nodes.conf``; ``redis-cli --cluster create`` assigns the slots, and
``start`` returns once every node reports ``cluster_state:ok`` and every replica is in
sync (bounded polls, never sleeps for luck).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from testbed.servers import free_port


class ClusterUnsupported(RuntimeError):
    """This redis-server was built without cluster support."""


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> float:
    """Poll ``check`` until true; returns the seconds it took, raises TimeoutError naming it."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} (after {timeout:.0f} s)")
        time.sleep(0.05)  # polling a condition with a deadline
    return time.monotonic() - start


@dataclass
class Node:
    port: int
    bus_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def info(self, section: str) -> dict[str, object]:
        with self.client() as c:
            return dict(c.info(section))

    def cluster_info(self) -> dict[str, str]:
        """CLUSTER INFO as text fields (cluster_state, cluster_slots_ok, ...)."""
        with self.client() as c:
            raw = c.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)


class Cluster:
    """``primaries`` primaries with ``replicas`` replicas each; ``url`` is a redis+cluster URL."""

    def __init__(self, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 1000
                 ) -> None:
        exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if exe is None or cli is None:
            raise RuntimeError("redis-server/redis-cli are not installed; run scripts/setup.sh")
        self.exe, self.cli = exe, cli
        self.primaries, self.replicas = primaries, replicas
        self.node_timeout_ms = node_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="prepaid-cluster-"))
        self.nodes: list[Node] = []
        ports: set[int] = set()
        while len(self.nodes) < primaries * (1 + replicas):
            port, bus = free_port(), free_port()
            if port in ports or bus in ports or port == bus:
                continue
            ports |= {port, bus}
            node_dir = self.dir / str(port)
            node_dir.mkdir()
            self.nodes.append(Node(port, bus, node_dir))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}"
                                             for n in self.nodes[:self.primaries])

    # -- life cycle -----------------------------------------------------------------
    def start_node(self, node: Node) -> None:
        node.proc = subprocess.Popen(
            [self.exe, "--port", str(node.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-port", str(node.bus_port),
             "--cluster-config-file", str(node.dir / "nodes.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--save", "", "--appendonly", "no", "--dir", str(node.dir),
             "--logfile", str(node.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            assert node.proc is not None
            if node.proc.poll() is not None:
                log = (node.dir / "redis.log").read_text(errors="replace")
                if "cluster" in log.lower() and "support" in log.lower():
                    raise ClusterUnsupported(log.strip().splitlines()[-1])
                raise RuntimeError(f"redis-server on port {node.port} exited: {log[-500:]}")
            try:
                with node.client(0.2) as c:
                    return bool(c.ping())
            except redis.ConnectionError:
                return False

        wait_for(up, f"cluster node on port {node.port} did not start", 10)
        if node.info("cluster").get("cluster_enabled") != 1:
            raise ClusterUnsupported("redis-server runs without cluster support")

    def start(self) -> None:
        try:
            for node in self.nodes:
                self.start_node(node)
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            done = subprocess.run(
                [self.cli, "--cluster", "create", *addrs, "--cluster-replicas",
                 str(self.replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-800:]}"
                                   f"{done.stderr[-800:]}")
            self.wait_healthy()
        except BaseException:
            self.cleanup()
            raise

    def wait_healthy(self, timeout: float = 30.0) -> float:
        """Every running node says cluster_state:ok and every replica's link is up."""
        def healthy() -> bool:
            for node in self.running():
                try:
                    info = node.cluster_info()
                    if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                        return False
                    repl = node.info("replication")
                    if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                        return False
                except redis.RedisError:
                    return False
            return True

        return wait_for(healthy, "cluster never became healthy", timeout)

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None]

    def primary_nodes(self) -> list[Node]:
        out = []
        for node in self.running():
            try:
                if node.info("replication").get("role") == "master":
                    out.append(node)
            except redis.RedisError:
                continue
        return out

    def node_for_key(self, key: str) -> Node:
        """The running primary that owns ``key``'s slot now."""
        with self.running()[0].client() as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            shards = c.execute_command("CLUSTER", "SLOTS")
        for start, end, primary, *_ in shards:
            if int(start) <= slot <= int(end):
                port = int(primary[1])
                return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def kill(self, node: Node) -> None:
        """kill -9: no shutdown, no last save."""
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait(10)
            node.proc = None

    def flush(self) -> None:
        """Empty every primary (replicas follow) and its script cache."""
        for node in self.primary_nodes():
            with node.client() as c:
                c.flushall()
                c.script_flush()

    def cleanup(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(10)
                node.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
