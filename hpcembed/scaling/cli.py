"""`hpcembed scaling calibrate|measure|simulate|report`: the scaling harness (see hpcembed/scaling/*.py)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import ConfigError


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected node counts like 1,10,100, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"node counts must be 1 or more, got {text!r}")
    return values


def add_parser(sub) -> None:
    scaling = sub.add_parser("scaling", help="measure, simulate and report scaling from 1 to 1000 nodes",
                             description="The scaling harness. A study is a directory: calibration.json, "
                             "measured.json, results.json and report.md with its plots.")
    cmds = scaling.add_subparsers(dest="scaling_command", metavar="STEP", required=True)

    cal = cmds.add_parser("calibrate", help="build the simulation's parameters from bench/results JSON files")
    cal.add_argument("--bench", default="bench/results", help="directory of benchmark JSONs (default: %(default)s)")
    cal.add_argument("--output", required=True, help="calibration JSON to write (e.g. STUDY/calibration.json)")

    m = cmds.add_parser("measure", help="record real runs' throughput at several scales in STUDY/measured.json",
                        description="Run the real job at each scale under mpiexec (arguments after -- go to "
                        "`hpcembed run`; {nodes} in them becomes the scale), or import Slurm sweep manifests or "
                        "an e2e_node benchmark JSON.")
    m.add_argument("--study", required=True, help="study directory")
    m.add_argument("--series", required=True, help="name of this series of runs")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--scales", type=_ints, help="node counts to run, e.g. 1,2,4")
    src.add_argument("--from-manifests", metavar="DIR", help="slurm/scaling-sweep.sh's SWEEP/manifests")
    src.add_argument("--from-e2e-bench", metavar="JSON", help="a bench/e2e_node.py result")
    m.add_argument("--ranks-per-node", type=int, default=3, help="MPI ranks per node for --scales "
                   "(default: %(default)s)")
    m.add_argument("--tokenizers-per-node", type=int, default=0, help="pass --tokenizer-ranks N*K to each run "
                   "(default: the job's own role plan)")
    m.add_argument("--virtual-nodes", action="store_true", help="split one machine's ranks into pretend nodes")
    m.add_argument("--network", default="measured-tcp", help="network profile the simulation replays "
                   "--from-manifests runs with (default: %(default)s)")
    m.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then `hpcembed run` options")

    s = cmds.add_parser("simulate", help="validate against measured runs, then project throughput and efficiency",
                        description="Discrete-event simulation (SimPy) driving the real conductor and routing "
                        "code. Refuses to project if a measured run is not reproduced within ±10%%.")
    s.add_argument("--calibration", required=True, help="calibration JSON (hpcembed scaling calibrate)")
    s.add_argument("--measured", help="measured.json to validate against")
    s.add_argument("--nodes", type=_ints, default=[1, 10, 100, 1000], help="node counts (default: 1,10,100,1000)")
    s.add_argument("--output", required=True, help="directory for results.json")
    s.add_argument("--network", default="measured-tcp", help="network profile from the calibration "
                   "(measured-tcp, infiniband-hdr; default: %(default)s)")
    s.add_argument("--unit-rows", type=int, help="rows per work unit (default: the measured job's)")
    s.add_argument("--units-per-tokenizer", type=float, default=2.0,
                   help="weak scaling's job size: work units per tokenizer rank (default: %(default)s; the steady "
                        "window opens once every encoder rank has work, so 2 measure what 3 do)")
    s.add_argument("--allow-unvalidated", action="store_true", help="project even if validation fails; the "
                   "results and the report are then marked as not validated")
    s.add_argument("--network-ablation-up-to", type=int, default=1000,
                   help="rerun with an ideal network up to this many nodes, for the network's loss")
    s.add_argument("--gpus-per-node", type=int, help="GPUs of a simulated node (default: the measured node's)")
    s.add_argument("--cores-per-node", type=int, help="cores of a simulated node, one rank each (default: the "
                   "measured node's)")
    s.add_argument("--cpu-node-cores", type=int, default=0, help="the disaggregated shape: tokenizer ranks on "
                   "CPU-only nodes of this many cores, as many nodes as the rate plan needs; the GPU nodes hold "
                   "encoder ranks only")
    s.add_argument("--sub-conductors", default="auto", choices=("auto", "per-node", "off"),
                   help="as `hpcembed run --sub-conductors` (default: %(default)s)")
    s.add_argument("--job-rows", type=int, default=0, help="also simulate a job of this many rows at each scale, "
                   "for its whole-job efficiency (e.g. 1000000000)")
    s.add_argument("--job-unit-rows", type=int, help="the --job-rows job's units (default: --unit-rows, cut so that "
                   "every tokenizer rank has a unit of its own at each scale, as `hpcembed run` advises)")
    s.add_argument("--tokenizer-batch-tokens", type=int, help="tokenizer batches of this many tokens (default: "
                   "as the measured job sent them; 0: one batch per chunk, as before 0.3)")
    s.add_argument("--steal-rows", type=int, default=4096, help="tail stealing as `hpcembed run --steal-rows` "
                   "(default 4096, as run's; 0: none, to see what it saves)")
    s.add_argument("--conductor-cost", help="bench/fanin_cost.py's JSON: charge rank 0 and the sub-conductors what "
                   "they spent per message in fan-in rehearsals, not the handler time alone")
    s.add_argument("--control-probe", help="bench/control_probe.py's JSON from the target machine: handler times "
                   "measured here are scaled by its probe over this machine's, so the charges do not depend on "
                   "the machine running the simulation (default: scaled by the calibration's cpu_slowdown)")
    s.add_argument("--encoder-lead-s", type=float, help="seconds the tokenizer ranks start before the encoder ranks "
                   "are ready, reading while those load the model; every job's clock starts with the encoder ranks "
                   "(default: the least lead of the measured runs, 0 without any)")
    s.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="simulations run side by side, one process each (default: this machine's cores, "
                        "%(default)s); each times its control ranks' handlers on its own core")

    r = cmds.add_parser("report", help="write STUDY/report.md with plots, CSV and the validation table")
    r.add_argument("--study", required=True, help="study directory (measured.json, results.json)")
    r.add_argument("--title", default="", help="the report's title")
    r.add_argument("--node-series", default="h100-node", help="measured series whose 1-node run stands beside "
                   "the seed's 1-node row (default: %(default)s)")


def main(args) -> int:
    cmd = args.scaling_command
    if cmd == "calibrate":
        from .calibration import build
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(build(Path(args.bench)), indent=2) + "\n")
        print(f"hpcembed: calibration -> {out}")
        return 0
    if cmd == "measure":
        from . import measure
        study = Path(args.study)
        (study / "runs").mkdir(parents=True, exist_ok=True)
        if args.scales:
            run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
            if not run_args:
                raise ConfigError("hpcembed scaling measure --scales needs `-- hpcembed run options` (--input ...)")
            rows = measure.measure_local(args.series, args.scales, args.ranks_per_node, run_args, study,
                                         args.virtual_nodes, args.tokenizers_per_node)
        elif args.from_manifests:
            rows = measure.from_manifests(args.series, Path(args.from_manifests), args.network)
        else:
            rows = measure.from_e2e_bench(args.series, Path(args.from_e2e_bench))
        path = measure.save(study, rows)
        print(f"hpcembed: {len(rows)} measured row(s) -> {path}")
        return 0
    if cmd == "simulate":
        import dataclasses
        from . import read_json
        from .calibration import node_from
        from .project import run_simulate
        if args.cpu_node_cores and args.cpu_node_cores < 2:
            raise ConfigError(f"--cpu-node-cores {args.cpu_node_cores}: a CPU node needs a core for its sub-conductor "
                              "and at least one for a tokenizer rank")
        if args.job_unit_rows is not None and args.job_unit_rows < 1:
            raise ConfigError(f"--job-unit-rows {args.job_unit_rows}: a unit holds at least one row")
        if args.encoder_lead_s is not None and args.encoder_lead_s < 0:
            raise ConfigError(f"--encoder-lead-s {args.encoder_lead_s}: the tokenizer ranks cannot start after the "
                              "encoder ranks are ready")
        if (args.gpus_per_node is not None and args.gpus_per_node < 1) or \
                (args.cores_per_node is not None and args.cores_per_node < 1):
            raise ConfigError("--gpus-per-node and --cores-per-node must be at least 1")
        node = node_from(read_json(Path(args.calibration), "calibration"))
        node = dataclasses.replace(node, gpus=args.gpus_per_node or node.gpus, cores=args.cores_per_node or node.cores,
                                   cpu_node_cores=args.cpu_node_cores, subconductors=args.sub_conductors)
        result = run_simulate(Path(args.calibration), Path(args.measured) if args.measured else None, args.nodes,
                              Path(args.output), args.network, args.unit_rows, args.units_per_tokenizer,
                              args.network_ablation_up_to, args.allow_unvalidated, node, args.job_rows,
                              args.tokenizer_batch_tokens, args.steal_rows,
                              Path(args.conductor_cost) if args.conductor_cost else None,
                              Path(args.control_probe) if args.control_probe else None, args.jobs,
                              args.encoder_lead_s, args.job_unit_rows)
        print(f"hpcembed: projection -> {Path(args.output) / 'results.json'} ({result['wall_seconds']} s)")
        if result.get("error"):
            print(f"hpcembed: {'warning' if args.allow_unvalidated else 'error'}: {result['error']}")
            return 0 if args.allow_unvalidated else 1
        return 0
    from .report import write_report
    path = write_report(Path(args.study), args.title, args.node_series)
    print(f"hpcembed: report -> {path}")
    return 0
