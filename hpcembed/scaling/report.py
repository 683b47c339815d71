"""`hpcembed scaling report`: STUDY/report.md with PNG plots and the data as CSV, from measured.json and
results.json. Every number is labelled measured or projected; the seed's published projection stands beside
ours, labelled as published."""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import ConfigError
from . import read_json

# The seed's published projection (texts/s): 1 node, and efficiency at 10, 100, 1000 nodes.
SEED_ONE_NODE = 22_903
SEED_EFFICIENCY = {1: 1.0, 10: 0.85, 100: 0.75, 1000: 0.65}


def _fmt(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:,.2f}M"
    return f"{x:,.0f}"


def _finish_log_plot(plt, fig, ax, path: Path, ylabel: str, title: str, log_y: bool) -> None:
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _measured_label(rows: list[dict]) -> str:
    # Virtual nodes share one machine's GPU and cores: say so where the curve is, not only in the notes.
    shared = any("virtual node" in r.get("where", "") for r in rows)
    return f"measured: {rows[0]['series']}" + (" (virtual nodes sharing one machine)" if shared else "")


def _plots(study: Path, measured: list[dict], projected: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    seed_n = sorted(SEED_EFFICIENCY)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if projected:
        n = [r["nodes"] for r in projected]
        ax.plot(n, [r["throughput_texts_per_s"] for r in projected], "o-", label="hpcembed, projected (simulation)")
        ax.plot(n, [n_ * projected[0]["throughput_texts_per_s"] for n_ in n], ":", color="grey",
                label="linear from our 1 node")
    ax.plot(seed_n, [SEED_ONE_NODE * k * SEED_EFFICIENCY[k] for k in seed_n], "s--", label="seed, published")
    for series in sorted({r["series"] for r in measured}):
        rows = [r for r in measured if r["series"] == series]
        ax.plot([r["nodes"] for r in rows], [r["throughput_texts_per_s"] for r in rows], "^", ms=8,
                label=_measured_label(rows))
    _finish_log_plot(plt, fig, ax, study / "throughput.png", "texts/s",
                     "Throughput (weak scaling: corpus grows with the nodes)", log_y=True)
    names.append("throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if projected:
        ax.plot([r["nodes"] for r in projected], [100 * r["efficiency"] for r in projected], "o-",
                label="hpcembed, projected: steady state")
        ax.plot([r["nodes"] for r in projected], [100 * r["job_efficiency"] for r in projected], "o:",
                label="hpcembed, projected: whole simulated job (ramp and tail)")
    ax.plot(seed_n, [100 * SEED_EFFICIENCY[k] for k in seed_n], "s--", label="seed, published")
    for series in sorted({r["series"] for r in measured}):
        rows = [r for r in measured if r["series"] == series]
        if len(rows) > 1:
            ax.plot([r["nodes"] for r in rows], [100 * r["efficiency"] for r in rows], "^-", ms=8,
                    label=_measured_label(rows))
    ax.axhline(98, color="green", lw=0.8, ls=":")
    ax.axhline(95, color="orange", lw=0.8, ls=":")
    _finish_log_plot(plt, fig, ax, study / "efficiency.png", "efficiency E(N) = X(N) / (N X(1)), %",
                     "Scaling efficiency (targets: 98% at 10 nodes, 95% at 1000)", log_y=False)
    names.append("efficiency.png")

    if projected:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = [str(r["nodes"]) for r in projected]
        bottom = [0.0] * len(projected)
        parts = [("scheduling_wait_for_unit", "scheduling: waiting for a unit"),
                 ("queue_contention_wait_for_credit", "queue contention: waiting for credit"),
                 ("tail_idle_after_last_unit", "tail: idle after the last unit"),
                 ("network", "network (ideal-network rerun)")]
        for key, label in parts:
            values = [100 * (r["losses"][key] or 0.0) for r in projected]
            ax.bar(labels, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xlabel("nodes")
        ax.set_ylabel("% of tokenizer-rank time (the bottleneck) / of throughput")
        ax.set_title("Where efficiency is lost (projected)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(study / "losses.png", dpi=120)
        plt.close(fig)
        names.append("losses.png")
    return names


def write_report(study: Path, title: str = "", node_series: str = "h100-node") -> Path:
    """`node_series`: the measured 1-node series set beside the seed's 1-node row (the node the calibration
    describes). STUDY/notes.md, if there, is included as the study's own description of its runs."""
    study = Path(study)
    if not (study / "measured.json").exists() and not (study / "results.json").exists():
        raise ConfigError(f"{study} holds neither measured.json (hpcembed scaling measure) nor results.json "
                          "(hpcembed scaling simulate): nothing to report")
    measured = read_json(study / "measured.json", "measurements")["rows"] if (study / "measured.json").exists() else []
    results = read_json(study / "results.json", "projection") if (study / "results.json").exists() else {}
    projected = results.get("rows", [])
    validated = results.get("validated", False)
    _write_csv(study, measured, projected)
    plots = _plots(study, measured, projected)
    lines = [f"# {title or 'Scaling study: ' + study.name}", ""]
    if projected and not validated:
        lines += [f"**NOT VALIDATED.** {results.get('error', '')}. The projection below was made anyway "
                  "(`--allow-unvalidated`); read it as the model's answer, not as a validated one.", ""]
    lines += _seed_section(measured, projected, validated, node_series)
    notes = study / "notes.md"
    if notes.exists():
        lines += ["## About this study", "", notes.read_text().strip(), ""]
    lines += [f"![throughput]({p})" for p in plots[:1]] + [""] + [f"![efficiency]({p})" for p in plots[1:2]] + [""]
    lines += _measured_section(measured) + _validation_section(results)
    if projected:
        lines += _losses_section(projected) + [f"![losses]({p})" for p in plots[2:]] + [""]
        lines += _control_section(projected, results.get("encoder_lead_s", {}).get("source", ""))
    lines += METHOD
    path = study / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_csv(study: Path, measured: list[dict], projected: list[dict]) -> None:
    with open(study / "scaling.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "series", "nodes", "gpus", "throughput_texts_per_s", "efficiency"])
        for r in measured:
            w.writerow(["measured", r["series"], r["nodes"], r["gpus"], r["throughput_texts_per_s"], r["efficiency"]])
        for r in projected:
            w.writerow(["projected", "simulation", r["nodes"], r["gpus"], r["throughput_texts_per_s"],
                        r["efficiency"]])
        for n, e in SEED_EFFICIENCY.items():
            w.writerow(["published", "seed", n, "", SEED_ONE_NODE * n * e, e])


def _seed_section(measured: list[dict], projected: list[dict], validated: bool, node_series: str) -> list[str]:
    lines = ["Every figure is labelled: **measured** (a real run), **projected** (the simulation, "
             "`hpcembed scaling simulate`), or **published** (the seed's table, a vendor's claim).", "",
             "## Against the seed's table", "",
             "| nodes | seed: theoretical | seed: efficiency | seed: effective (published) | hpcembed | "
             "hpcembed efficiency | per tokenizer core | hpcembed source |", "|---|---|---|---|---|---|---|---|"]
    proj = {r["nodes"]: r for r in projected}
    one_measured = next((r for r in measured if r["series"] == node_series and r["nodes"] == 1), None)
    for n in sorted(set(SEED_EFFICIENCY) | set(proj)):
        seed = (f"{_fmt(SEED_ONE_NODE * n)} t/s", f"{SEED_EFFICIENCY[n]:.0%}",
                f"{_fmt(SEED_ONE_NODE * n * SEED_EFFICIENCY[n])} t/s") if n in SEED_EFFICIENCY else ("", "", "")
        if n == 1 and one_measured:
            ours, eff, src = (f"{_fmt(one_measured['throughput_texts_per_s'])} t/s", "100%",
                              f"measured ({node_series}: {one_measured['device']})")
            per_core = "100%"
            if n in proj:
                src += f"; simulated {_fmt(proj[n]['throughput_texts_per_s'])}"
        elif n in proj:
            ours, eff, src = (f"{_fmt(proj[n]['throughput_texts_per_s'])} t/s", f"{proj[n]['efficiency']:.1%}",
                              "projected" + ("" if validated else " (not validated)"))
            per_core = f"{proj[n]['efficiency_per_tokenizer']:.1%}" if "efficiency_per_tokenizer" in proj[n] else ""
        else:
            ours, eff, src, per_core = "", "", "", ""
        lines.append(f"| {n} | {seed[0]} | {seed[1]} | {seed[2]} | {ours} | {eff} | {per_core} | {src} |")
    lines += ["", "t/s = texts per second. Efficiency is E(N) = X(N) / (N X(1)) at steady state; \"per tokenizer "
              "core\" divides each X by its tokenizer ranks, which takes out the conductor's core on the first node "
              "(that core is why E(N) can pass 100%).", ""]
    return lines


def _measured_section(measured: list[dict]) -> list[str]:
    lines = ["## Measured runs (strong and weak scaling)", "",
             "| series | nodes | ranks | encoder ranks | tokenizer ranks | texts/s (steady) | E(N) | gpu busy | "
             "where |", "|---|---|---|---|---|---|---|---|---|"]
    for r in measured:
        busy = f"{r['gpu_busy']:.0%}" if r.get("gpu_busy") is not None else ""
        lines.append(f"| {r['series']} | {r['nodes']} | {r['ranks']} | {r['gpus']} | {r['tokenizers']} | "
                     f"{_fmt(r['throughput_texts_per_s'])} | {r['efficiency']:.1%} | {busy} | {r['where']} |")
    return lines + [""]


def _validation_section(results: dict) -> list[str]:
    lines = ["## Validation: the simulation replays every measured run", "",
             f"Tolerance ±{results.get('tolerance', 0.1):.0%}.", "",
             "| series | nodes | measured texts/s | simulated texts/s | error | within | rows per encoder rank, "
             "measured | simulated |", "|---|---|---|---|---|---|---|---|"]
    spread = lambda rows: " / ".join(_fmt(x) for x in rows) if rows and len(rows) > 1 else ""  # noqa: E731
    for v in results.get("validation", []):
        lines.append(f"| {v['series']} | {v['nodes']} | {_fmt(v['measured_texts_per_s'])} | "
                     f"{_fmt(v['simulated_texts_per_s'])} | {v['error']:+.1%} | "
                     f"{'yes' if v['within_tolerance'] else '**no**'} | {spread(v.get('gpu_rows_measured'))} | "
                     f"{spread(v.get('gpu_rows_simulated'))} |")
    return lines + [""]


def _losses_section(projected: list[dict]) -> list[str]:
    lines = ["## Where efficiency is lost (projected)", "",
             "Shares of the tokenizer ranks' time over the whole simulated job (they are the bottleneck when "
             "gpu busy stays below 100%); the network's share is the throughput an ideal network would add.",
             "", "| nodes | E(N) steady | E(N) whole job | tokenizing | scheduling (wait for unit) | "
             "queue contention (wait for credit) | tail | network | conductor busy | conductor queue max | "
             "batches crossing nodes | busiest NIC | sim wall s |", "|" + "---|" * 13]
    for r in projected:
        loss = r["losses"]
        net = "" if loss["network"] is None else f"{loss['network']:.2%}"
        lines.append(f"| {r['nodes']} | {r['efficiency']:.1%} | {r['job_efficiency']:.1%} | "
                     f"{r['tokenizer_busy']:.1%} | {loss['scheduling_wait_for_unit']:.2%} | "
                     f"{loss['queue_contention_wait_for_credit']:.2%} | {loss['tail_idle_after_last_unit']:.1%} | "
                     f"{net} | {r['conductor_busy']:.1%} | {r['conductor_queue_max']:,} | "
                     f"{r['remote_batch_fraction']:.1%} | {r['nic_busy_max']:.2%} | {r['sim_wall_seconds']} |")
    return lines + [""]


def _control_section(projected: list[dict], lead_source: str = "") -> list[str]:
    """The control plane and a whole job of a fixed size, where the projection simulated one (--job-rows).
    `lead_source`: where the tokenizer ranks' lead over the encoder ranks came from (results.json)."""
    if not any("subconductors" in r for r in projected):
        return []
    first = projected[0]
    shape = (f"{first['gpus_per_node']} GPUs per node, " + (
        f"tokenizer ranks on CPU-only nodes of {first['cpu_node_cores']} cores" if first.get("cpu_node_cores")
        else f"{first['cores_per_node']} cores per node"))
    whole = next((r["whole_job_rows"] for r in projected if "whole_job_rows" in r), None)
    lead = first.get("encoder_lead_s", 0)
    lines = ["## The control plane and the whole job (projected)", "", f"Shape: {shape}. Conductor and "
             "sub-conductor busy are their simulated handler time (measured here as the real cores run, scaled to "
             "the target core) over the makespan. Lost time is the weak-scaling job's makespan less its rows at "
             "the steady rate (ramp and tail); the job size for a 95% whole job follows from it (derived)."
             + (f" The whole job is a simulated job of {whole:,} rows at each scale, in units no larger than one "
                "per tokenizer rank (as `hpcembed run` advises) unless the projection set them." if whole else "")
             + (f" Every job's clock starts with the encoder ranks ready; the tokenizer ranks start {lead} s "
                f"before them, reading while the encoder ranks load the model ({lead_source or 'given'}), so "
                "start-up itself (MPI launch, model load, its spread over the nodes) is outside these figures."
                if lead else ""), "",
             "| nodes | encoder ranks | tokenizer ranks | CPU nodes | sub-conductors | conductor busy | busiest "
             "sub-conductor | ramp s | lost s | rows for 95% whole job | whole job's unit rows | whole job E | its "
             "tail s | its conductor busy |", "|" + "---|" * 14]
    for r in projected:
        rows95 = r.get("rows_for_95_percent_whole_job")
        lines.append(f"| {r['nodes']} | {r['gpus']:,} | {r['tokenizer_ranks']:,} | {r.get('cpu_nodes', 0)} | "
                     f"{r['subconductors']} | {r['conductor_busy']:.1%} | {r['subconductor_busy_max']:.2%} | "
                     f"{r['ramp_s']} | {r['lost_s']} | {'-' if rows95 is None else f'{rows95:,}'} | "
                     + (f"{r.get('whole_job_unit_rows', r['unit_rows']):,} | {r['whole_job_efficiency']:.1%} | "
                        f"{r['whole_job_tail_s']} | {r['whole_job_conductor_busy']:.1%} |"
                        if "whole_job_efficiency" in r else "| | | |"))
    return lines + [""]


METHOD = ["## Method", "",
          "- Calibration: `calibration.json`, every value with the benchmark file and field it came from.",
          "- Simulation: SimPy, driving the job's own protocol cores in virtual time (hpcembed/scaling/sim.py): "
          "the ConductorCore with a real ledger, a TokenizerCore per tokenizer rank (units, credits, routing) and an "
          "EncoderCore per encoder rank (its window, credit and part-complete rules); the conductor's CPU time per "
          "message is measured as it runs and scaled to the target core. The simulation models time only: a batch "
          "moves by rendezvous (the tokenizer's Send completes when the encoder rank takes the batch in), and an "
          "encoder rank's instances are one server at the calibrated rate, fed encoder batches of max_batch_tokens "
          "with 2 queued per instance.",
          "- Replaying a measured run uses that run's units as planned, its per-rank busy rates, and when each "
          "rank started (encoder ranks ready, tokenizer ranks asking for work); its throughput is never an input.",
          "- Not modelled: the parallel file system (reading input, writing shards), start-up at scale "
          "(MPI launch, model load), node-to-node speed differences.", ""]
