"""What `hpcembed serve` says of itself on /metrics, read by bench/serve.py between two moments of a measurement:
where a lane's requests spent their time (hpcembed_stage_seconds), how often the frontend's event loop woke late,
and its full garbage collections."""
from __future__ import annotations

import re


async def metrics_page(session, url: str) -> str:
    async with session.get(url.replace("/v1/embeddings", "/metrics")) as resp:
        return await resp.text()


def stage_seconds(page: str) -> dict[tuple[str, str, str], float]:
    """The server's hpcembed_stage_seconds sums and counts from /metrics: (lane, stage, 'sum'|'count') -> value."""
    pattern = r'hpcembed_stage_seconds_(sum|count)\{lane="(\w+)",stage="([\w+]+)"\} (\S+)'
    return {(lane, stage, kind): float(value) for kind, lane, stage, value in re.findall(pattern, page)}


def stalls(before: str, after: str, over_ms: float = 10.0) -> dict:
    """Between two /metrics pages: how often the frontend's event loop woke more than `over_ms` late, and its
    full garbage collections (count, seconds)."""
    def read(page: str) -> dict:
        late = re.findall(r'hpcembed_event_loop_lag_seconds_bucket\{le="([\d.e+-]+|\+Inf)"\} (\S+)', page)
        within = [float(n) for le, n in late if le != "+Inf" and float(le) * 1e3 <= over_ms]
        total = [float(n) for le, n in late if le == "+Inf"]
        gc = {kind: float(v) for kind, v in
              re.findall(r'hpcembed_gc_pause_seconds_(count|sum)\{generation="2"\} (\S+)', page)}
        return {"late": (total[0] - max(within, default=0.0)) if total else 0.0, **gc}
    b, a = read(before), read(after)
    return {f"loop_wakes_over_{over_ms:g}ms": int(a["late"] - b["late"]),
            "full_gc": int(a.get("count", 0) - b.get("count", 0)),
            "full_gc_ms": round((a.get("sum", 0) - b.get("sum", 0)) * 1e3, 2)}


def stage_means(before: dict, after: dict, lane: str) -> dict[str, float]:
    """Each stage's mean milliseconds for `lane` between two readings: where the server says a request's time
    went (the client's latency less their sum is the time before the server read the request, and after)."""
    out = {}
    for (lane_, stage, kind), total in after.items():
        if lane_ == lane and kind == "sum":
            count = after[(lane, stage, "count")] - before.get((lane, stage, "count"), 0)
            if count:
                out[stage] = round((total - before.get((lane, stage, "sum"), 0)) / count * 1e3, 2)
    return out
