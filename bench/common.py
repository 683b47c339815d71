"""What every benchmark records beside its figures: device, date, library versions."""
from __future__ import annotations

import datetime
import json
import platform
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return f"{model} ({os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("hpcembed", "torch", "transformers", "tokenizers", "budtiktok", "sentence-transformers", "pyarrow",
                "numpy", "mpi4py", "mpich", "ucxx-cu12", "libucx-cu12"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def record(benchmark: str, slug: str, result: dict) -> Path:
    result = {"benchmark": benchmark, "device": device_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), **result}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{benchmark}-{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def table(rows: list[tuple], header: tuple) -> str:
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])
