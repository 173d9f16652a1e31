"""M2's training step eager and under ``--compile`` (trace, inductor), on MNIST, in one run.

Builds M2 as ``pyro-vae train --model m2 --dataset mnist --labeled 100 --hidden 500``
does (every-step schedule: each step is an unlabelled batch with y summed out by
Pyro's TraceEnum_ELBO, plus a labelled batch with the aux term) and times the same
steps three ways, in interleaved rounds (A B C A B C ...) so that a noisy machine
slows all alike:

- eager: ``pyro.infer.SVI.step`` with Pyro's TraceEnum_ELBO, what ``--compile none`` runs;
- trace: the step traced once by ``make_fx`` (``Enum_ELBO.traceable_loss``) and replayed;
- inductor: that graph compiled by ``torch.compile`` (its compile time is printed apart).

Each takes its own copy of the model from the same initial weights. Prints steps/s and
images/s (unlabelled + labelled) with the median over rounds of each round's ratio to
eager, and writes JSON.

    python benchmarks/m2_compile.py --data-dir ../shared/data [--rounds 5] [--steps 20]
    python benchmarks/m2_compile.py --variants eager,trace   # without inductor's compile
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import pyro
import torch
from _common import default_data_dir, run_main
from pyro.infer import SVI

from pyro_vae import Config, ImageBatches, load_dataset
from pyro_vae.models import build
from pyro_vae.training import semi
from pyro_vae.training.compiled import TracedStep
from pyro_vae.training.loop import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and variant")
    parser.add_argument("--variants", default="eager,trace,inductor", help="comma-separated")
    parser.add_argument("--out", default="runs/m2_compile.json")
    args = parser.parse_args()

    config = Config()
    config.data.dataset, config.data.data_dir = "mnist", args.data_dir
    config.model.kind, config.model.hidden, config.model.latent_dim = "m2", [500], 50
    config.semi.labeled = 100
    dataset = load_dataset("mnist", args.data_dir)
    data = ImageBatches(dataset, config.data.binarize, seed=0)
    pyro.set_rng_seed(0)
    initial = build(config, dataset.image_shape, dataset.num_classes)
    batches = list(semi.train_batches(initial, data, config.train.batch_size, 1, 0))
    batches = [b for b in batches if len(b[0]) == config.train.batch_size][: args.steps]
    images = sum(sum(len(a) for a in b[:2]) for b in batches) / len(batches)

    variants, compile_seconds = {}, {}
    with pyro.validation_enabled(False):
        for name in ["eager", *(v for v in args.variants.split(",") if v != "eager")]:
            model = copy.deepcopy(initial)
            pyro.clear_param_store()
            elbo = model.build_estimator("trace", 1)
            optimizer = make_optimizer(config)
            if name == "eager":
                step = SVI(*model.svi_program(), optimizer, loss=elbo).step
            else:
                step = TracedStep(model, elbo, optimizer, name)
                started = time.perf_counter()
                float(step(*batches[0]))  # traced (and compiled) here, not in the timing
                compile_seconds[name] = time.perf_counter() - started
            variants[name] = step

        def timed(step) -> float:
            started = time.perf_counter()
            for b in batches:
                loss = step(*b)
            float(loss)
            return len(batches) / (time.perf_counter() - started)

        for step in variants.values():
            timed(step)  # warm-up
        rates = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, step in variants.items():
                rates[name].append(timed(step))

    rows = []
    for name, r in rates.items():
        ratio = statistics.median(a / b for a, b in zip(r, rates["eager"], strict=True))
        rows.append(
            {
                "variant": name,
                "steps_per_second": statistics.median(r),
                "images_per_second": statistics.median(r) * images,
                "ratio_to_eager": ratio,
                "compile_seconds": compile_seconds.get(name),
            }
        )
    print(
        f"M2, 100 labels, batch {config.train.batch_size} + 100 labelled, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds of {len(batches)} steps"
    )
    print("| variant | steps/s | images/s | ratio to eager | trace + compile (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        compiled = f"{row['compile_seconds']:.1f}" if row["compile_seconds"] else "-"
        print(
            f"| {row['variant']} | {row['steps_per_second']:.2f} | "
            f"{row['images_per_second']:.0f} | {row['ratio_to_eager']:.2f} | {compiled} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
