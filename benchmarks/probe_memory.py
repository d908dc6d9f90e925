"""The memory probes `--gpus-per-trial auto` packs by: each (backbone, image size)'s training memory line.

    python benchmarks/probe_memory.py --device cuda    # measured: two real bf16 AdamW steps per probe, on the GPU
    python benchmarks/probe_memory.py --device cpu     # estimated without a GPU (marked measured: false)

Writes `results/gpu_memory_probe.json` (the `--device cpu` table is what the planner's tests read:
`tests/test_packing.py`) and prints each probe with the share a trial at batch 32, 64 and 128 would
reserve on an 80 GiB and a 141 GiB GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tune_inat.packing import estimate_on_cpu, gpu_share, measure_on_gpu, probe_key, write_probes

HERE = Path(__file__).resolve().parent
PAIRS = [
    ("resnet50", 224), ("resnet50", 288), ("efficientnet_v2_s", 224), ("efficientnet_v2_s", 384),
    ("convnext_tiny", 224), ("vit_b_16", 224), ("mobilenet_v3_large", 224), ("resnet18", 48), ("resnet34", 48),
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "gpu_memory_probe.json")
    args = parser.parse_args(argv)
    probe = measure_on_gpu if args.device == "cuda" else estimate_on_cpu
    probes = {probe_key(b, s): probe(b, s) for b, s in PAIRS}
    note = (
        "measured on the GPU: python benchmarks/probe_memory.py --device cuda"
        if args.device == "cuda"
        else "NOT MEASURED: estimated on a CPU (python benchmarks/probe_memory.py --device cpu); "
        "the GPU check replaces it with the measured table"
    )
    write_probes(args.output, probes, note)
    print(note)
    print(f"{'probe':28s} {'static MiB':>10s} {'MiB/image':>9s}   share at batch 32/64/128 on 80 GiB | 141 GiB")
    for key, p in probes.items():
        shares = [f"{gpu_share(p.peak_mib(b), total):.3g}" for total in (81920, 143771) for b in (32, 64, 128)]
        print(
            f"{key:28s} {p.static_mib:10.0f} {p.per_image_mib:9.1f}   {' '.join(shares[:3])} | {' '.join(shares[3:])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
