"""Where a graph's weights live in a bundle: inside the graph file, or, for a graph over protobuf's 2 GB limit, in
one file beside it, `<graph>_data` (which the offline optimization in export/bundle.py renames
`<graph>.weights`).

torch.onnx writes a large graph's tensors one file each, named after the tensors (`onnx__MatMul_3358`,
`_Constant_24_attr__value`), and Optimum gathers only the initializers among them. So every graph is exported into
a folder of its own and moved into the bundle with all its external tensors gathered in one file: no two graphs'
tensor files of the same name meet, and no loose tensor files are left in the bundle.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx


def external_data(path: Path) -> Path:
    """The one file that holds a large graph's weights."""
    return path.with_name(path.name + "_data")


def bundle_weights(path: Path) -> Path:
    """Where a large graph's weights are in the bundle: beside it as <name>.weights (export/bundle.py's _optimize
    writes them there)."""
    return path.with_name(path.name + ".weights")


@contextmanager
def exporting(folder: Path, file: str):
    """Yields the path to export `file` to, in a fresh folder inside `folder`; afterwards the graph is at
    folder/file with any external tensors in external_data(folder/file), and the fresh folder is gone."""
    work = Path(tempfile.mkdtemp(prefix=f".{file}-", dir=folder))
    try:
        yield work / file
        gather(work / file, Path(folder) / file)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def gather(exported: Path, path: Path) -> None:
    """Moves the graph at `exported` to `path`, the files of its external tensors (every other file in its folder)
    gathered into external_data(path)."""
    others = [p for p in exported.parent.iterdir() if p != exported]
    if others == [external_data(exported)]:  # already gathered (Optimum's own convention)
        os.replace(others[0], external_data(path))
    elif others:
        save(onnx.load(str(exported)), path, external_data(path))  # initializers and constant attributes
        return
    os.replace(exported, path)


def save(model: onnx.ModelProto, path: Path, weights: Path | None) -> None:
    """Writes model to path, its tensors of 1 KiB or more in the one file `weights` beside it (None: inside)."""
    if weights is None:
        onnx.save(model, str(path))
        return
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=weights.name,
        size_threshold=1024,
    )
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)  # onnx writes it private (0600); it is as readable as the graph beside it
