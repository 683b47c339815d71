"""`hpcembed scaling simulate`: validate the simulation against every measured run, then project 1 -> N nodes.

Efficiency is E(N) = X(N) / (N * X(1)) with X the steady throughput: rows embedded per second in the window
where every tokenizer rank has work (after the first units are handed out, before the first one runs out). A
long backfill runs in that state; `job_texts_per_s` adds the ramp and the tail of a job of the simulated size.

The loss breakdown is where the bottleneck's time goes. On the measured node the tokenizer ranks are the
bottleneck (13 cores cannot feed one H100), so it is their time, split into tokenizing, waiting for a work
unit (scheduling: the conductor's queue and its replies), waiting for credit (queue contention: encoder ranks'
queues full), and idle after their last unit (the tail). The network's share is measured by running the same
job again with an ideal network (no latency, infinite bandwidth): the throughput difference is what the
network costs.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..protocol.tokenizer import READ_AHEAD_BATCHES
from . import read_json
from .calibration import node_from, rates_from
from .probe import PROBE_VERSION, handler_scale, here_probe_seconds
from .sim import JobShape, NodeShape, build_world, simulate, units_for

TOLERANCE = 0.10


def validate(calibration: dict, measured: list[dict], log=print) -> list[dict]:
    """Simulate every measured run with its own shape and job, and compare throughputs."""
    rows = []
    for m in measured:
        sim_in = m.get("sim")
        if not sim_in:
            continue
        rates = rates_from(calibration, sim_in.get("network", "measured-tcp"), **sim_in.get("rates", {}))
        shape = NodeShape(**sim_in["node"])
        job = JobShape(rows=sim_in["rows"], unit_rows=sim_in["unit_rows"], unit_sizes=sim_in.get("unit_sizes"),
                       chunk_rows=sim_in["chunk_rows"], credits=sim_in["credits"],
                       **{k: sim_in[k] for k in ("max_batch_tokens", "window_batches", "instances",
                                                  "tokenizer_batch_tokens", "steal_rows", "read_ahead_batches")
                          if k in sim_in})
        result = simulate(m["nodes"], shape, job, rates, start_offsets=sim_in.get("start_offsets_s"))
        simulated = result.throughput_texts_per_s
        error = simulated / m["throughput_texts_per_s"] - 1
        row = {"series": m["series"], "nodes": m["nodes"], "ranks": m.get("ranks"),
               "measured_texts_per_s": m["throughput_texts_per_s"], "simulated_texts_per_s": round(simulated, 1),
               "error": round(error, 4), "within_tolerance": abs(error) <= TOLERANCE,
               # How the rows spread over the encoder ranks, measured and simulated: where a short run is decided.
               "gpu_rows_measured": sim_in.get("gpu_rows"), "gpu_rows_simulated": result.encoder_rows,
               # The conductor's time per message: the real driver's CPU handling it (handler, replies sent), and
               # what the simulation charges (the handler run live here plus the calibrated receive, scaled).
               "conductor_us_per_message_measured": m.get("conductor", {}).get("handling_us_per_message"),
               "conductor_us_per_message_simulated": round(
                   result.conductor_cpu_us_per_message * handler_scale(rates.control_probe_s, rates.cpu_slowdown)
                   + 1e6 * rates.conductor_message_s * rates.cpu_slowdown, 2),
               "conductor_busy_simulated": round(result.conductor_busy, 4),
               "subconductor_busy_simulated": round(result.subconductor_busy_max, 4)}
        rows.append(row)
        log(f"validate {m['series']} at {m['nodes']} node(s): measured {m['throughput_texts_per_s']:,.0f}, "
            f"simulated {simulated:,.0f} texts/s ({error:+.1%})")
    return rows


def project(calibration: dict, nodes: list[int], network: str = "measured-tcp", units_per_tokenizer: float = 2,
            unit_rows: int | None = None, node: NodeShape | None = None, network_ablation_up_to: int = 1000,
            job_rows: int = 0, tokenizer_batch_tokens: int | None = None, steal_rows: int = 4096,
            workers: int = 1, encoder_lead_s: float = 0.0, job_unit_rows: int | None = None, log=print
            ) -> list[dict]:
    """Weak scaling (each tokenizer rank reads about `units_per_tokenizer` units) for the steady efficiency; with
    `job_rows`, also that job at each scale (strong scaling) for its whole-job efficiency, ramp and tail
    included. `tokenizer_batch_tokens` overrides the measured job's (0: a batch per chunk, as before 0.3);
    `steal_rows`: tail stealing's, as `hpcembed run --steal-rows` (0: none); `workers`: processes that run the
    simulations (simulate_all); `encoder_lead_s`: the tokenizer ranks start this long before the encoder ranks
    are ready (encoder_lead), and every job's clock starts with the encoder ranks. `job_unit_rows`: the
    `job_rows` job's units (None: as a user would size --unit-rows for it, whole_job_unit_rows)."""
    rates = rates_from(calibration, network)
    shape = node or node_from(calibration)
    unit_rows = unit_rows or calibration["job"]["unit_rows"]
    settings = {k: calibration["job"][k] for k in ("max_batch_tokens", "window_batches", "instances",
                                                   "tokenizer_batch_tokens") if k in calibration["job"]}
    if tokenizer_batch_tokens is not None:
        settings["tokenizer_batch_tokens"] = tokenizer_batch_tokens
    job = JobShape(rows_per_node=units_for(1, shape, rates, units_per_tokenizer, unit_rows), unit_rows=unit_rows,
                   chunk_rows=calibration["job"]["chunk_rows"], credits=calibration["job"]["credits"],
                   steal_rows=steal_rows, encoder_lead_s=encoder_lead_s, **settings)
    # Read-ahead is start-up: its backlog would pass for a steady rate in the weak job's window (595k read as 631k).
    whole_job = dataclasses.replace(job, rows_per_node=0, rows=job_rows, read_ahead_batches=READ_AHEAD_BATCHES)
    runs = {}
    for n in nodes:
        runs[n, "weak"] = (n, shape, job, rates, {})
        if job_rows:
            runs[n, "whole"] = (n, shape, _sized(whole_job, job_unit_rows, n, shape, rates), rates, {})
        if n <= network_ablation_up_to:
            runs[n, "ideal network"] = (n, shape, job, rates, {"ideal_network": True})
    results = simulate_all(runs, workers)
    out, base, whole_base = [], None, None
    for n in nodes:
        result, whole, ideal_net = results[n, "weak"], results.get((n, "whole")), results.get((n, "ideal network"))
        if base is None:
            base, whole_base = result, whole
        x1 = base.steady_texts_per_s / base.nodes
        efficiency = result.steady_texts_per_s / (n * x1)
        network_loss = (max(0.0, ideal_net.steady_texts_per_s - result.steady_texts_per_s) / (n * x1)
                        if ideal_net else None)
        row = {
            "nodes": n, "gpus": result.encoder_ranks, "tokenizer_ranks": result.tokenizer_ranks,
            "ranks": (n * shape.gpus + result.cpu_nodes * shape.cpu_node_cores if shape.cpu_node_cores
                      else n * shape.cores), "throughput_texts_per_s": round(result.steady_texts_per_s, 1),
            "tokens_per_s": round(result.steady_texts_per_s * rates.tokens_per_text, 1),
            "efficiency": round(efficiency, 4),
            # Against the first scale simulated (per node): 1.0 at that scale by definition, so a run of one scale
            # says nothing of efficiency.
            "efficiency_base_nodes": base.nodes,
            # The first node gives a core to the conductor, so a bigger job has more tokenizer cores per node
            # and E(N) can pass 100%; per tokenizer core, the same comparison without that.
            "efficiency_per_tokenizer": round(efficiency * base.tokenizer_ranks * n / (base.nodes
                                                                                      * result.tokenizer_ranks), 4),
            "job_texts_per_s": round(result.throughput_texts_per_s, 1),
            "job_efficiency": round(result.throughput_texts_per_s / (n * base.throughput_texts_per_s / base.nodes), 4),
            "source": "projected", "network": network, "unit_rows": unit_rows, "steal_rows": steal_rows,
            "rows": result.rows,
            "units": result.units, "makespan_s": round(result.makespan_s, 3), "tail_s": round(result.tail_s, 3),
            "losses": {
                "network": None if network_loss is None else round(network_loss, 4),
                "scheduling_wait_for_unit": round(result.tokenizer_time["waiting_for_unit"], 4),
                "queue_contention_wait_for_credit": round(result.tokenizer_time["waiting_for_credit"], 4),
                "tail_idle_after_last_unit": round(result.tokenizer_time["idle_after_last_unit"], 4),
            },
            "tokenizer_busy": round(result.tokenizer_time["tokenizing"], 4),
            "conductor_busy": round(result.conductor_busy, 4),
            "conductor_messages": result.conductor_messages,
            "conductor_cpu_us_per_message_here": round(result.conductor_cpu_us_per_message, 2),
            "conductor_us_by_message_here": result.conductor_us_by_message,   # type: [messages, µs each, longest]
            "conductor_queue_max": result.conductor_queue_max,
            "gpu_busy": round(result.gpu_busy, 4), "remote_batch_fraction": round(result.remote_batch_fraction, 4),
            "nic_busy_max": round(result.nic_busy_max, 5), "sim_wall_seconds": round(result.wall_seconds, 2),
            "gpus_per_node": shape.gpus, "cores_per_node": shape.cores if not shape.cpu_node_cores else shape.gpus,
            "cpu_nodes": result.cpu_nodes, "cpu_node_cores": shape.cpu_node_cores,
            "subconductors": result.subconductors, "subconductor_busy_max": round(result.subconductor_busy_max, 4),
            "ramp_s": round(result.ramp_s, 3), "encoder_lead_s": encoder_lead_s,
            # Time lost to the ramp and the tail against steady state; it hardly grows with the job, so a job of
            # R rows takes about R / steady + this, and whole-job efficiency reaches 95% from the size below.
            "lost_s": round(max(0.0, result.makespan_s - result.rows / result.steady_texts_per_s), 3),
        }
        row["rows_for_95_percent_whole_job"] = _rows_for(0.95, n * x1, result.steady_texts_per_s, row["lost_s"])
        if whole is not None:
            row.update({"whole_job_rows": whole.rows, "whole_job_unit_rows": runs[n, "whole"][2].unit_rows,
                        "whole_job_units": whole.units,
                        # against the first scale's steady rate in the same long job: a short weak-scaling window
                        # measures a node's steady rate a few percent low
                        "whole_job_efficiency": round(whole.throughput_texts_per_s * whole_base.nodes
                                                      / (n * whole_base.steady_texts_per_s), 4),
                        "whole_job_makespan_s": round(whole.makespan_s, 3), "whole_job_tail_s": round(whole.tail_s, 3),
                        "whole_job_conductor_busy": round(whole.conductor_busy, 4),
                        "whole_job_conductor_us_by_message_here": whole.conductor_us_by_message,
                        "whole_job_subconductor_busy_max": round(whole.subconductor_busy_max, 4),
                        "whole_job_sim_wall_seconds": round(whole.wall_seconds, 2)})
        out.append(row)
        log(f"project {n} node(s): {row['throughput_texts_per_s']:,.0f} texts/s, efficiency {efficiency:.1%}, "
            f"conductor busy {result.conductor_busy:.1%}, sim {result.wall_seconds:.1f} s"
            + (f"; {whole.rows:,} rows: whole job {row['whole_job_efficiency']:.1%}, tail {whole.tail_s:.1f} s, "
               f"conductor busy {whole.conductor_busy:.1%}, sim {whole.wall_seconds:.1f} s" if whole else ""))
    return out


def whole_job_unit_rows(job_rows: int, tokenizer_ranks: int, unit_rows: int) -> int:
    """The units a job of `job_rows` rows is run with at a scale of `tokenizer_ranks`: --unit-rows, cut so that
    every tokenizer rank gets a unit of its own (as `hpcembed run` advises, launch/planning.py). With fewer units
    than ranks, most ranks start by waiting for tail stealing to split a unit, and the pieces (10,000 and 6,667
    rows of a 20,000-row unit) leave the encoder ranks a third apart in rows (bench/notes/scale_out.md)."""
    return max(1, min(unit_rows, -(-job_rows // max(tokenizer_ranks, 1))))


def _sized(job: JobShape, unit_rows: int | None, nodes: int, shape: NodeShape, rates) -> JobShape:
    """The whole job with `unit_rows` (None: whole_job_unit_rows at this scale)."""
    tokenizers = len(build_world(nodes, shape, rates)[0].tokenizers) if not unit_rows else 0
    return dataclasses.replace(job, unit_rows=unit_rows or whole_job_unit_rows(job.rows, tokenizers, job.unit_rows))


def simulate_all(runs: dict, workers: int = 1) -> dict:
    """{key: SimResult} of independent simulations, {key: (nodes, shape, job, rates, keyword arguments)}, on
    `workers` processes, the longest first: the most rows, and of as many rows, the most nodes. Each process times
    its control ranks' handlers by its own thread's CPU time, but a simulation beside another is still charged
    more: the billion-row job at 1000 nodes (disaggregated), beside the weak-scaling job, measured rank 0's
    RequestUnits at 89 µs where alone it measured 45-49 (bench/notes/scale_out.md, session 24), so a projection's
    charges err high. Until session 24 that job ran alone first, which kept the 8-GPU shape's figure steady
    (103.4-103.6% in four runs alone, 97.2% beside) but not the disaggregated one's (74.9-97.3% alone), and took
    the disaggregated projection past ten minutes (695 s); beside the others, its figure is the pessimistic one."""
    def cost(key):
        nodes, _, job, _, _ = runs[key]
        return job.rows or job.rows_per_node * nodes, nodes
    order = sorted(runs, key=cost, reverse=True)
    if workers <= 1 or len(order) <= 1:
        return {key: simulate(*runs[key][:4], **runs[key][4]) for key in order}
    with ProcessPoolExecutor(min(workers, len(order)), mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {key: pool.submit(simulate, *runs[key][:4], **runs[key][4]) for key in order}
        return {key: future.result() for key, future in futures.items()}


def _handler_scale(calibration: dict) -> dict:
    """How this machine's handler times were scaled to the target core, for results.json."""
    rates = calibration["rates"]
    target, slowdown = rates.get("control_probe_s", {}).get("value", 0.0), rates["cpu_slowdown"]["value"]
    if not target:
        return {"by": "cpu_slowdown (right only on the calibration's machine)", "value": slowdown}
    here = here_probe_seconds()
    return {"by": "control probe", "value": round(handler_scale(target, slowdown, here), 4),
            "target_probe_s": target, "here_probe_s": round(here, 6)}


def encoder_lead(measured: list[dict]) -> tuple[float, str]:
    """The least time by which the tokenizer ranks of a measured run started before its first encoder rank was
    ready (they get units and read while the encoder ranks load the model), and where it comes from; 0 without
    a measured run that recorded its start-up."""
    leads = []
    for m in measured:
        offsets = m.get("sim", {}).get("start_offsets_s") or {}
        encoders, tokenizers = offsets.get("encoder") or offsets.get("gpu"), offsets.get("tokenizer")
        if encoders and tokenizers:
            leads.append((max(0.0, min(encoders) - max(tokenizers)), f"{m['series']} at {m['nodes']} node(s)"))
    if not leads:
        return 0.0, "no measured run recorded its start-up: every rank starts at 0"
    lead, run = min(leads)
    return round(lead, 3), (f"the least of {len(leads)} measured runs' ({run}): from the last tokenizer rank "
                            "starting to the first encoder rank being ready")


def _rows_for(target: float, ideal: float, steady: float, lost: float) -> int | None:
    """The job size R at which R / (R / steady + lost) reaches `target` x `ideal` (None: steady state is below)."""
    if steady <= target * ideal:
        return None
    return int(target * ideal * lost / (1 - target * ideal / steady))


def conductor_factors(fits: dict, source: Path) -> dict:
    """Calibration rates from fan-in fits: rank 0 alone (and a sub-conductor, whose messages are of that kind) from
    the run without sub-conductors, rank 0 taking batches from the run with them."""
    by_plane = {f["sub_conductors"]: f["measured_over_simulated"] for f in fits["fits"]}
    if set(by_plane) != {"off", "per-node"}:
        raise ValueError(f"{source}: needs fits of fan-in runs with --sub-conductors off and per-node, has "
                         f"{sorted(by_plane)}")
    how = f"measured over simulated µs per message at rank 0 in fan-in rehearsals ({source})"
    rates = {"conductor_factor": {"value": by_plane["off"], "source": how},
             "batched_conductor_factor": {"value": by_plane["per-node"], "source": how}}
    batched = next(f for f in fits["fits"] if f["sub_conductors"] == "per-node")
    if "batch_slope" in batched:        # how the cost grows with a batch was measured (bench/commit_batch_cost.py)
        how = (f"{source}: the slope of rank 0's cost over the charge by batch size, and the fan-in's measured cost "
               "per message beyond it")
        rates["batched_conductor_factor"] = {"value": batched["batch_slope"], "source": how}
        rates["batched_conductor_extra_s"] = {"value": 1e-6 * batched["per_message_extra_us"], "unit": "s",
                                              "source": how}
    return rates


def control_probe(probe: dict, source: Path) -> dict:
    """The calibration rate from bench/control_probe.py's JSON: the target core's probe time, other cores busy."""
    if probe.get("probe_version") != PROBE_VERSION:
        raise ValueError(f"{source}: probe version {probe.get('probe_version')}, this simulation's is {PROBE_VERSION}")
    return {"control_probe_s": {
        "value": probe["busy_s"], "unit": "s", "source": str(source),
        "how": f"scaling/probe.py's workload on {probe['cpu']} ({probe['device']}), {probe['busy_processes']} other "
               "cores busy; handler times measured where the simulation runs are scaled by it over the probe there"}}


def run_simulate(calibration_path: Path, measured_path: Path | None, nodes: list[int], output: Path,
                 network: str = "measured-tcp", unit_rows: int | None = None, units_per_tokenizer: float = 2,
                 network_ablation_up_to: int = 1000, allow_unvalidated: bool = False, node: NodeShape | None = None,
                 job_rows: int = 0, tokenizer_batch_tokens: int | None = None, steal_rows: int = 4096,
                 conductor_cost: Path | None = None, probe: Path | None = None, workers: int = 1,
                 encoder_lead_s: float | None = None, job_unit_rows: int | None = None, log=print) -> dict:
    """`conductor_cost`: bench/fanin_cost.py's fits; the control ranks are charged what they measured there.
    `probe`: bench/control_probe.py's JSON of the target machine (the charges then do not depend on this one).
    `workers`: processes for the projection's simulations. `encoder_lead_s`: see project (None: the measured
    runs' least, encoder_lead)."""
    start = time.perf_counter()
    calibration = read_json(calibration_path, "calibration")
    if conductor_cost is not None:
        calibration["rates"].update(conductor_factors(read_json(conductor_cost, "fan-in cost fits"), conductor_cost))
    if probe is not None:
        calibration["rates"].update(control_probe(read_json(probe, "control probe"), probe))
    measured = read_json(measured_path, "measurements")["rows"] if measured_path else []
    validation = validate(calibration, measured, log)
    lead, lead_source = encoder_lead(measured) if encoder_lead_s is None else (encoder_lead_s, "given")
    failed = [v for v in validation if not v["within_tolerance"]]
    result = {"kind": "hpcembed scaling projection", "calibration": str(calibration_path),
              "conductor_factors": {k: calibration["rates"].get(k, {}).get("value", 1.0)
                                    for k in ("conductor_factor", "batched_conductor_factor",
                                              "batched_conductor_extra_s")},
              "handler_scale": _handler_scale(calibration),
              "encoder_lead_s": {"value": lead, "source": lead_source},
              "validation": validation, "validated": bool(validation) and not failed,
              "tolerance": TOLERANCE, "rows": []}
    output.mkdir(parents=True, exist_ok=True)
    if failed:
        result["error"] = (f"{len(failed)} measured run(s) not reproduced within ±{TOLERANCE:.0%}: "
                           + "; ".join(f"{v['series']} {v['nodes']} node(s) {v['error']:+.1%}" for v in failed))
    # No projection from a model that does not reproduce what was measured, unless asked for one explicitly;
    # then results.json and the report say "validated": false beside every projected row.
    if not failed or allow_unvalidated:
        result["rows"] = project(calibration, nodes, network, units_per_tokenizer, unit_rows, node,
                                 network_ablation_up_to, job_rows, tokenizer_batch_tokens, steal_rows, workers,
                                 lead, job_unit_rows, log=log)
        for row in result["rows"]:
            row["validated"] = result["validated"]
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    (output / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result

