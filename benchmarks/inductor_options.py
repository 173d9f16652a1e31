"""``--compile inductor``'s step under inductor's options, against hand-written eager (CPU).

Builds the throughput benchmark's compiled pyro-vae step once per variant (default,
``cpp_wrapper=True``, ``mode="max-autotune-no-cudagraphs"``, both), each compiled at
its warm-up, then times every variant and the hand-written step in interleaved rounds
and prints each one's median images/s and its paired ratio to hand-written eager.

    python benchmarks/inductor_options.py --data-dir ../shared/data [--rounds 12]
"""

import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor
from _common import default_data_dir, run_main
from throughput import hand_written_step, images_per_second, paired_ratio, pyro_vae_compiled_step

from pyro_vae import ImageBatches, load_dataset

VARIANTS = {
    # name: (inductor config fields, torch.compile mode)
    "both": ({"cpp_wrapper": True}, "max-autotune-no-cudagraphs"),
    "max-autotune": ({}, "max-autotune-no-cudagraphs"),
    "cpp_wrapper": ({"cpp_wrapper": True}, None),
    "inductor": ({}, None),
}


def compiled_step(data, batch_size, fields, mode):
    """The compiled step of ``throughput.py``, compiled (at its first steps) under
    ``fields`` and ``mode``; the config is put back afterwards."""
    compile_, saved = torch.compile, {k: getattr(inductor, k) for k in fields}

    def with_options(fn, **kwargs):
        return compile_(fn, **({"mode": mode} if mode else {}), **kwargs)

    torch.compile = with_options
    try:
        for k, v in fields.items():
            setattr(inductor, k, v)
        step = pyro_vae_compiled_step(data, data.device)
        images_per_second(step, data, batch_size, 3)  # traced and compiled here
    finally:
        torch.compile = compile_
        for k, v in saved.items():
            setattr(inductor, k, v)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=0.75, help="per row and round")
    parser.add_argument("--batch-sizes", default="128,512")
    args = parser.parse_args()
    data = ImageBatches(load_dataset("mnist", args.data_dir), "dynamic")
    for batch_size in map(int, args.batch_sizes.split(",")):
        rows = {"hand-written": hand_written_step(data, data.device)}
        for name, (fields, mode) in VARIANTS.items():
            start = time.perf_counter()
            rows[name] = compiled_step(data, batch_size, fields, mode)
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        steps = max(3, int(args.seconds * 15000 / batch_size))
        rates = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, step in rows.items():
                rates[name].append(images_per_second(step, data, batch_size, steps))
        for name in rows:
            ratio = paired_ratio(rates[name], rates["hand-written"])
            print(
                f"batch {batch_size:4d}  {name:13s} {statistics.median(rates[name]):9.0f} "
                f"images/s  {ratio:.3f}x hand-written",
                flush=True,
            )


if __name__ == "__main__":
    run_main(main)
