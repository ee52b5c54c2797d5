"""The decode engine over the step graph: parity with the PyTorch reference for every AR family, ragged chunks,
slots reused, sequences joining mid-run, the cache written in place and resized."""

import numpy as np
import pytest
from test_runtime import random_cases

from maria_onnx.checkpoint import load_maria
from maria_onnx.reference import reference_infill
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.decode import sequence_rngs
from maria_onnx.runtime.engine import Engine, engine_infill
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.manifest import load_manifest
from maria_onnx.runtime.onnx_backend import OnnxBackend
from maria_onnx.runtime.slots import SlotCache, capacity_for

FAMILIES = ["olmo", "olmo2", "llama", "qwen2"]


@pytest.mark.parametrize("ar_type", FAMILIES)
def test_engine_fills_equal_the_pytorch_reference(bundles, checkpoints, ar_type):
    """Nine sequences of ragged lengths and mask rates through 3 slots: chunks of different lengths in one step,
    slots freed and taken mid-run; greedy fills identical to PyTorch, log-probabilities within 1e-4."""
    backbones, head, _ = load_maria(checkpoints[ar_type])
    infiller = Infiller(bundles[ar_type], device="cpu")
    assert infiller.decoder == "engine"
    ids, masked = random_cases(np.random.default_rng(3), backbones.vocab_size, 9)
    got = infiller.fill_ids(ids, masked, batch_size=3)
    want = reference_infill(backbones, head, ids, masked, batch_size=9)
    for g, w in zip(got, want):
        assert np.array_equal(g.ids, w.ids) and np.array_equal(g.positions, w.positions)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)


def test_engine_and_concat_decoder_agree_when_sampling(bundles):
    ids, masked = random_cases(np.random.default_rng(4), 200, 7)
    sampling = Sampling(temperature=1.0, top_k=20, seed=5)
    engine = Infiller(bundles["llama"], device="cpu").fill_ids(ids, masked, sampling, batch_size=2)
    concat = Infiller(bundles["llama"], device="cpu", decoder="concat").fill_ids(ids, masked, sampling, batch_size=7)
    for a, b in zip(engine, concat):
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_sequences_joining_mid_run_fill_as_they_would_alone(bundles):
    infiller = Infiller(bundles["olmo"], device="cpu")
    ids, masked = random_cases(np.random.default_rng(5), 200, 4, rates=(0.5,))
    sampling = Sampling(temperature=1.2, seed=9)
    alone = [
        engine_infill(infiller.backend, [x], [m], infiller.special, sampling, 1, sequence_rngs(9, 4)[i : i + 1])[0]
        for i, (x, m) in enumerate(zip(ids, masked))
    ]
    engine = Engine(infiller.backend, infiller.special, slots=2)
    rngs = sequence_rngs(9, 4)
    first = engine.submit(ids[0], masked[0], sampling, rngs[0])
    engine.step()
    assert first.slot == 0 and first.filled == 1 and len(engine.active) == 1
    later = [engine.submit(x, m, sampling, rng) for x, m, rng in zip(ids[1:], masked[1:], rngs[1:])]
    finished, joined = [], {}
    while engine.busy:
        finished += engine.step()
        for s in [*engine.active.values(), *finished]:  # (the step it joined at, its slot)
            joined.setdefault(id(s), (engine.steps - 1, s.slot))
    assert len(finished) == 4 and engine.steps < sum(int(m.sum()) for m in masked)  # steps were shared
    assert joined[id(later[0])] == (1, 1)  # joined the running batch at step 1, slot 1
    assert {joined[id(s)][1] for s in later[1:]} <= {0, 1}  # took slots others had left
    for sequence, want in zip([first, *later], alone):
        fill = sequence.fill()
        assert np.array_equal(fill.ids, want.ids)
        np.testing.assert_allclose(fill.logprobs, want.logprobs, atol=1e-5)


def test_the_step_writes_the_cache_in_place(bundles):
    backend = Infiller(bundles["llama"], device="cpu").backend
    cache = backend.new_cache(3, 16)
    before = [cache.pointer(i) for i in range(len(cache.buffers))]
    position_ids = np.array([[0, 1, 2], [0, 1, 2]])
    backend.cache_step(np.array([[7, 8, 9], [10, 11, 12]]), position_ids, cache)
    assert [cache.pointer(i) for i in range(len(cache.buffers))] == before
    keys, values = cache.read(0), cache.read(1)  # [slots, kv, C, d]
    assert np.abs(values[:2, :, :3]).min(axis=-1).max() > 0 and not values[:2, :, 3:].any()
    assert not values[2].any() and not keys[2].any()  # the third slot was not in the step
    backend.cache_step(np.array([[13], [14]]), np.array([[3], [3]]), cache)
    assert np.array_equal(cache.read(1)[:2, :, :3], values[:2, :, :3]) and cache.read(1)[:2, :, 3].any()


def test_cache_resize_keeps_each_slot_and_device_buffers_work_the_same(bundles):
    cache = SlotCache(layers=1, kv_heads=2, head_dim=4, dtype=np.float32, slots=2, capacity=3)
    cache.buffers[0][:] = np.arange(2 * 2 * 3 * 4).reshape(2, 2, 3, 4)  # [slots, kv, C, d]
    cache.buffers[1][:] = -np.arange(2 * 2 * 3 * 4).reshape(2, 2, 4, 3)  # [slots, kv, d, C]
    keys, values = cache.read(0), cache.read(1)
    assert np.array_equal(values, cache.buffers[1].transpose(0, 1, 3, 2))  # read: positions on axis 2
    cache.resize(5)
    assert np.array_equal(cache.read(0)[:, :, :3], keys) and np.array_equal(cache.read(1)[:, :, :3], values)
    assert not cache.read(0)[:, :, 3:].any()
    cache.resize(2)
    assert np.array_equal(cache.read(0), keys[:, :, :2]) and np.array_equal(cache.read(1), values[:, :, :2])
    assert [capacity_for(n) for n in (1, 16, 17, 100, 1000, 1025)] == [16, 16, 32, 112, 1024, 1152]


@pytest.mark.parametrize("ortvalues", [False, True])
@pytest.mark.parametrize("values_transposed", [True, False])
def test_resizes_in_turn_keep_what_each_slot_holds_and_zero_the_rest(ortvalues, values_transposed):
    """Host buffers take turns in two arenas, so a resize writes over what an earlier one left there: every
    position past what is kept must come back zeroed, whatever the arena held. Values transposed (the eager step
    graph) or laid out as the keys (--attention fused)."""
    cache = SlotCache(
        layers=2,
        kv_heads=2,
        head_dim=4,
        dtype=np.float32,
        slots=3,
        capacity=4,
        ortvalues=ortvalues,
        values_transposed=values_transposed,
    )
    rng = np.random.default_rng(0)
    kept = 4
    written = [rng.random(cache.read(i).shape, dtype=np.float32) + 1 for i in range(4)]  # never zero
    for index, values in enumerate(written):
        host = values.transpose(0, 1, 3, 2).copy() if index % 2 and values_transposed else values
        if ortvalues:
            cache.buffers[index].update_inplace(host)
        else:
            cache.buffers[index][:] = host
    for capacity in (6, 9, 3, 12, 13, 5, 40):
        cache.resize(capacity)
        kept = min(kept, capacity)
        for index, values in enumerate(written):
            now = cache.read(index)
            assert now.shape == (3, 2, capacity, 4)
            assert np.array_equal(now[:, :, :kept], values[:, :, :kept]) and not now[:, :, kept:].any()


def test_a_shrink_lets_the_longer_buffers_memory_go():
    """After the longest sequences leave, the cache holds memory for its new capacity, not for the old one: a
    server keeps no copy of its longest request's cache once it serves short ones."""
    cache = SlotCache(layers=2, kv_heads=2, head_dim=4, dtype=np.float32, slots=3, capacity=16)
    buffers_bytes = lambda: sum(buffer.nbytes for buffer in cache.buffers)
    for capacity in (32, 48, 1024, 1152):
        cache.resize(capacity)
        assert cache.host_bytes <= 2.5 * buffers_bytes()
    grown = cache.host_bytes
    cache.resize(16)
    assert cache.host_bytes <= 2.5 * buffers_bytes() and cache.host_bytes < grown / 20
    assert not cache.read(0)[:, :, :16].any()


def test_the_device_path_on_the_cpu_gives_the_same_fills(bundles):
    """What runs on CUDA, exercised on the CPU execution provider: the cache in OrtValues, the step's inputs and
    output in persistent OrtValues per shape, every step over all slots with chunks padded to a power of two."""
    infiller = Infiller(bundles["olmo2"], device="cpu")
    ids, masked = random_cases(np.random.default_rng(6), 200, 5)
    plain = infiller.fill_ids(ids, masked, batch_size=3)
    backend = infiller.backend
    backend.on_device = True
    shapes, caches, step = [], [], backend.cache_step
    backend.cache_step = lambda x, p, cache: (
        shapes.append((x.shape, cache.capacity)) or caches.append(cache) or step(x, p, cache)
    )
    device_like = infiller.fill_ids(ids, masked, batch_size=3)
    for a, b in zip(plain, device_like):
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert all(rows == 3 and width & (width - 1) == 0 for (rows, width), _ in shapes)
    capacities = [capacity for _, capacity in shapes]
    assert capacities == sorted(capacities)  # sized when sequences join, never shrunk
    final = [shape for shape in shapes if shape[1] == capacities[-1]]
    assert len(caches[-1].bindings) < len(final)  # one binding per shape, reused across its steps


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_long_chunks_are_fed_a_few_tokens_a_step_with_the_same_fills(bundles, fixed_shapes):
    """A sequence whose next masked position lies more than max_chunk tokens on feeds max_chunk of them a step
    and fills nothing until it reaches it; the others fill one token a step meanwhile. Fills as in one chunk."""
    infiller = Infiller(bundles["olmo"], device="cpu")
    rng = np.random.default_rng(8)
    ids = [rng.integers(5, 200, n) for n in (40, 37, 12, 33)]
    masked = [np.zeros(len(x), bool) for x in ids]
    for m, at in zip(masked, ([35, 39], [1, 2, 30], [11], [0, 20, 21, 32])):
        m[at] = True
    sampling = Sampling(temperature=1.0, seed=3)
    whole = engine_infill(infiller.backend, ids, masked, infiller.special, sampling, 3, sequence_rngs(3, 4))
    backend = infiller.backend
    backend.on_device = fixed_shapes
    widths, step = [], backend.cache_step
    backend.cache_step = lambda x, p, cache: widths.append(x.shape[1]) or step(x, p, cache)
    engine = Engine(backend, infiller.special, slots=3, fixed_shapes=fixed_shapes, max_chunk=4)
    rngs = sequence_rngs(3, 4)
    sequences = [engine.submit(x, m, sampling, rng) for x, m, rng in zip(ids, masked, rngs)]
    first = engine.step()
    assert not first and [s.filled for s in sequences[:3]] == [0, 1, 0] and sequences[0].cursor == 4
    engine.run()
    assert max(widths) == 4 and engine.steps > sum(len(np.flatnonzero(m)) for m in masked) // 3
    for a, b in zip(whole, sequences):
        assert np.array_equal(a.ids, b.fill().ids)
        np.testing.assert_allclose(a.logprobs, b.fill().logprobs, atol=1e-5)


REFUSED = (
    "[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture feature as requested by the "
    "user as all compute graph nodes have not been partitioned to the CUDAExecutionProvider"
)


@pytest.mark.parametrize("error, refused", [(REFUSED, True), ("CUDA failure 2: out of memory", False)])
def test_a_refused_cuda_graph_capture_runs_the_step_without_it(bundles, monkeypatch, error, refused):
    """ONNX Runtime captures a CUDA graph only where every node runs on CUDA; where it refuses (shape arithmetic on
    the CPU), the step runs without capture and one warning says why. Any other error still stops."""
    from maria_onnx.runtime import onnx_backend
    from maria_onnx.runtime.sessions import cuda_providers, make_session

    class OnCuda:  # a CPU session that reports the CUDA provider, as it would on a GPU
        def __init__(self, session):
            self.session = session

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def __getattr__(self, name):
            return getattr(self.session, name)

    def session(path, providers, insist=False, threads=None):
        if "enable_cuda_graph" in providers[0][1]:
            raise RuntimeError(error)
        return OnCuda(make_session(path, ["CPUExecutionProvider"], threads=threads))

    monkeypatch.setattr(onnx_backend, "providers_for", lambda device: cuda_providers(0))
    monkeypatch.setattr(onnx_backend, "make_session", session)
    make = lambda: onnx_backend.OnnxBackend(
        bundles["olmo"], load_manifest(bundles["olmo"]), device="cuda", cuda_graph=True
    )
    if not refused:
        with pytest.raises(RuntimeError, match="out of memory"):
            make()
        return
    with pytest.warns(
        RuntimeWarning,
        match=r"CUDA graphs: ONNX Runtime does not capture this step graph \(.*"
        r"partitioned to the CUDAExecutionProvider\); running without capture",
    ):
        backend = make()
    assert backend.device == "cuda" and backend.step is not None and not backend.cuda_graph


def test_each_decoder_loads_only_its_own_graph_of_the_ar(bundles):
    """ar_step.onnx and ar_decoder.onnx hold the same weights: an Infiller loads the one its decoder runs, and
    scores and fills come out as with both loaded."""
    both = OnnxBackend(bundles["olmo"], load_manifest(bundles["olmo"]), device="cpu")
    engine, concat = Infiller(bundles["olmo"], device="cpu"), Infiller(bundles["olmo"], device="cpu", decoder="concat")
    assert both.ar is not None and both.step is not None
    assert engine.backend.ar is None and engine.backend.step is not None
    assert concat.backend.step is None and concat.backend.ar is not None
    ids, masked = random_cases(np.random.default_rng(8), 200, 6)
    np.testing.assert_allclose(engine.score(ids, masked), concat.score(ids, masked), atol=1e-4)
    assert [f.ids.tolist() for f in engine.fill_ids(ids, masked)] == [
        f.ids.tolist() for f in concat.fill_ids(ids, masked)
    ]


def test_decoder_switch_names_what_a_bundle_lacks(bundles, checkpoints, tmp_path):
    from maria_onnx.export.bundle import export_bundle

    with pytest.raises(ValueError, match="^decoder must be one of"):
        Infiller(bundles["olmo"], device="cpu", decoder="fast")
    lean = export_bundle(checkpoints["olmo"], tmp_path / "lean", concat_decoder=False)
    assert "ar_decoder" not in lean.graphs
    with pytest.raises(ValueError, match="needs ar_decoder.onnx"):
        Infiller(tmp_path / "lean", device="cpu", decoder="concat")
    infiller = Infiller(tmp_path / "lean", device="cpu")  # scores run on the step graph too
    ids, masked = random_cases(np.random.default_rng(7), 200, 4)
    full = Infiller(bundles["olmo"], device="cpu", decoder="concat")
    np.testing.assert_allclose(infiller.score(ids, masked), full.score(ids, masked), atol=1e-4)
    assert [f.ids.tolist() for f in infiller.fill_ids(ids, masked)] == [
        f.ids.tolist() for f in full.fill_ids(ids, masked)
    ]


def test_a_cancelled_sequence_frees_its_slot_and_leaves_the_others_unchanged(bundles):
    infiller = Infiller(bundles["llama"], device="cpu")
    ids, masked = random_cases(np.random.default_rng(8), 200, 3, rates=(0.6,))
    alone = engine_infill(infiller.backend, ids[:1], masked[:1], infiller.special, Sampling(), 1, sequence_rngs(0, 1))
    engine = Engine(infiller.backend, infiller.special, slots=2)
    kept, dropped, waiting = [engine.submit(x, m) for x, m in zip(ids, masked)]
    engine.step()
    engine.cancel(dropped)
    engine.cancel(waiting)
    assert list(engine.active.values()) == [kept] and not engine.waiting
    engine.run()
    assert np.array_equal(kept.fill().ids, alone[0].ids) and not dropped.done


def test_a_bundle_from_before_the_engine_fills_through_the_concat_decoder(bundles, tmp_path):
    """A schema-2 bundle (no ar_step.onnx) still loads: auto picks the concat decoder, the engine is refused."""
    import json
    import shutil

    folder = shutil.copytree(bundles["olmo"], tmp_path / "old")
    (folder / "ar_step.onnx").unlink()
    manifest = json.loads((folder / "maria.json").read_text())
    del manifest["graphs"]["ar_step"], manifest["files"]["ar_step.onnx"]
    (folder / "maria.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    old = Infiller(folder, device="cpu")
    assert old.decoder == "concat"
    ids, masked = random_cases(np.random.default_rng(9), 200, 4)
    want = Infiller(bundles["olmo"], device="cpu").fill_ids(ids, masked)
    assert [f.ids.tolist() for f in old.fill_ids(ids, masked)] == [f.ids.tolist() for f in want]
    with pytest.raises(ValueError, match="^decoder engine needs ar_step.onnx"):
        Infiller(folder, device="cpu", decoder="engine")


def test_a_step_graph_with_the_earlier_cache_layout_is_refused_in_one_line(bundles, tmp_path):
    """Values stored [b, kv, C, d] (before they were stored transposed) would fill wrong: the declared shapes name
    it, and loading says to re-export."""
    import json
    import shutil

    import onnx

    from maria_onnx.runtime.manifest import sha256

    folder = shutil.copytree(bundles["olmo"], tmp_path / "earlier")
    graph = onnx.load(str(folder / "ar_step.onnx"))
    for value in [*graph.graph.input, *graph.graph.output]:
        if value.name.endswith(".value"):
            dims = value.type.tensor_type.shape.dim
            dims[2].dim_param, dims[3].dim_value = "capacity", int(dims[2].dim_value)
    onnx.save(graph, str(folder / "ar_step.onnx"))
    manifest = json.loads((folder / "maria.json").read_text())
    manifest["files"]["ar_step.onnx"] = sha256(folder / "ar_step.onnx")
    (folder / "maria.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError,
        match=r"ar_step.onnx 'cache.0.value' is .*'capacity', \d+\], but the manifest "
        r"describes .* re-export the bundle",
    ) as error:
        Infiller(folder, device="cpu")
    assert "\n" not in str(error.value)


def test_step_bindings_live_with_the_cache_they_point_at(bundles):
    """A binding names the cache's memory: it is kept on the cache, dropped by a resize, and never reused for
    another cache (one freed and replaced at the same id() once got the old, freed buffers)."""
    backend = Infiller(bundles["olmo"], device="cpu").backend
    ids, positions = np.array([[7, 8, 9]]), np.array([[0, 1, 2]])
    first = backend.new_cache(1, 16)
    want = backend.cache_step(ids, positions, first)
    assert list(first.bindings) == [1]
    first.resize(32)
    assert first.bindings == {}
    del first
    for capacity in (16, 48, 32, 80) * 10:  # each cache freed before the next is made, so
        cache = backend.new_cache(1, capacity)  # a new one often takes the old one's id()
        np.testing.assert_allclose(backend.cache_step(ids, positions, cache), want, atol=1e-6)
        assert cache.read(0)[:, :, :3].any() and not cache.read(0)[:, :, 3:].any()
        del cache
