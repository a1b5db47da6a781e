"""CPU time of the serving processes on this machine during a benchmark level, by role.

Read from /proc (Linux): Ray names its worker processes `ray::<actor class>...`, so the Serve proxy,
the Router replicas and the engine replicas can be told apart (and a replica's engine process,
`python -m replicas.engine_process`). A role whose busiest process used
about one core for the whole level (`max_util` near 1.0) is saturated: a single Python thread's
event loop, or the GIL, is the limit there.
"""
from __future__ import annotations

import os
import time

ROLES = (("ServeReplica:", ":Router", "router"), ("ServeReplica:", ":Replica", "replica"),
         ("ProxyActor", "", "proxy"), ("ServeController", "", "controller"))


def _role(cmdline: str) -> str | None:
    if "replicas.engine_process" in cmdline:
        return "engine"  # a GPU replica's engine, in a child process of the replica
    if "ray::" not in cmdline:
        return None
    name = cmdline.split("ray::", 1)[1].split()[0] if cmdline.split("ray::", 1)[1].split() else ""
    for head, tail, role in ROLES:
        if name.startswith(head) and name.endswith(tail):
            return role
    return "other-ray"


def snapshot(root: int | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) of the Ray worker processes below `root` (a server this
    script started: its Ray cluster's processes descend from it), or of the whole machine; plus
    this process."""
    tick = os.sysconf("SC_CLK_TCK")
    found, parent = {}, {}
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)] = int(fields[1])
        role = "client" if int(pid) == os.getpid() else _role(cmd)
        if role is not None:
            found[int(pid)] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return {pid: v for pid, v in found.items() if v[0] == "client" or root is None or _below(pid, root, parent)}


def _below(pid: int, root: int, parent: dict[int, int]) -> bool:
    for _ in range(64):
        if pid == root:
            return True
        pid = parent.get(pid, 0)
        if pid <= 1:
            return False
    return False


class ProcessCPU:
    """with ProcessCPU(root) as cpu: ...; cpu.report(output_tokens)"""

    def __init__(self, root: int | None = None) -> None:
        self.root = root

    def __enter__(self) -> "ProcessCPU":
        self.start, self.t0 = snapshot(self.root), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.end, self.wall = snapshot(self.root), time.perf_counter() - self.t0

    def report(self, output_tokens: int) -> dict:
        roles: dict[str, dict] = {}
        for pid, (role, cpu) in self.end.items():
            used = cpu - self.start.get(pid, (role, 0.0))[1]
            r = roles.setdefault(role, {"processes": 0, "cpu_s": 0.0, "max_util": 0.0})
            r["processes"] += 1
            r["cpu_s"] += used
            r["max_util"] = max(r["max_util"], used / self.wall if self.wall else 0.0)
        for r in roles.values():
            r["us_per_output_token"] = r["cpu_s"] / output_tokens * 1e6 if output_tokens else None
        return roles
