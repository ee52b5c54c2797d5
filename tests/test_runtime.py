"""The PyTorch-free runtime: parity with the PyTorch reference, batching, IO binding, text handling."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from maria_onnx.checkpoint import load_maria
from maria_onnx.reference import reference_infill, reference_score
from maria_onnx.runtime.choose import Sampling, choose_tokens, token_logprobs
from maria_onnx.runtime.decode import encode_masked, length_groups
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.sessions import gpu_present
from maria_onnx.tools.tiny import corpus

ROOT = Path(__file__).parent.parent


def random_cases(rng, vocab, count, rates=(0.1, 0.3, 0.5, 0.7, 0.9)):
    cases = []
    for index in range(count):
        length = int(rng.integers(2, 40))
        masked = rng.random(length) < rates[index % len(rates)]
        masked[rng.integers(length)] = True
        cases.append((rng.integers(5, vocab, length), masked))
    return [c[0] for c in cases], [c[1] for c in cases]


@pytest.fixture(scope="module", params=["olmo", "llama"])
def pair(request, bundles, checkpoints):
    backbones, head, _ = load_maria(checkpoints[request.param])
    return Infiller(bundles[request.param], device="cpu"), backbones, head


def test_greedy_fills_and_logprobs_match_the_reference(pair):
    infiller, backbones, head = pair
    ids, masked = random_cases(np.random.default_rng(0), backbones.vocab_size, 30)
    want = reference_infill(backbones, head, ids, masked, batch_size=1)
    for batch_size in (1, 4, 7):
        got = infiller.fill_ids(ids, masked, batch_size=batch_size)
        for g, w in zip(got, want):
            assert np.array_equal(g.ids, w.ids) and np.array_equal(g.positions, w.positions)
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
    scores = infiller.score([w.ids for w in want], masked, batch_size=4)
    np.testing.assert_allclose(scores, reference_score(backbones, head, [w.ids for w in want], masked), atol=1e-4)
    np.testing.assert_allclose(scores, [-w.logprobs.sum() for w in want], atol=1e-4)


def test_io_binding_gives_the_same_fills_and_keeps_the_cache_in_ortvalues(pair, bundles):
    infiller, backbones, _ = pair
    infiller = Infiller(infiller.bundle, device="cpu", decoder="concat")
    bound = Infiller(infiller.bundle, device="cpu", io_binding=True, decoder="concat")
    seen = []
    step = bound.backend.ar_step

    def recording_step(input_ids, attention_mask, position_ids, past):
        seen.append({type(value) for value in past.values()})
        return step(input_ids, attention_mask, position_ids, past)

    bound.backend.ar_step = recording_step
    ids, masked = random_cases(np.random.default_rng(1), backbones.vocab_size, 9)
    plain, binding = infiller.fill_ids(ids, masked, batch_size=4), bound.fill_ids(ids, masked, batch_size=4)
    for a, b in zip(plain, binding):
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    first_steps = [types for types in seen if np.ndarray in types]
    assert len(first_steps) == 3 and all(types == {ort.OrtValue} for types in seen if types not in first_steps)


def test_sampling_with_a_seed_repeats(pair):
    infiller, _, _ = pair
    text = "The quick [MASK:4] fox is a [MASK] error."
    sampling = Sampling(temperature=1.5, top_k=50, top_p=0.9, seed=11)
    first = infiller.infill([text] * 2, sampling, num_samples=3)
    again = infiller.infill([text] * 2, sampling, num_samples=3)
    assert [r.ids for r in first] == [r.ids for r in again]
    assert len({tuple(r.ids) for r in first}) > 1
    special = set(infiller.special.all)
    assert not special & {t for r in first for t in np.asarray(r.ids)[r.masked_positions]}


def test_masked_text_keeps_the_space_with_the_fill(pair):
    infiller, _, _ = pair
    tokenizer, mask = infiller.tokenizer, infiller.special.mask
    encoded = infiller.encode("The [MASK] statement is [MASK:2].")
    expected = (
        tokenizer.encode("The").ids
        + [mask]
        + tokenizer.encode(" statement is").ids
        + [mask, mask]
        + tokenizer.encode(".").ids
    )
    assert encoded.ids.tolist() == expected
    result = infiller.infill(["The [MASK] statement is [MASK:2]."])[0]
    assert result.text == "".join(piece for piece, _ in result.segments)
    assert result.text.startswith("The") and result.text.endswith(".") and " statement is" in result.text
    assert len(result.fills) == 3 and len(result.fill_logprobs) == 3


def test_text_without_mask_comes_back_with_a_note(pair):
    infiller, _, _ = pair
    result, other_case = infiller.infill(["nothing to fill here", "the [Mask:2] of it"])
    assert result.text == "nothing to fill here" and result.note == "no [MASK] in the text; returned unchanged"
    assert other_case.text == "the [Mask:2] of it"
    assert other_case.note.endswith("('[Mask:2]' is text: markers are upper case, [MASK])")


def run_blocked(args: list, tmp_path):
    """Runs the `maria` CLI in a subprocess where torch, transformers and optimum cannot be imported."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'optimum'):\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    code = f"import sys; from cli import app; app({[str(a) for a in args]!r})"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "blocked in this test" in check.stderr  # the blocker really blocks
    return run


@pytest.mark.parametrize(
    "args, shows",
    [
        (["infill", "--json", "A [MASK:2] of [MASK]."], '"masked_positions"'),
        (["infill", "--json", "the [MASK:?] value"], '"span_lengths"'),
        (["infill", "--json", "--num-samples", "2", "--temperature", "1", "--rerank", "a [MASK] b"], '"score"'),
        (["generate", "--length", "3", "--steps", "2", "--json"], '"energies"'),
        (["eval", "CORPUS", "--seq-len", "16", "--windows", "4"], "AR alone"),
    ],
)
def test_runtime_runs_with_torch_transformers_and_optimum_unimportable(bundles, tmp_path, args, shows):
    (tmp_path / "corpus.txt").write_text("\n".join(corpus(40, seed=5)) + "\n")
    args = [str(tmp_path / "corpus.txt") if a == "CORPUS" else a for a in args]
    run = run_blocked([args[0], "--model", bundles["olmo"], "--device", "cpu", *args[1:]], tmp_path)
    assert run.returncode == 0, run.stderr
    assert shows in run.stdout and "Traceback" not in run.stderr


@pytest.mark.skipif(
    not (gpu_present() and "CUDAExecutionProvider" in ort.get_available_providers()),
    reason="needs an NVIDIA GPU and onnxruntime-gpu's CUDA execution provider",
)
def test_cuda_io_binding_fills_like_cpu(bundles):
    cpu, cuda = Infiller(bundles["llama"], device="cpu"), Infiller(bundles["llama"], device="cuda")
    assert cuda.device == "cuda" and cuda.backend.io_binding
    ids, masked = random_cases(np.random.default_rng(3), cpu.manifest.vocab_size, 12)
    for a, b in zip(cpu.fill_ids(ids, masked, batch_size=4), cuda.fill_ids(ids, masked, batch_size=4)):
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-3)


SHARED_ARENA = """
import numpy as np
from maria_onnx.runtime.infiller import Infiller
def resident():
    return int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmRSS"].split()[0]) * 1024
backend = Infiller(device="cpu").backend
ids = np.random.default_rng(0).integers(10, 4000, (2, 1000))
for _ in range(2):
    backend.mlm_hidden(ids, np.ones_like(ids))             # the MLM's attention: ~100 MB, freed when it ends
before = resident()
for _ in range(3):
    logits = backend.fuse(np.ones((3000, 256), np.float32), np.ones((3000, 256), np.float32))
print(resident() - before, logits.nbytes)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_cpu_sessions_share_one_memory_arena():
    """What one CPU session freed, another reuses: after the MLM pass, the fusion head's logits (49 MB) fit in
    memory the process already holds. With an arena per session, resident memory grew by about their size."""
    run = subprocess.run([sys.executable, "-c", SHARED_ARENA], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    grown, logits = map(int, run.stdout.split())
    assert grown < logits / 2, (grown, logits)
    backend = Infiller(device="cpu").backend
    assert all(
        s.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
        for s in (backend.mlm, backend.step, backend.head)
    )


def test_length_groups_bound_the_padding_and_keep_every_sequence():
    lengths = [248, 12, 12, 248, 248, 10, 248, 12, 12, 12, 12, 9, 12, 60]
    groups = length_groups(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert lengths[group[0]] == longest and longest * len(group) <= 1.5 * sum(lengths[i] for i in group)
    assert len(groups) > 1 and set(groups[0]) >= {0, 3, 4, 6}  # the long ones run together


def test_long_texts_go_to_the_mlm_a_few_at_a_time():
    """Attention's memory grows with rows x width^2: a call holds at most MLM_CALL_SCORES of it."""
    from maria_onnx.runtime.decode import MLM_CALL_SCORES

    for lengths, sizes in [
        ([1024] * 8, [1] * 8),
        ([512] * 8, [4, 4]),
        ([256] * 8, [8]),
        ([2040, 30, 30], [1, 2]),
        ([300] * 20, [11, 9]),
    ]:
        groups = length_groups(lengths)
        assert [len(group) for group in groups] == sizes, lengths
        assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
        assert all(len(g) == 1 or len(g) * lengths[g[0]] ** 2 <= MLM_CALL_SCORES for g in groups)


def test_the_mlm_pass_in_length_groups_equals_each_text_alone(bundles):
    infiller = Infiller(bundles["olmo"], device="cpu")
    rng = np.random.default_rng(5)
    ids = [rng.integers(6, infiller.manifest.vocab_size, n) for n in (150, 4, 6, 140, 5)]
    masked = [rng.random(len(x)) < 0.3 for x in ids]
    shapes = []
    run = infiller.backend.mlm_hidden
    infiller.backend.mlm_hidden = lambda input_ids, mask: shapes.append(input_ids.shape) or run(input_ids, mask)
    hidden = encode_masked(infiller.backend, ids, masked, infiller.special)
    assert hidden.shape[:2] == (5, 152) and sum(r * w for r, w in shapes) < 5 * 152  # less padding than one call
    for row, (x, m) in enumerate(zip(ids, masked)):
        alone = encode_masked(infiller.backend, [x], [m], infiller.special)[0]
        np.testing.assert_allclose(hidden[row, : len(x) + 2], alone, atol=1e-5)


def test_token_logprobs_equal_a_float64_log_softmax():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((6, 50_000)) * 30).astype(np.float32)  # wide range: exp would overflow
    tokens = rng.integers(0, 50_000, 6)
    wide = logits.astype(np.float64)
    exact = wide[np.arange(6), tokens] - wide.max(-1) - np.log(np.exp(wide - wide.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(token_logprobs(logits, tokens), exact, atol=1e-6, rtol=0)


def test_result_fields_name_every_key_of_the_json_result():
    """`maria infill --json` refuses an input field that a result key would write over; the list must be whole."""
    from maria_onnx.runtime.results import Infilled

    full = Infilled(
        input="a",
        text="b",
        ids=[1],
        masked_positions=[0],
        fill_logprobs=[-1.0],
        fills=["b"],
        note="",
        score=-1.0,
        span_lengths=[1],
        candidates=[{"lengths": [1]}],
    )
    assert list(full.to_dict()) == list(Infilled.FIELDS)


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-300, 1e-30])
def test_a_temperature_near_zero_chooses_as_greedy_does_and_never_a_banned_id(temperature):
    """Below about 1e-308 the logits over the temperature overflowed to inf - inf: the choice was the last id,
    past the ban on special tokens."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    banned = [int(row.argmax()) for row in logits[:1]] + [49]  # the first row's best id is banned
    rngs = [np.random.default_rng(i) for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing printed either
        tokens, logprobs = choose_tokens(logits, banned, Sampling(temperature=temperature), rngs)
    greedy, _ = choose_tokens(logits, banned, Sampling(), rngs)
    assert tokens.tolist() == greedy.tolist() and not set(tokens.tolist()) & set(banned)
    assert np.isfinite(logprobs).all()
