"""One benchmark measurement in a fresh process; ``bench/run.py`` starts it and reads its JSON.

Why a fresh process per measurement: glibc's malloc adapts its mmap and trim thresholds to the
sizes a process has freed before, so how fast a vectorised NumPy run is depends on what else ran
earlier in the same process (seen here: the same engine call 60 ms or 95 ms). Every timing
therefore starts from the same state: import, one untimed warm-up run, then ``repeat`` timed
runs with the garbage collector off during each (as ``timeit`` does).

The classic experiment (project issue 3): 10000 × 5 inputs from Normal(5, 2²), dropout rate 0.2,
batch 32 (312 full batches and one of 16 per epoch), 100 epochs, Keras' BatchNorm convention
(decay 0.99, biased stored variance) — 31300 training steps.

Usage::

    python bench/measure.py time NAME --repeat K   # NAME: engine, engine-fit, numpy, torch, floor
    python bench/measure.py memory EPOCHS --mode rss|tracemalloc|baseline
    python bench/measure.py profile engine        # cProfile of one engine run, by phase
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

ROWS = 10_000
FEATURES = 5
MEAN = 5.0
STD = 2.0
RATE = 0.2
BATCH = 32
EPOCHS = 100
DECAY = 0.99  # Keras' momentum 0.99 = weight of the old value; PyTorch momentum 0.01
SEED = 12345
FLOOR_BUFFER = 1 << 16  # uniforms per reused buffer in the floor (512 KiB: stays in cache)

Stats = dict[str, list[float]]


def steps(epochs: int = EPOCHS) -> int:
    """Training steps of the classic schedule: ``ceil(ROWS / BATCH)`` batches per epoch."""
    return epochs * -(-ROWS // BATCH)


# --- the implementations -----------------------------------------------------------------------


def classic_config(epochs: int = EPOCHS, *, fit: bool = False) -> Any:
    """The classic experiment as a :class:`varshift.engine.SimConfig` (statistics only)."""
    from varshift.core.presets import resolve_preset
    from varshift.engine import SimConfig

    return SimConfig(
        rate=RATE,
        preset=resolve_preset("keras"),
        batch_size=BATCH,
        samples=ROWS,
        epochs=epochs,
        features=FEATURES,
        input_dist="normal",
        mean=MEAN,
        std=STD,
        fit=fit,
    )


def run_engine(epochs: int = EPOCHS, *, fit: bool = False, seed: int = SEED) -> Stats:
    """``varshift.engine.simulate`` on the classic experiment; its final running statistics."""
    from varshift.engine import simulate

    res = simulate(classic_config(epochs, fit=fit), rng=seed)
    return {
        "running_mean": [r.running_mean for r in res.features],
        "running_var": [r.running_var for r in res.features],
        "input_mean": [r.input_mean for r in res.features],
        "input_var": [r.input_var for r in res.features],
    }


def numpy_loop(epochs: int = EPOCHS, seed: int = SEED) -> Stats:
    """Reference (a): the per-batch loop a user would write, Keras' statistics (biased, 0.99)."""
    rng = np.random.default_rng(seed)
    keep = 1.0 - RATE
    x = rng.normal(MEAN, STD, size=(ROWS, FEATURES))
    running_mean = np.zeros(FEATURES)
    running_var = np.ones(FEATURES)
    for _ in range(epochs):
        perm = rng.permutation(ROWS)
        for start in range(0, ROWS, BATCH):
            xb = x[perm[start : start + BATCH]]
            mask = rng.random(xb.shape) < keep
            yb = xb * mask / keep  # inverted dropout
            running_mean = DECAY * running_mean + (1.0 - DECAY) * yb.mean(axis=0)
            running_var = DECAY * running_var + (1.0 - DECAY) * yb.var(axis=0)  # biased (÷ n)
    return {
        "running_mean": running_mean.tolist(),
        "running_var": running_var.tolist(),
        "input_mean": x.mean(axis=0).tolist(),
        "input_var": x.var(axis=0).tolist(),
    }


def torch_loop(epochs: int = EPOCHS, seed: int = SEED) -> Stats:
    """Reference (b): ``nn.Dropout`` + ``nn.BatchNorm1d`` in train mode, eager, float32.

    ``momentum=0.01`` is PyTorch's weight of the new batch, i.e. decay 0.99 like Keras; PyTorch
    stores the *unbiased* batch variance (the consistency check uses the torch preset for it).
    """
    import torch

    torch.manual_seed(seed)
    x = torch.randn(ROWS, FEATURES) * STD + MEAN  # float32, torch's default dtype
    dropout = torch.nn.Dropout(RATE).train()
    bn = torch.nn.BatchNorm1d(FEATURES, momentum=1.0 - DECAY).train()
    with torch.no_grad():
        for _ in range(epochs):
            perm = torch.randperm(ROWS)
            for start in range(0, ROWS, BATCH):
                bn(dropout(x[perm[start : start + BATCH]]))
    return {
        "running_mean": bn.running_mean.double().tolist(),
        "running_var": bn.running_var.double().tolist(),
        "input_mean": x.double().mean(dim=0).tolist(),
        "input_var": x.double().var(dim=0, unbiased=False).tolist(),
    }


def floor_draws(epochs: int = EPOCHS, seed: int = SEED) -> Stats:
    """Reference (c): only the random numbers the engine consumes, as fast as NumPy draws them.

    The same streams as ``simulate`` (``default_rng(seed).spawn(4)``): the dataset's normals, one
    permutation of the rows per epoch, and one float64 uniform per dropout element, drawn into a
    reused cache-sized buffer (no allocation, no page faults).
    """
    rng_data, _, rng_perm, rng_noise = np.random.default_rng(seed).spawn(4)
    rng_data.standard_normal((ROWS, FEATURES))
    for _ in range(epochs):
        rng_perm.permutation(ROWS)
    buf = np.empty(FLOOR_BUFFER)
    full, rest = divmod(epochs * ROWS * FEATURES, FLOOR_BUFFER)
    for _ in range(full):
        rng_noise.random(out=buf)
    if rest:
        rng_noise.random(out=buf[:rest])
    return {}


def engine_consumption(epochs: int = EPOCHS) -> dict[str, int]:
    """What the engine actually draws for the classic run, counted with ``observer=``."""
    from varshift.engine import Chunk, simulate

    seen = {"noise_elements": 0, "epochs": 0}

    def count(chunk: Chunk) -> None:
        seen["noise_elements"] += int(chunk.noise.size)
        seen["epochs"] = max(seen["epochs"], int(chunk.epochs.max()) + 1)

    simulate(classic_config(epochs), rng=SEED, observer=count)
    return seen


IMPLEMENTATIONS: dict[str, Callable[[], Stats]] = {
    "engine": run_engine,
    "engine-fit": lambda: run_engine(fit=True),
    "numpy": numpy_loop,
    "torch": torch_loop,
    "floor": floor_draws,
}


def _timed(fn: Callable[[], Stats]) -> tuple[float, Stats]:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out
    finally:
        gc.enable()


def time_one(name: str, repeat: int) -> dict[str, Any]:
    """Warm up once, then time ``repeat`` runs; the last run's statistics for the check."""
    fn = IMPLEMENTATIONS[name]
    info: dict[str, Any] = {"name": name}
    if name == "torch":
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
        torch_loop(epochs=2)  # warm-up: a short run is enough for eager PyTorch
    else:
        fn()
    times = []
    stats: Stats = {}
    for _ in range(repeat):
        t, stats = _timed(fn)
        times.append(t)
    if name == "floor":
        info["consumption"] = engine_consumption()
        info["floor_counts"] = {"noise_elements": EPOCHS * ROWS * FEATURES, "epochs": EPOCHS}
    return {**info, "times": times, "stats": stats}


#: Phases of one engine run: (file, function) in cProfile's terms → label. Disjoint calls.
PHASES = {
    ("sampling.py", "draw_synthetic"): "draw the dataset",
    ("run.py", "_permute"): "one permutation per epoch (RNG)",
    ("~", "<method 'take' of 'numpy.ndarray' objects>"): "gather the rows (np.take)",
    ("dropout.py", "sample_keep"): "dropout noise: uniforms, keep mask (RNG)",
    ("bn.py", "split_stats"): "batch means and variances",
    ("bn.py", "advance"): "EMA updates",
    ("assemble.py", "assemble"): "theory band from the dataset, result",
}


def profile_engine(repeat: int = 3) -> dict[str, Any]:
    """cProfile of an engine run after a warm-up, summed into :data:`PHASES`; of ``repeat``
    profiled runs the fastest is kept (the least disturbed by other load)."""
    import cProfile
    import pstats
    from pathlib import Path

    run_engine()
    runs = []
    for _ in range(repeat):
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        run_engine()
        prof.disable()
        runs.append((time.perf_counter() - start, prof))
    total, prof = min(runs, key=lambda r: r[0])

    spent = dict.fromkeys(PHASES.values(), 0.0)
    table = pstats.Stats(prof).stats
    for (file, _line, func), (_, _, _, cumtime, _) in table.items():
        name = Path(file).name if file != "~" else "~"
        label = PHASES.get((name, func))
        if label is not None:
            spent[label] += cumtime
    return {"total": total, "phases": spent}


# --- memory ------------------------------------------------------------------------------------


def memory_one(epochs: int, mode: str) -> dict[str, Any]:
    """Run the classic experiment for ``epochs``; report the peak of the traced heap.

    ``rss``: nothing traced here; the parent reads this process's peak RSS from ``wait4``.
    ``tracemalloc``: peak of Python and NumPy allocations during the run (NumPy reports its data
    buffers to tracemalloc), excluding the interpreter and imported modules.
    ``baseline``: imports only, for the RSS every run starts from.
    """
    import varshift.engine  # noqa: F401  (the imports a run pays for, in every mode)

    out: dict[str, Any] = {"epochs": epochs, "mode": mode, "steps": steps(epochs)}
    if mode == "baseline":
        return out
    if mode == "tracemalloc":
        tracemalloc.start()
    start = time.perf_counter()
    run_engine(epochs)
    out["seconds"] = time.perf_counter() - start
    if mode == "tracemalloc":
        out["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    out["self_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("time", "memory", "profile"))
    parser.add_argument("target", help="implementation name (time) or epochs (memory)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mode", choices=("rss", "tracemalloc", "baseline"), default="rss")
    args = parser.parse_args(argv)
    if args.command == "time":
        result = time_one(args.target, args.repeat)
    elif args.command == "profile":
        result = profile_engine()
    else:
        result = memory_one(int(args.target), args.mode)
    sys.stdout.write(json.dumps(result, allow_nan=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
