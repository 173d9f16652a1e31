"""Training throughput: pyro-vae's SVI step against a hand-written PyTorch VAE step.

All train the same 784-400-50 MLP (softplus, Bernoulli likelihood, diagonal
Normal guide, Adam 1e-3) on MNIST held in memory with dynamic binarization, in
one process, timed in interleaved rounds (A B C A B C ...) so that a noisy
machine slows all alike. Each step includes its own data handling:

- pyro-vae: `make_svi(...)[0].step` on `ImageBatches.batch` (uint8 levels), with
  the loss checked by `divergence.Guard`: exactly what each step of `pyro-vae
  train` runs, with the ELBO computed by Pyro's Trace_ELBO (or `--elbo`);
- hand-written PyTorch (the baseline): float images, torch.bernoulli, the same
  ELBO with an analytic KL, BCE on logits, torch.optim.Adam;
- plain Pyro in the style of Pyro's VAE example: `pyro.module`, a sigmoid into
  probability-space Bernoulli, `pyro.optim.Adam`, Pyro's default validation,
  the hand-written step's data.

Prints a table of median images/s and of ratios to the hand-written step (the
median over rounds of each round's ratio), and writes JSON.

    python benchmarks/throughput.py --data-dir ../shared/data [--quick] [--device cuda]
    python benchmarks/throughput.py --numpyro-python /path/to/python   # adds NumPyro's jitted epoch
    python benchmarks/throughput.py --elbo jit-trace   # pyro-vae with another estimator
    python benchmarks/throughput.py --quick --compile  # adds the step compiled by inductor
    python benchmarks/throughput.py --device cuda --cudagraph  # adds the CUDA-graph rows
    python benchmarks/throughput.py --quick --stock    # pyro-vae on Pyro's stock distributions too

With ``--cudagraph`` on a GPU three rows join: pyro-vae's step captured in a CUDA graph
(``--compile cudagraph``) and compiled by inductor, then captured (``--compile
inductor-cudagraph``), and the hand-written step with its batch, forward, backward and
Adam (``capturable=True``) captured whole in one CUDA graph per batch size.

With ``--stock`` each pyro-vae row gains a twin whose prior, likelihood and guide build
Pyro's own ``dist.Normal`` and ``dist.Bernoulli`` instead of ``components/distributions.py``'s
(same values and derivatives, tested): the pair says what those buy on that path.
"""

import argparse
import gc
import json
import math
import platform
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from _common import default_data_dir, run_main
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_vae import Config, ImageBatches, load_dataset
from pyro_vae.components.nets import mlp
from pyro_vae.inference.divergence import Guard
from pyro_vae.models.kinds import build_vae
from pyro_vae.models.vae import VAE
from pyro_vae.training.devices import resolve_device
from pyro_vae.training.train import make_svi

ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "numpyro_vae.py"


class HandWrittenVAE(nn.Module):
    """The usual PyTorch VAE: reparameterized z, BCE-with-logits, closed-form Gaussian KL."""

    def __init__(self, data_dim=784, hidden=400, latent_dim=50):
        super().__init__()
        self.encoder = mlp([data_dim, hidden, 2 * latent_dim])
        self.decoder = mlp([latent_dim, hidden, data_dim])

    def loss(self, x):
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        z = loc + log_scale.exp() * torch.randn_like(loc)
        logits = self.decoder(z)
        nll = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (loc.pow(2) + (2 * log_scale).exp() - 1 - 2 * log_scale).sum()
        return nll + kl


def paired_ratio(rates: list[float], baseline: list[float]) -> float:
    """The median over rounds of each round's ratio to the baseline.

    Each round times every implementation back to back, so a round's ratio compares
    them under the same load; one slow round moves a ratio of medians, not this.
    """
    return statistics.median(a / b for a, b in zip(rates, baseline, strict=True))


class StockNormalGuide(nn.Module):
    """The default guide, q(z|x) = N(loc, exp(log_scale)), on Pyro's own Normal."""

    def __init__(self, latent_dim):
        super().__init__()
        self.param_dim = 2 * latent_dim

    def forward(self, params):
        loc, log_scale = params.chunk(2, dim=-1)
        return dist.Normal(loc, log_scale.exp()).to_event(1)


class StockNormalPrior(nn.Module):
    """The default prior, N(0, I), on Pyro's own Normal."""

    def __init__(self, latent_dim):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))

    def forward(self):
        return dist.Normal(self.loc, torch.ones_like(self.loc)).to_event(1)


class StockBernoulli(nn.Module):
    """The default likelihood, Bernoulli on logits, on Pyro's own Bernoulli."""

    def __init__(self, data_dim):
        super().__init__()
        self.param_dim = data_dim

    def forward(self, logits):
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)


def build_benchmark_vae(config, data, device, stock=False):
    """The default VAE; with ``stock``, its components on Pyro's own distributions."""
    if not stock:
        return build_vae(config, data.dataset.image_shape).to(device)
    shape, latent_dim = data.dataset.image_shape, config.model.latent_dim
    components = {"prior": StockNormalPrior(latent_dim), "guide": StockNormalGuide(latent_dim)}
    components["likelihood"] = StockBernoulli(math.prod(shape))
    return VAE(shape, latent_dim=latent_dim, **components).to(device)


def pyro_vae_step(data, device, elbo="trace", stock=False):
    """pyro-vae's training step on its own in-memory uint8 batches."""
    config = Config()
    config.inference.elbo = elbo
    vae = build_benchmark_vae(config, data, device, stock)
    svi, _, _ = make_svi(vae, config)
    guard = Guard(vae.parameters(), Path("runs/throughput"), 0)  # the loop's per-step check

    def step(index):
        with pyro.validation_enabled(config.train.validate):
            return guard.step(svi.step, data.batch(index), epoch=1, step=1)

    return step


def pyro_vae_compiled_step(data, device, elbo="trace", mode="inductor", stock=False):
    """pyro-vae's step traced and compiled with inductor (``--compile inductor``), or
    captured in a CUDA graph (``mode="cudagraph"``); the compile (about 20 s per batch
    shape on 2 cores) or the capture happens at the warm-up, not timed."""
    from pyro_vae.training.compiled import CAPTURED, InGraphBatches, traced_step

    config = Config()
    config.inference.elbo = elbo
    vae = build_benchmark_vae(config, data, device, stock)
    svi, optimizer, estimator = make_svi(vae, config)
    guard = Guard(vae.parameters(), Path("runs/throughput"), 0)
    step_fn = []
    # As `pyro-vae train` does: a captured step makes its batch in its graph where the
    # batches are drawn on the device.
    batches = None
    if mode in CAPTURED and data.draws_on_device:
        batches = InGraphBatches(lambda index: vae.step_args(data, index), data.generator_kept)

    def step(index):
        args = (index,) if batches else (data.batch(index),)
        with pyro.validation_enabled(False):
            if not step_fn:
                made = traced_step(vae, estimator, optimizer, mode, args, elbo, batches=batches)
                if made is None:  # not traceable: Pyro's eager step, said once
                    made = (lambda index: svi.step(*batches(index))) if batches else svi.step
                step_fn.append(made)
            return guard.step(step_fn[0], *args, epoch=1, step=1)

    return step


def pyro_vae_captured_step(data, device, elbo="trace", stock=False):
    return pyro_vae_compiled_step(data, device, elbo, mode="cudagraph", stock=stock)


def pyro_vae_captured_inductor_step(data, device, elbo="trace", stock=False):
    return pyro_vae_compiled_step(data, device, elbo, mode="inductor-cudagraph", stock=stock)


def hand_written_step(data, device, elbo=None):
    """The usual script: float images in memory, torch.bernoulli per batch, eager PyTorch."""
    images = data.train_images.float() / data.dataset.levels
    model = HandWrittenVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(index):
        x = torch.bernoulli(images[index])
        optimizer.zero_grad()
        loss = model.loss(x)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def hand_written_graphed_step(data, device, elbo=None):
    """The hand-written step whole in one CUDA graph per batch size: the batch gathered
    and binarized from the images on the device, forward, backward and a capturable
    Adam; each call copies its indices in and replays. Its warm-up steps train too."""
    images = data.train_images.float() / data.dataset.levels
    model = HandWrittenVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    graphs = {}

    def whole_step(index):
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(torch.bernoulli(images[index]))
        loss.backward()
        optimizer.step()
        return loss

    def step(index):
        if len(index) not in graphs:
            static_index = index.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    whole_step(static_index)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                loss = whole_step(static_index)
            graphs[len(index)] = (graph, static_index, loss)
        graph, static_index, loss = graphs[len(index)]
        static_index.copy_(index)
        graph.replay()
        return loss

    return step


class PlainPyroVAE(nn.Module):
    """A VAE as Pyro's examples write one: pyro.module, probabilities through a sigmoid."""

    def __init__(self, data_dim=784, hidden=400, latent_dim=50):
        super().__init__()
        self.encoder = mlp([data_dim, hidden, 2 * latent_dim])
        self.decoder = mlp([latent_dim, hidden, data_dim])
        self.latent_dim = latent_dim

    def model(self, x):
        pyro.module("plain_decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[0], self.latent_dim)
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            probs = torch.sigmoid(self.decoder(z))
            pyro.sample("x", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("plain_encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def plain_pyro_step(data, device, elbo=None):
    """Pyro's example style: SVI, Trace_ELBO, pyro.optim.Adam, Pyro's default validation."""
    images = data.train_images.float() / data.dataset.levels
    vae = PlainPyroVAE().to(device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=Trace_ELBO())

    def step(index):
        return svi.step(torch.bernoulli(images[index]))

    return step


BASELINE = "hand-written PyTorch"
IMPLEMENTATIONS = {
    "pyro-vae": pyro_vae_step,
    "hand-written PyTorch": hand_written_step,
    "plain Pyro (its examples' style)": plain_pyro_step,
}


def images_per_second(step, data, batch_size, steps):
    gc.collect()  # garbage left by the previous block is not this block's cost
    n = data.num_train
    order = torch.randperm(n, device=data.train_images.device)
    start = time.perf_counter()
    for i in range(steps):
        index = order[(i * batch_size) % (n - batch_size) :][:batch_size]
        step(index)
    if data.train_images.is_cuda:
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def numpyro_reference(python, data_root, batch_size):
    out = subprocess.run(
        [python, str(ANCHOR), str(data_root), str(batch_size)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    for line in out.stdout.splitlines():
        if line.startswith("numpyro_jit_epoch"):
            return float(line.split()[1])
    raise RuntimeError(f"NumPyro reference printed no result: {out.stderr[-500:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and implementation")
    parser.add_argument("--quick", action="store_true", help="8 rounds of 0.75 s (under 2 minutes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--elbo", default="trace", help="pyro-vae's estimator (default trace)")
    parser.add_argument("--numpyro-python", default=None)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add pyro-vae's step compiled with inductor (about 20 s of compiling per batch size)",
    )
    parser.add_argument(
        "--cudagraph",
        action="store_true",
        help="on a GPU, add pyro-vae's step captured in a CUDA graph and the hand-written "
        "step whole in one CUDA graph",
    )
    parser.add_argument(
        "--stock",
        action="store_true",
        help="add each pyro-vae row again on Pyro's stock Normal and Bernoulli",
    )
    parser.add_argument("--out", default="runs/throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 8, 0.75

    device = resolve_device(args.device)
    pyro.set_rng_seed(0)
    data = ImageBatches(load_dataset("mnist", args.data_dir), "dynamic", device)
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        makers = dict(IMPLEMENTATIONS)
        if args.compile:
            makers["pyro-vae --compile inductor"] = pyro_vae_compiled_step
        if args.cudagraph and device.type == "cuda":
            makers["pyro-vae --compile cudagraph"] = pyro_vae_captured_step
            makers["pyro-vae --compile inductor-cudagraph"] = pyro_vae_captured_inductor_step
            makers["hand-written PyTorch, whole step in one CUDA graph"] = hand_written_graphed_step
        elif args.cudagraph and batch_size == int(args.batch_sizes.split(",")[0]):
            print("--cudagraph: CUDA graphs need a GPU; the rows are skipped on", device)
        if args.stock:
            for name in [n for n in makers if n.startswith("pyro-vae")]:
                makers[f"{name}, Pyro's stock distributions"] = partial(makers[name], stock=True)
        steps = {name: make(data, device, args.elbo) for name, make in makers.items()}
        # Warm up (first-call costs, allocator) and size each timed block to ~args.seconds.
        block = {}
        for name, step in steps.items():
            rate = images_per_second(step, data, batch_size, 20)
            block[name] = max(10, int(args.seconds * rate / batch_size))
        rates = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                rates[name].append(images_per_second(step, data, batch_size, block[name]))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        ratios = {name: paired_ratio(r, rates[BASELINE]) for name, r in rates.items()}
        row = {"batch_size": batch_size, "images_per_second": medians, "ratios": ratios}
        row["rounds"] = rates
        if args.numpyro_python:
            rate = numpyro_reference(args.numpyro_python, Path(args.data_dir or "."), batch_size)
            row["images_per_second"]["NumPyro jitted epoch"] = rate
            row["ratios"]["NumPyro jitted epoch"] = rate / medians[BASELINE]  # one run
        results.append(row)

    cpu = platform.processor() or platform.machine()
    print(
        f"pyro-vae estimator {args.elbo}; "
        f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu}"
    )
    print(f"{args.rounds} interleaved rounds of ~{args.seconds:g} s per implementation")
    print("| batch | implementation | images/s (median) | vs hand-written PyTorch (median) |")
    print("|---|---|---|---|")
    for row in results:
        for name, rate in row["images_per_second"].items():
            ratio = row["ratios"][name]
            print(f"| {row['batch_size']} | {name} | {rate:,.0f} | {ratio:.2f} |")
    for row in results:
        ratio = row["ratios"]["pyro-vae"]
        print(f"ratio pyro-vae / hand-written at batch {row['batch_size']}: {ratio:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"device": str(device), "elbo": args.elbo, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    run_main(main)
