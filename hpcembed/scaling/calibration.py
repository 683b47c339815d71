"""The simulation's parameters, built from the committed benchmark results (bench/results/*.json), each with the
file and field it came from. `hpcembed scaling calibrate` writes them to a JSON file that is committed with a
study, so a projection can always be traced to the measurements behind it.

Only the InfiniBand network profile is not a measurement made here: it is the HDR specification, offered as an
alternative to the default, which is the network measured between two network namespaces on the CPU box.
"""
from __future__ import annotations

import datetime
from pathlib import Path

from . import read_json
from .model import NodeShape, Rates

GPU_NAME = "NVIDIA H100 80GB HBM3"
FILES = {
    "tokenize_gpu_box": "tokenize-h100-box.json",
    "tokenize_cpu_box": "tokenize-cpu.json",
    "e2e_node": "e2e_node-NVIDIA_H100_80GB_HBM3.json",
    "mpi_overhead": "mpi_overhead-cpu.json",
    "transport": "transport-cpu.json",
}

# Per NIC direction and one-way latency of a small MPI message. HDR InfiniBand is 200 Gb/s per port; the latency
# is a typical MPI figure for it. Not measured here: a sensitivity case beside the measured default.
INFINIBAND_HDR = {"nic_bytes_per_s": 25e9, "net_latency_s": 2e-6}


def _value(value: float, unit: str, source: str, how: str) -> dict:
    return {"value": value, "unit": unit, "source": source, "how": how}


def build(bench_dir: Path) -> dict:
    bench_dir = Path(bench_dir)
    data = {k: read_json(bench_dir / f, "benchmark result") for k, f in FILES.items()}
    src = {k: f"bench/results/{f}" for k, f in FILES.items()}
    tok = data["tokenize_gpu_box"]["results"]["budtiktok"]["all_cores"]
    e2e = data["e2e_node"]["runs"]["budtiktok"]
    batch = next(b for b in data["mpi_overhead"]["batch_latency"] if b["rows"] == 1024)
    conductor = next(c for c in data["mpi_overhead"]["conductor"] if c["requesters"] == 1)
    runs = {(r["placement"], r["rate"], r["transport"]): r["cases"] for r in data["transport"]["runs"]}
    loop, net = runs[("loopback", None, "mpi")], runs[("2 namespaces", None, "mpi")]
    cpu_here = data["tokenize_cpu_box"]["results"]["budtiktok"]["one_core"]["tokens_per_s"]
    cpu_there = data["tokenize_gpu_box"]["results"]["budtiktok"]["one_core"]["tokens_per_s"]
    rates = {
        "tokenizer_tokens_per_s": _value(
            tok["tokens_per_s"] / tok["processes"], "tokens/s per tokenizer rank", src["tokenize_gpu_box"],
            f"results.budtiktok.all_cores: {tok['tokens_per_s']:,.0f} tokens/s over {tok['processes']} processes "
            "(every core of the H100 box busy, as in a job)"),
        "gpu_tokens_per_s": _value(
            e2e["tokens_per_s"] / e2e["gpu_busy"], "tokens/s per encoder rank while busy", src["e2e_node"],
            f"runs.budtiktok: tokens_per_s {e2e['tokens_per_s']:,.0f} / gpu_busy {e2e['gpu_busy']} (the encoder rank's "
            "rate inside the job, its role loop included; bench/gpu_stage.py alone gives 12.3-12.7M)"),
        "tokens_per_text": _value(
            e2e["tokens"] / data["e2e_node"]["docs"], "tokens", src["e2e_node"],
            f"runs.budtiktok.tokens / docs ({data['e2e_node']['docs']:,} documents of the benchmark corpus)"),
        "bytes_per_token": _value(
            batch["bytes_per_token"], "bytes", src["mpi_overhead"],
            "batch_latency[rows=1024].bytes_per_token: a packed token batch, int32 ids and offsets"),
        "local_latency_s": _value(
            loop["latency"]["one_way_us"] * 1e-6, "s", src["transport"],
            "runs[loopback, mpi].cases.latency.one_way_us: a 16-row batch one way through MPI shared memory"),
        "local_bytes_per_s": _value(
            loop["bw1024"]["bytes_per_s"], "bytes/s", src["transport"],
            "runs[loopback, mpi].cases.bw1024.bytes_per_s: 1024-row batches, 4 credits in flight"),
        "net_latency_s": _value(
            net["latency"]["one_way_us"] * 1e-6, "s", src["transport"],
            "runs[2 namespaces, mpi].cases.latency.one_way_us: TCP over a veth pair between network namespaces"),
        "nic_bytes_per_s": _value(
            net["bw1024"]["bytes_per_s"], "bytes/s", src["transport"],
            "runs[2 namespaces, mpi].cases.bw1024.bytes_per_s: TCP over a veth pair, 1024-row batches"),
        "conductor_message_s": _value(
            1.0 / conductor["messages_per_s"], "s per message (this machine)", src["mpi_overhead"],
            f"conductor[requesters=1]: 1 / {conductor['messages_per_s']:,.0f} messages/s through MPI to rank 0 "
            "(receive, unpickle, dispatch, reply); the handler's own time is measured live in the simulation"),
        "cpu_slowdown": _value(
            cpu_here / cpu_there, "x", f"{src['tokenize_cpu_box']} / {src['tokenize_gpu_box']}",
            f"results.budtiktok.one_core tokens/s: {cpu_here:,.0f} on this CPU box / {cpu_there:,.0f} on an H100-box "
            "core; conductor time measured here is multiplied by this"),
    }
    return {
        "kind": "hpcembed scaling calibration",
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rates": rates,
        # Encoder ranks: "gpu" in results from before 0.2.
        "node": {"cores": e2e["ranks"], "gpus": e2e["roles"].get("encoder", e2e["roles"].get("gpu")),
                 "gpu_name": GPU_NAME, "source": src["e2e_node"],
                 "how": "the H100 box the single-node run used: 16 cores, 1 GPU; the rate plan chose its roles"},
        "job": {"unit_rows": data["e2e_node"]["unit_rows"], "chunk_rows": 1024, "credits": 4,
                "max_batch_tokens": 262144, "window_batches": 8, "instances": 2,
                "tokenizer_batch_tokens": 262144,      # projections: tokenizers cut batches to the budget (0.3)
                "source": src["e2e_node"]},
        "measured_node": {"texts_per_s": e2e["texts_per_s"], "tokens_per_s": e2e["tokens_per_s"],
                          "startup_seconds": e2e["startup_seconds"], "docs": data["e2e_node"]["docs"],
                          "tokenizers": e2e["roles"]["tokenizer"], "gpu_busy": e2e["gpu_busy"],
                          "source": src["e2e_node"]},
        "networks": {"measured-tcp": {"nic_bytes_per_s": rates["nic_bytes_per_s"]["value"],
                                      "net_latency_s": rates["net_latency_s"]["value"],
                                      "source": src["transport"]},
                     # Virtual nodes of one machine: their "network" is shared memory.
                     "same-machine": {"nic_bytes_per_s": rates["local_bytes_per_s"]["value"],
                                      "net_latency_s": rates["local_latency_s"]["value"], "source": src["transport"]},
                     "infiniband-hdr": {**INFINIBAND_HDR,
                                        "source": "HDR InfiniBand specification (200 Gb/s); not measured here"}},
    }


def rates_from(calibration: dict, network: str = "measured-tcp", **override: float) -> Rates:
    values = {k: v["value"] for k, v in calibration["rates"].items()}
    net = calibration["networks"][network]
    values.update(nic_bytes_per_s=net["nic_bytes_per_s"], net_latency_s=net["net_latency_s"])
    values.update(override)
    return Rates(**values)


def node_from(calibration: dict) -> NodeShape:
    node = calibration["node"]
    return NodeShape(cores=node["cores"], gpus=node["gpus"], gpu_name=node["gpu_name"])
