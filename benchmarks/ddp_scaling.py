"""Training images/s with 1 and 2 processes on this machine (torchrun, gloo on CPU).

    python benchmarks/ddp_scaling.py --data-dir ../shared/data [--epochs 1]

torchrun sets OMP_NUM_THREADS=1 in each process, so its 1-process row uses one
core; the plain row is the usual single process with PyTorch's default threads.
Global batch 128 in every row. Prints a Markdown table.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import default_data_dir, run_main


def run(command, out):
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads((Path(out) / "summary.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    flags = [
        "--dataset",
        args.dataset,
        "--epochs",
        str(args.epochs),
        "--quiet",
        "--iw-samples",
        "1",
    ]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = f"{tmp}/plain"
        rows.append(
            (
                "1 process, default threads",
                run([sys.executable, "-m", "pyro_vae", "train", *flags, "--out", plain], plain),
            )
        )
        for n in (1, 2):
            out = f"{tmp}/torchrun{n}"
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={n}",
                "-m",
                "pyro_vae",
                "train",
                *flags,
                "--out",
                out,
            ]
            rows.append((f"torchrun, {n} process{'es' if n > 1 else ''}", run(command, out)))
    print("| setup | images/s | test ELBO |")
    print("|---|---|---|")
    for name, summary in rows:
        print(
            f"| {name} | {summary['train_images_per_second']:,.0f} | {summary['test_elbo']:.2f} |"
        )


if __name__ == "__main__":
    run_main(main)
