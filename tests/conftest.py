import pytest

from maria_onnx.tools.tiny import make_pair, write_corpus


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """ar_type -> (mlm_dir, ar_dir) of tiny random backbones, built once per session."""
    root = tmp_path_factory.mktemp("backbones")
    return {ar_type: make_pair(root, ar_type) for ar_type in ("olmo", "olmo2", "llama", "qwen2")}


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "train.txt")


@pytest.fixture(scope="session")
def checkpoints(pairs, tmp_path_factory):
    """ar_type -> checkpoint folder over the tiny pair."""
    from maria_onnx.tools.tiny import make_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {ar_type: make_checkpoint(*pair, root / ar_type) for ar_type, pair in pairs.items()}


@pytest.fixture(scope="session")
def bundles(checkpoints, tmp_path_factory):
    """ar_type -> fp32 bundle exported from its checkpoint."""
    from maria_onnx.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    for ar_type, checkpoint in checkpoints.items():
        export_bundle(checkpoint, root / ar_type)
    return {ar_type: root / ar_type for ar_type in checkpoints}
