"""A corpus of hostile input files, made by the tests (no committed blobs).

:func:`make_corpus` writes valid statistics files of every format next to damaged, forged and
hostile ones (deep JSON, huge integers, huge CSV fields, npz headers declaring 10¹² elements,
string/structured/complex/int/meta/sparse tensors, HDF5 links and string datasets, empty and
header-only files, files without BN layers, zero-length layers, a FIFO, a link to a device).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

STATS_CSV = "layer,channel,mean,var,count\nbn,0,0.5,2.5,500\nbn,1,-0.25,1.75,500\n"


def _torch_files(folder: Path) -> dict[str, Path]:
    import torch

    def sd(var: object) -> dict[str, object]:
        return {
            "bn.weight": torch.ones(4),
            "bn.bias": torch.zeros(4),
            "bn.running_mean": torch.zeros(4),
            "bn.running_var": var,
            "bn.num_batches_tracked": torch.tensor(3),
        }

    variants = {
        "good.pt": torch.full((4,), 1.5),
        "int_var.pt": torch.tensor([3, 3, 3, 3], dtype=torch.int64),
        "complex_var.pt": torch.ones(4, dtype=torch.complex64),
        "meta_var.pt": torch.ones(4, device="meta"),
        "sparse_var.pt": torch.ones(4).to_sparse(),
    }
    out = {}
    for name, var in variants.items():
        torch.save(sd(var), folder / name)
        out[name] = folder / name
    torch.save({"linear.weight": torch.ones(2, 2)}, folder / "no_bn.pt")
    out["no_bn.pt"] = folder / "no_bn.pt"
    return out


def _h5_files(folder: Path) -> dict[str, Path]:
    import h5py

    def make(name: str, fix: str) -> Path:
        path = folder / name
        with h5py.File(path, "w") as fh:
            group = fh.create_group("layers/batch_normalization/vars")
            group.attrs["name"] = "batch_normalization"
            for i, v in enumerate([np.ones(4), np.zeros(4), np.zeros(4), np.full(4, 1.5)]):
                group.create_dataset(str(i), data=v.astype("f4"))
            if fix:
                del group["3"]
            if fix == "string":
                group.create_dataset("3", data=np.array([b"a"] * 4))
            elif fix == "compound":
                group.create_dataset("3", data=np.zeros(4, dtype=[("x", "f4"), ("y", "i4")]))
            elif fix == "soft":
                group["3"] = h5py.SoftLink("/layers/batch_normalization/vars/2")
            elif fix == "external":
                group["3"] = h5py.ExternalLink("good.weights.h5", "/layers")
        return path

    fixes = {"good": "", "string": "string", "compound": "compound", "soft": "soft"}
    fixes["external"] = "external"
    return {f"{k}.weights.h5": make(f"{k}.weights.h5", v) for k, v in fixes.items()}


def _npz_files(folder: Path) -> dict[str, Path]:
    out = {}

    def save(name: str, mean: np.ndarray, var: np.ndarray) -> None:
        np.savez(folder / name, **{"bn.running_mean": mean, "bn.running_var": var})
        out[name] = folder / name

    save("good.npz", np.zeros(3), np.full(3, 1.5))
    save("string.npz", np.array(["a"]), np.array(["b"]))
    save("structured.npz", np.zeros(2, dtype=[("x", "f4")]), np.zeros(2, dtype=[("x", "f4")]))
    save("complex.npz", np.zeros(2, complex), np.ones(2, complex))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    )
    with zipfile.ZipFile(folder / "huge_header.npz", "w") as zf:
        zf.writestr("bn.running_mean.npy", header.getvalue() + b"\0" * 64)
        zf.writestr("bn.running_var.npy", header.getvalue() + b"\0" * 64)
    out["huge_header.npz"] = folder / "huge_header.npz"
    return out


def _npy_files(folder: Path) -> dict[str, Path]:
    """Activation files for ``simulate --input``: good, and with hostile headers."""
    arrays: dict[str, np.ndarray] = {
        "activations.npy": np.linspace(-1.0, 1.0, 128).reshape(64, 2),
        "object.npy": np.array([{"a": 1}, None], dtype=object),  # a pickle inside
        "structured.npy": np.zeros(4, dtype=[("x", "f8"), ("y", "i4")]),
        "string.npy": np.array(["a", "b"]),
        "complex.npy": np.zeros(4, complex),
    }
    out = {}
    for name, arr in arrays.items():
        np.save(folder / name, arr, allow_pickle=True)
        out[name] = folder / name
    for name, shape in (("huge_header.npy", (10**12,)), ("short.npy", (1000, 4))):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f8", "fortran_order": False, "shape": shape}
        )
        (folder / name).write_bytes(header.getvalue() + b"\0" * 64)
        out[name] = folder / name
    return out


def _text_files(folder: Path) -> dict[str, Path]:
    texts = {
        "good.csv": STATS_CSV,
        "good.json": json.dumps({"layers": {"bn": {"mean": [0.5, -0.25], "var": [2.5, 1.75]}}}),
        "empty.json": "",
        "no_layers.json": '{"layers": {}}',
        "zero_length.json": '{"layers": {"bn": {"mean": [], "var": []}}}',
        "header_only.csv": "layer,channel,mean,var,count\n",
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "digits5000.json": '{"layers": {"bn": {"mean": [1], "var": [' + "9" * 5000 + "]}}}",
        "digits400.json": '{"layers": {"bn": {"mean": [1], "var": [' + "9" * 400 + "]}}}",
        "huge_field.csv": "layer,channel,mean,var,count\n" + "x" * 200_000 + ",0,1,1,1\n",
        "wide_header.csv": ",".join(f"column{i}" for i in range(30_000)) + "\n1\n",
        "truncated.json": '{"layers": {"bn": {"mean": [0.5',
        "nan.csv": "layer,channel,mean,var,count\nbn,0,nan,-1,5\n",
        "not_utf8.csv": "",
        "report.json": json.dumps({"rows": []}),
    }
    out = {}
    for name, text in texts.items():
        (folder / name).write_text(text)
        out[name] = folder / name
    (folder / "not_utf8.csv").write_bytes(b"layer,channel,mean,var\n\xff\xfe,0,1,1\n")
    return out


def _special_files(folder: Path) -> dict[str, Path]:
    out = {}
    fifo = folder / "fifo.csv"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
        out["fifo.csv"] = fifo
    device = Path("/dev/urandom")
    if device.exists():
        (folder / "urandom.json").symlink_to(device)
        out["urandom.json"] = folder / "urandom.json"
    return out


def make_corpus(folder: Path) -> dict[str, Path]:
    """Write the corpus into ``folder``; return file name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = {**_text_files(folder), **_npz_files(folder), **_special_files(folder)}
    corpus.update(_npy_files(folder))
    try:
        corpus.update(_torch_files(folder))
    except ImportError:  # pragma: no cover - torch extra missing
        pass
    try:
        corpus.update(_h5_files(folder))
    except ImportError:  # pragma: no cover - h5py extra missing
        pass
    return corpus


def snapshot(corpus: dict[str, Path]) -> dict[str, bytes]:
    """The bytes of every regular file of the corpus (to prove none was modified)."""
    return {n: p.read_bytes() for n, p in corpus.items() if p.is_file() and not p.is_symlink()}
