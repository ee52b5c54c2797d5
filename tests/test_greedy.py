"""The greedy choice where the logits are (runtime/graphs/greedy.onnx, export/greedy.py): the shipped graph is the
one the module builds, it chooses as runtime/choose.py's best_tokens does, and the decode engine with IO binding
(the path a GPU takes: the fusion head's and the MLM head's logits left in the session's memory, only ids and
log-probabilities read back) fills as without it, speculating or not."""

import numpy as np
import onnxruntime as ort
import pytest
from test_speculate import WINDOWS, assert_same, fills

from maria_onnx.export.greedy import GREEDY_FILE, greedy_graph
from maria_onnx.runtime.choose import best_tokens, refused_matrix
from maria_onnx.runtime.evaluate import draw_masks
from maria_onnx.runtime.infiller import Infiller


def test_the_shipped_graph_is_the_one_export_builds():
    assert GREEDY_FILE.read_bytes() == greedy_graph().SerializeToString()


def test_the_graph_chooses_as_best_tokens():
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((7, 3000))).astype(np.float32)
    logits[2, [40, 41]] = 30.0  # a tie: the first of equals, as numpy's argmax
    logits[3, 5] = 60.0  # the best id is refused: the next best is chosen
    banned = [0, 1, 2]
    refused = [None, np.array([9, 10]), None, np.array([5]), np.zeros(0, dtype=np.int64), None, np.arange(3, 1500)]
    matrix = refused_matrix(banned, refused, len(logits))
    assert matrix.shape == (7, 3 + 1497) and set(matrix[0]) == set(banned)
    session = ort.InferenceSession(str(GREEDY_FILE), providers=["CPUExecutionProvider"])
    ids, logprobs, allowed = session.run(None, {"logits": logits, "refused": matrix})
    want, want_logprobs = best_tokens(logits, banned, refused)
    _, want_allowed = best_tokens(logits, banned, refused, allowed=True)
    assert np.array_equal(ids, want) and ids[2] == 40 and ids[3] != 5 and ids[6] >= 1500
    np.testing.assert_allclose(logprobs, want_logprobs, atol=2e-6)
    np.testing.assert_allclose(allowed, want_allowed, atol=2e-6)
    assert (allowed >= logprobs).all() and allowed[3] > logprobs[3] + 40  # the refused ids' share is gone


@pytest.mark.parametrize("speculate", [0, 4])
def test_the_engine_with_io_binding_chooses_on_the_graph_and_fills_the_same(speculate):
    """The default model's test windows, masked at 0.5, and a text whose fills must keep multi-byte characters whole
    (the refused ids go to the graph): the same fills, drafts and kept drafts with the logits read back and with
    only the choices read back."""
    plain = Infiller(device="cpu", decoder="engine")
    bound = Infiller(device="cpu", decoder="engine", io_binding=True)
    windows = list(np.load(WINDOWS)[:12])
    masked = [draw_masks([x], 0.5, 40 + i)[0] for i, x in enumerate(windows)]
    text = plain.encode("Größe [MASK:4] café [MASK:3] naïve")
    ids, masks = [*windows, text.ids], [*masked, text.masked]

    def host_logits(*args):
        raise AssertionError("a greedy step read the fusion head's logits back")

    bound.backend.fuse = host_logits
    bound.backend.mlm_logits = host_logits
    want, plain_engine = fills(plain, ids, masks, slots=4, speculate=speculate)
    got, bound_engine = fills(bound, ids, masks, slots=4, speculate=speculate)
    assert_same(got, want, atol=1e-5)
    assert bound.backend.greedy is not None and (bound_engine.drafted, bound_engine.kept) == (
        plain_engine.drafted,
        plain_engine.kept,
    )
    assert (bound_engine.kept > 0) == (speculate > 0)
