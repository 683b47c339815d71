"""The scaling harness: the simulation (real conductor and routing in virtual time), its calibration, the
validation gate, real measured runs over virtual nodes under mpiexec, and the report."""
from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import pytest

from .conftest import REPO, needs_mpi, run_cli, write_jsonl

simpy = pytest.importorskip("simpy")

from hpcembed.scaling.calibration import build, node_from, rates_from  # noqa: E402
from hpcembed.scaling.project import encoder_lead, run_simulate  # noqa: E402
from hpcembed.scaling.sim import JobShape, NodeShape, Simulation, simulate, units_for  # noqa: E402

BENCH = REPO / "bench" / "results"


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "calibration.json"
    path.write_text(json.dumps(build(BENCH)))
    return path


def test_calibration_names_a_source_for_every_value(calibration):
    cal = json.loads(calibration.read_text())
    for name, entry in cal["rates"].items():
        assert entry["value"] > 0, name
        for source in entry["source"].split(" / "):
            assert (REPO / source).exists(), (name, source)
    # One tokenizer core of the H100 box, all 16 busy: 12.62M tokens/s over 16 processes.
    assert 0.7e6 < cal["rates"]["tokenizer_tokens_per_s"]["value"] < 0.9e6


def test_simulation_commits_every_unit_through_the_real_conductor(calibration):
    cal = json.loads(calibration.read_text())
    rates, shape = rates_from(cal), node_from(cal)
    sim = Simulation(3, shape, JobShape(rows=1_640_000, unit_rows=20_000), rates)
    collector = gc.get_threshold()
    result = sim.run()
    # The cycle collector is tuned for the run's large heap, then given back as it was.
    assert gc.get_threshold() == collector and gc.get_freeze_count() == 0
    # The real Conductor committed every unit in its real ledger, with the rows the gpu ranks reported.
    assert len(sim.conductor.done) == result.units == 82
    assert sim.conductor.rows_written == 1_640_000
    # Routing is the real TokenizerCore's over RoleMap's sparse links: 3 nodes x (1 encoder, 13-14 tokenizers).
    assert result.encoder_ranks == 3 and result.tokenizer_ranks == 13 + 14 + 14
    # No faster than the tokenizer cores allow, and not far below it (they are the bottleneck here).
    ceiling = result.tokenizer_ranks * rates.tokenizer_tokens_per_s / rates.tokens_per_text
    assert 0.5 * ceiling < result.throughput_texts_per_s <= ceiling * 1.001
    assert result.conductor_messages > 2 * result.units


def test_a_slow_network_costs_throughput_and_an_ideal_one_does_not():
    cal = build(BENCH)
    shape = NodeShape(cores=6, gpus=1, tokenizers=4)
    job = JobShape(rows=200_000, unit_rows=5_000)
    # Tokenizers 3x faster than the local gpu rank: its credits run out and batches go to other nodes (while
    # a gpu rank keeps up, its credit comes back before the next batch and routing stays on the node).
    # 1 MB/s NICs: those batches queue at the NICs, and their senders wait in the rendezvous.
    slow = simulate(4, shape, job, rates_from(cal, nic_bytes_per_s=1e6, tokenizer_tokens_per_s=1e7))
    ideal = simulate(4, shape, job, rates_from(cal, tokenizer_tokens_per_s=1e7), ideal_network=True)
    # (Since tokenizers list their remote encoder ranks each from a different one, those batches spread over more
    # NICs: the busiest is under half busy, where with one order for all it was over half.)
    assert slow.remote_batch_fraction > 0 and slow.nic_busy_max > 0.4
    assert slow.throughput_texts_per_s < 0.8 * ideal.throughput_texts_per_s


def test_replay_follows_the_measured_start_skew_and_gpu_window(calibration):
    """A short job replayed with a measured run's start-up: the gpu rank ready first gets more rows, but only what
    its token window takes in; the others get the rest once they are ready."""
    rates = rates_from(json.loads(calibration.read_text()), tokenizer_tokens_per_s=1e6, gpu_tokens_per_s=3e4)
    shape = NodeShape(cores=4, gpus=1, tokenizers=2)
    job = JobShape(rows=1200, unit_sizes=[[100, 12]], chunk_rows=50, max_batch_tokens=2048, window_batches=8,
                   instances=1)
    even = simulate(2, shape, job, rates)
    skewed = simulate(2, shape, job, rates, start_offsets={"gpu": [0.0, 3.0], "tokenizer": [-5.0] * 4})
    assert sum(even.encoder_rows) == sum(skewed.encoder_rows) == 1200
    assert even.encoder_rows[0] == even.encoder_rows[1]
    assert skewed.encoder_rows[0] > skewed.encoder_rows[1] > 0
    # Measured from the first gpu rank being ready: the late one's 3 s show as lost throughput.
    assert skewed.throughput_texts_per_s < even.throughput_texts_per_s
    with pytest.raises(ValueError, match="add up to 1100 rows"):
        simulate(2, shape, JobShape(rows=1200, unit_sizes=[[100, 11]]), rates)


def test_eight_gpu_nodes_with_sub_conductors_keep_every_gpu_busy(calibration):
    """The seed's node shape (8 GPUs, 16 cores each, here 2 nodes of 8 GPUs and 64 cores to stay fast), with a
    sub-conductor per node: the real SubConductorCores hand out the units and commit them in batches; every
    encoder rank of a node gets work (one routing order for all tokenizers once left 6 of 8 idle)."""
    rates = rates_from(json.loads(calibration.read_text()), "infiniband-hdr")
    shape = NodeShape(cores=64, gpus=8, subconductors="per-node")
    sim = Simulation(2, shape, JobShape(rows=2_000_000, unit_rows=10_000, tokenizer_batch_tokens=262_144), rates)
    result = sim.run()
    assert result.subconductors == 2 and result.encoder_ranks == 16
    assert len(sim.conductor.done) == result.units == 200 and sim.conductor.rows_written == 2_000_000
    assert sum(s.units_committed for s in sim.subconductors.values()) == 200
    # Units reach the conductor in batches: fewer messages than units, where without sub-conductors it gets
    # more than two per unit.
    assert result.conductor_messages < result.units
    by_type = result.conductor_us_by_message         # where rank 0's handler time went, by message type
    assert sum(n for n, _, _ in by_type.values()) == result.conductor_messages
    assert {"RequestUnits", "UnitsCommitted"} <= set(by_type)
    assert all(0 < us <= longest for _, us, longest in by_type.values())
    assert min(result.encoder_rows) > 0.5 * max(result.encoder_rows)       # whole units of 10,000 rows
    ceiling = result.tokenizer_ranks * rates.tokenizer_tokens_per_s / rates.tokens_per_text
    assert result.steady_texts_per_s > 0.85 * ceiling


def test_the_steady_window_opens_once_every_encoder_rank_has_work(calibration):
    """Weak scaling measures a node's steady rate in a window that opens when every tokenizer rank has a unit and
    every encoder rank has work: the first token batches take a core a third of a second, which a window from the
    first unit counted as idle GPUs (a few percent of a short job). So a job of 2 units per tokenizer rank measures
    what one of 3 does."""
    rates = rates_from(json.loads(calibration.read_text()), "infiniband-hdr")
    shape = NodeShape(cores=64, gpus=4)
    first_batch_s = 262_144 / rates.tokenizer_tokens_per_s
    steady = {}
    for units in (2, 3):
        job = JobShape(rows_per_node=units_for(1, shape, rates, units, 10_000), unit_rows=10_000,
                       tokenizer_batch_tokens=262_144)
        result = simulate(1, shape, job, rates)
        assert result.ramp_s >= first_batch_s
        steady[units] = result.steady_texts_per_s
    assert steady[2] == pytest.approx(steady[3], rel=0.01)


def test_tokenizer_ranks_that_start_while_the_encoders_load_hide_the_pipelines_fill(calibration):
    """As in every measured run, the tokenizer ranks get units and read while the encoder ranks load the model, and
    the job's clock starts with the encoder ranks: with that lead the first token batches are waiting for them, so
    a short job loses no time filling the pipeline; without it the GPUs wait a first batch's tokenizing."""
    rates = rates_from(json.loads(calibration.read_text()), "infiniband-hdr")
    shape = NodeShape(cores=64, gpus=4)
    first_batch_s = 262_144 / rates.tokenizer_tokens_per_s
    rows = units_for(1, shape, rates, 1, 10_000)
    results = {}
    for lead in (0.0, 2.0):
        sim = Simulation(1, shape, JobShape(rows=rows, unit_rows=10_000, tokenizer_batch_tokens=262_144,
                                            encoder_lead_s=lead), rates)
        results[lead] = result = sim.run()
        assert sim.conductor.rows_written == rows
        assert result.makespan_s == pytest.approx(sim.env.now - lead)
        assert sum(result.tokenizer_time.values()) == pytest.approx(1.0)
    assert results[0.0].ramp_s >= first_batch_s > 5 * results[2.0].ramp_s
    gained = results[0.0].makespan_s - results[2.0].makespan_s
    assert 0.5 * first_batch_s < gained < 2 * first_batch_s


def test_tokenizer_ranks_that_read_ahead_spread_their_first_batches_and_are_never_held(calibration):
    """The disaggregated shape with the tokenizer ranks reading ahead: each of a GPU node's encoder ranks is linked
    to all 136 tokenizer ranks of the CPU node. Ready together, the encoder ranks each get a fair share: a
    tokenizer rank holds its first batch for every linked rank's grant (the first grant to land used to take
    nearly every first batch: one encoder rank got 1,069,000 of 2,720,000 rows). One ready half a second before
    the others takes a first batch from nearly all of them, and its window holds them all, where a window of 8
    batches held 128 senders in their Send and the job ran three times as long."""
    rates = rates_from(json.loads(calibration.read_text()), "infiniband-hdr")
    shape = NodeShape(gpus=8, cpu_node_cores=64)
    job = JobShape(rows_per_node=units_for(1, shape, rates, 2, 10_000), unit_rows=10_000,
                   tokenizer_batch_tokens=262_144)
    at_once = simulate(1, shape, job, rates)
    together = simulate(1, shape, dataclasses.replace(job, encoder_lead_s=2.0), rates)
    assert together.tokenizer_ranks == 136
    assert min(together.encoder_rows) > 0.97 * max(together.encoder_rows)
    assert together.steady_texts_per_s > 0.95 * at_once.steady_texts_per_s
    one_first = simulate(1, shape, job, rates, start_offsets={"encoder": [0.0] + [0.5] * 7, "tokenizer": [-2.0] * 136})
    assert one_first.throughput_texts_per_s > 0.6 * at_once.throughput_texts_per_s


def test_the_projection_takes_the_least_lead_the_measured_runs_had():
    measured = [{"series": "a", "nodes": 2, "sim": {"start_offsets_s": {"gpu": [0.0, 2.0], "tokenizer": [-6.0, -5.5]}}},
                {"series": "b", "nodes": 1, "sim": {"start_offsets_s": {"encoder": [0.0], "tokenizer": [-7.0]}}},
                {"series": "c", "nodes": 1, "sim": {}}]
    assert encoder_lead(measured)[0] == 5.5 and "a at 2 node(s)" in encoder_lead(measured)[1]
    assert encoder_lead(measured[2:])[0] == 0.0


def test_the_disaggregated_shape_plans_its_cpu_nodes_from_the_rates(calibration):
    rates = rates_from(json.loads(calibration.read_text()), "infiniband-hdr")
    shape = NodeShape(gpus=8, cpu_node_cores=64)
    job = JobShape(rows_per_node=units_for(1, shape, rates, 2, 10_000), unit_rows=10_000,
                   tokenizer_batch_tokens=262_144)          # weak scaling: 2 units per tokenizer rank
    one, three = (simulate(n, shape, job, rates) for n in (1, 3))
    # 8 GPUs at the calibrated rate need about 136 tokenizer ranks: 3 CPU nodes of 64 cores; 3 GPU nodes, 7.
    assert (one.cpu_nodes, three.cpu_nodes) == (3, 7) and three.encoder_ranks == 24
    assert all(rows > 0 for rows in three.encoder_rows)
    assert three.steady_texts_per_s > 2.8 * one.steady_texts_per_s


def test_no_projection_from_a_simulation_that_misses_a_measured_run(calibration, tmp_path):
    measured = tmp_path / "measured.json"
    row = {"series": "made-up", "nodes": 1, "throughput_texts_per_s": 1e9, "source": "measured",
           "sim": {"node": {"cores": 16, "gpus": 1, "gpu_name": "x", "tokenizers": 13}, "rows": 100_000,
                   "unit_rows": 20_000, "chunk_rows": 1024, "credits": 4, "network": "measured-tcp", "rates": {}}}
    measured.write_text(json.dumps({"rows": [row]}))
    refused = run_simulate(calibration, measured, [1, 2], tmp_path / "a", log=lambda *_: None)
    assert refused["rows"] == [] and not refused["validated"] and "made-up 1 node(s)" in refused["error"]
    forced = run_simulate(calibration, measured, [1, 2], tmp_path / "b", allow_unvalidated=True,
                          log=lambda *_: None)
    assert [r["nodes"] for r in forced["rows"]] == [1, 2] and not forced["validated"]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["validated"] is False


def test_missing_study_files_are_named_not_a_traceback(tmp_path):
    proc = run_cli("scaling", "simulate", "--calibration", str(tmp_path / "nope.json"), "--output", str(tmp_path))
    assert proc.returncode == 2 and f"calibration {tmp_path / 'nope.json'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("scaling", "report", "--study", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "nothing to report" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("scaling", "simulate", "--calibration", str(tmp_path / "nope.json"), "--output", str(tmp_path),
                   "--cpu-node-cores", "1")
    assert proc.returncode == 2 and "--cpu-node-cores 1: a CPU node needs a core" in proc.stderr


@needs_mpi
def test_measure_over_virtual_nodes_then_simulate_and_report(calibration, model_dir, tmp_path):
    for n in (1, 2):
        corpus = tmp_path / f"n{n}"
        corpus.mkdir()
        write_jsonl(corpus / "c.jsonl", [{"id": f"d{k}", "text": f"scaling row {k} " + "word " * (k % 17)}
                                         for k in range(40 * n)])
    study = tmp_path / "study"
    proc = run_cli("scaling", "measure", "--study", str(study), "--series", "vnodes", "--scales", "1,2",
                   "--ranks-per-node", "2", "--tokenizers-per-node", "1", "--virtual-nodes", "--",
                   "--input", str(tmp_path / "n{nodes}"), "--model", model_dir, "--device", "cpu",
                   "--unit-rows", "10", "--chunk-rows", "5", timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((study / "measured.json").read_text())["rows"]
    assert [(r["nodes"], r["gpus"], r["tokenizers"], r["source"]) for r in rows] == [(1, 1, 1, "measured"),
                                                                                    (2, 2, 2, "measured")]
    assert rows[0]["efficiency"] == 1.0 and rows[1]["throughput_texts_per_s"] > 0
    two = json.loads((study / "runs" / "vnodes-n2.manifest.json").read_text())
    assert {r["host"] for r in two["ranks"]} == {"vnode0", "vnode1"} and two["complete"]
    # This 2-core box cannot give each virtual node its own cores, so no validation is asked of these runs here;
    # the projection is forced and must say so.
    proc = run_cli("scaling", "simulate", "--calibration", str(calibration), "--measured",
                   str(study / "measured.json"), "--nodes", "1,2", "--output", str(study), "--allow-unvalidated")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("scaling", "report", "--study", str(study))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (study / "report.md").read_text()
    assert "| vnodes | 2 |" in report and "seed: effective (published)" in report
    results = json.loads((study / "results.json").read_text())
    assert ("NOT VALIDATED" in report) == (not results["validated"])
    for png in ("throughput.png", "efficiency.png", "losses.png"):
        assert (study / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("plane", ["off", "per-node"])
def test_tail_stealing_in_the_simulation_cuts_the_tail(calibration, plane):
    """Two 8-GPU nodes, 100 units for 200+ tokenizer ranks: without stealing the job waits for its last units'
    readers; with it the idle ranks take halves of them, through the same cores as the real job."""
    rates = rates_from(json.loads(calibration.read_text()), "infiniband-hdr")
    shape = NodeShape(cores=64, gpus=8, subconductors=plane)
    runs = {}
    for steal in (0, 1024):
        sim = Simulation(2, shape, JobShape(rows=2_000_000, unit_rows=20_000, tokenizer_batch_tokens=262_144,
                                            steal_rows=steal), rates)
        runs[steal] = (sim.run(), sim)
    (plain, _), (stealing, sim) = runs[0], runs[1024]
    assert sim.conductor.rows_written == 2_000_000 and sim.conductor.all_committed
    assert stealing.units > plain.units == 100 and sim.plan.splits == stealing.units - 100
    assert stealing.tail_s < 0.5 * plain.tail_s
    assert stealing.throughput_texts_per_s > 1.3 * plain.throughput_texts_per_s


def test_the_control_ranks_are_charged_what_fan_in_measured(calibration):
    """bench/fanin_cost.py's measured-over-simulated factors scale rank 0's charge: by the batched one with
    sub-conductors, else by the other."""
    from hpcembed.scaling.project import conductor_factors
    cal = json.loads(calibration.read_text())
    fits = {"fits": [{"sub_conductors": "off", "measured_over_simulated": 1.5},
                     {"sub_conductors": "per-node", "measured_over_simulated": 2.5}]}
    cal["rates"].update(conductor_factors(fits, Path("fits.json")))
    rates = rates_from(cal, "infiniband-hdr")
    job = JobShape(rows=400_000, unit_rows=10_000, tokenizer_batch_tokens=262_144)
    for plane, factor in (("off", 1.5), ("per-node", 2.5)):
        result = simulate(2, NodeShape(cores=64, gpus=8, subconductors=plane), job, rates)
        messages_s = result.conductor_messages * (1e-6 * result.conductor_cpu_us_per_message
                                                  + rates.conductor_message_s)
        charged = result.conductor_busy * result.makespan_s / (messages_s * rates.cpu_slowdown)
        assert charged == pytest.approx(factor, rel=1e-6)
    with pytest.raises(ValueError, match="off and per-node"):
        conductor_factors({"fits": fits["fits"][:1]}, Path("fits.json"))


def test_where_batch_size_was_measured_rank_0_pays_a_ratio_and_a_cost_per_batch(calibration):
    """bench/fanin_cost.py --batch-cost: rank 0's charge for a sub-conductor's batch is the slope times the
    simulation's charge plus a cost per message, so a large batch is not charged the fan-in's ratio."""
    from hpcembed.scaling.project import conductor_factors
    cal = json.loads(calibration.read_text())
    fits = {"fits": [{"sub_conductors": "off", "measured_over_simulated": 1.5},
                     {"sub_conductors": "per-node", "measured_over_simulated": 2.5, "batch_slope": 1.0,
                      "per_message_extra_us": 400.0}]}
    cal["rates"].update(conductor_factors(fits, Path("fits.json")))
    rates = rates_from(cal, "infiniband-hdr")
    assert rates.batched_conductor_factor == 1.0 and rates.batched_conductor_extra_s == pytest.approx(4e-4)
    job = JobShape(rows=400_000, unit_rows=10_000, tokenizer_batch_tokens=262_144)
    result = simulate(2, NodeShape(cores=64, gpus=8, subconductors="per-node"), job, rates)
    # Without a control probe a handler's time here is scaled by cpu_slowdown, as the receive is.
    base = result.conductor_messages * (1e-6 * result.conductor_cpu_us_per_message
                                        + rates.conductor_message_s) * rates.cpu_slowdown
    assert result.conductor_busy * result.makespan_s == pytest.approx(base + result.conductor_messages * 4e-4,
                                                                      rel=1e-6)
    plain = simulate(2, NodeShape(cores=64, gpus=8, subconductors="off"), job, rates)      # rank 0 alone: no extra
    assert plain.conductor_busy * plain.makespan_s == pytest.approx(
        1.5 * plain.conductor_messages * (1e-6 * plain.conductor_cpu_us_per_message
                                          + rates.conductor_message_s) * rates.cpu_slowdown, rel=1e-6)


def test_handler_times_are_scaled_by_the_control_probe_not_this_machine(calibration):
    """With the target core's control probe, a handler's time here is charged times target probe over this
    machine's probe; the calibrated receive stays scaled by cpu_slowdown."""
    from hpcembed.scaling.probe import PROBE_VERSION, handler_scale, here_probe_seconds
    from hpcembed.scaling.project import control_probe
    cal = json.loads(calibration.read_text())
    probe = {"probe_version": PROBE_VERSION, "busy_s": 3 * here_probe_seconds(), "cpu": "a CPU", "device": "a box",
             "busy_processes": 15}
    cal["rates"].update(control_probe(probe, Path("probe.json")))
    rates = rates_from(cal, "infiniband-hdr")
    result = simulate(2, NodeShape(cores=64, gpus=8, subconductors="off"),
                      JobShape(rows=400_000, unit_rows=10_000, tokenizer_batch_tokens=262_144), rates)
    charged = result.conductor_messages * (3e-6 * result.conductor_cpu_us_per_message
                                           + rates.conductor_message_s * rates.cpu_slowdown)
    assert result.conductor_busy * result.makespan_s == pytest.approx(charged, rel=1e-6)
    assert handler_scale(0.0, 2.5) == 2.5 and handler_scale(0.03, 2.5, 0.01) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="probe version"):
        control_probe({**probe, "probe_version": PROBE_VERSION + 1}, Path("probe.json"))


def test_rank_0s_ledger_is_made_durable_on_the_simulations_clock(calibration):
    """Once a simulated second, as a real rank 0 does, not once a second of the simulation's own run."""
    cal = json.loads(calibration.read_text())
    sim = Simulation(1, node_from(cal), JobShape(rows=40_000, unit_rows=10_000), rates_from(cal))
    try:
        sim.env.run(until=2.5)
        assert sim.conductor.ledger.clock() == 2.5
    finally:
        sim._tmp.cleanup()


def test_independent_simulations_run_side_by_side_with_the_same_results(calibration):
    """`hpcembed scaling simulate --jobs N`: a projection's simulations in N processes give what one process
    gives (virtual time does not depend on the process; only the control ranks' measured handler times move)."""
    from hpcembed.scaling.project import simulate_all
    cal = json.loads(calibration.read_text())
    rates, shape = rates_from(cal), NodeShape(cores=6, gpus=1, tokenizers=4)
    runs = {(n, kind): (n, shape, JobShape(rows=60_000 * n, unit_rows=5_000), rates,
                        {"ideal_network": True} if kind == "ideal" else {})
            for n in (1, 3) for kind in ("weak", "ideal")}
    alone, side_by_side = simulate_all(runs, workers=1), simulate_all(runs, workers=2)
    assert set(alone) == set(side_by_side) == set(runs)
    for key in runs:
        a, b = alone[key], side_by_side[key]
        assert (a.rows, a.units, a.encoder_rows) == (b.rows, b.units, b.encoder_rows)
        assert a.makespan_s == pytest.approx(b.makespan_s, rel=0.01)
