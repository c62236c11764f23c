"""``mrprune bench``: argument parsing, the ``--quick`` smoke run and its files, the correctness gate in front of the
timer, the Triton-interpreter refusal and label, the eager greedy loop, and the end-to-end path on a tiny model."""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from pathlib import Path

import pytest
import torch

import mrprune
from mrprune import backends, cli, reference
from mrprune.bench import add_arguments, report, vision
from mrprune.bench import ops as bench_ops
from mrprune.bench.shapes import SHAPES
from mrprune.layouts import GridLayout
from mrprune.methods import SCOPE, VisPruner

ROW_KEYS = {
    "key", "kind", "name", "case", "shape", "batch", "tokens", "dim", "k", "dtype", "device", "impl", "status",
    "median_ms", "p20_ms", "p80_ms", "measurements", "vs_reference", "vs_official", "peak_mb", "max_abs_err",
    "agreement", "note",
}  # fmt: skip
ENV_KEYS = {"device", "device_name", "torch", "triton", "cuda", "driver", "git_commit", "date", "cores", "threads"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def bench(tmp_path: Path, *argv: str) -> tuple[int, dict | None]:
    """Run ``mrprune bench ARGV --out tmp_path`` through the console entry point; (exit code, the JSON it wrote)."""
    code = cli.main(["bench", *argv, "--out", str(tmp_path)])
    files = sorted(tmp_path.glob("*.json"))
    return code, (json.loads(files[-1].read_text()) if files else None)


def rows_of(results: dict, **match) -> list[dict]:
    return [r for r in results["results"] if all(r[k] == v for k, v in match.items())]


# --- parsing ------------------------------------------------------------------------------------------------------


def test_cli_parses_every_option():
    args = parse(
        "--device", "cpu", "--ops", "graph_scores,topk_indices", "--methods", "none", "--shapes", "tiny,llava15",
        "--batch", "1,8", "--dim", "128", "--backends", "eager,cpp", "--dtype", "bfloat16", "--repeat", "5",
        "--min-time", "0.5", "--quick", "--out", "somewhere", "--plot", "--allow-large", "--allow-interpreter",
    )  # fmt: skip
    assert args.device == "cpu" and args.batch == (1, 8) and args.dim == 128 and args.dtype == "bfloat16"
    assert args.repeat == 5 and args.min_time == 0.5 and args.quick and args.plot and args.out == Path("somewhere")
    e2e = parse("--e2e", "--model-size", "7b", "--prune", "0.5,0.9", "--new-tokens", "16")
    assert e2e.e2e and e2e.model_size == "7b" and e2e.prune == (0.5, 0.9) and e2e.new_tokens == 16
    defaults = parse()
    assert not defaults.quick and defaults.ops == "all" and defaults.prune == (0.5, 0.7, 0.9)
    with pytest.raises(SystemExit):
        parse("--batch", "0")


def test_console_entry_point_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--e2e" in out and "llava_next" in out


def test_list(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in [*SHAPES, *bench_ops.OPS, *bench_ops.METHODS]:
        assert name in out


@pytest.mark.parametrize("option", [("--ops", "nope"), ("--methods", "fastest"), ("--shapes", "huge")])
def test_unknown_names_are_rejected(tmp_path, option):
    assert cli.main(["bench", *option, "--no-save"]) == 2


def test_video_refused_on_cpu_unless_asked(tmp_path, caplog):
    code = cli.main(["bench", "--device", "cpu", "--shapes", "video_36k", "--no-save"])
    assert code == 2
    assert "video_36k" in caplog.text and "refused" in caplog.text


# --- the quick smoke run ------------------------------------------------------------------------------------------


def test_quick_runs_and_writes_results(tmp_path, capsys):
    start = time.perf_counter()
    code, results = bench(tmp_path, "--quick", "--device", "cpu", "--plot")
    elapsed = time.perf_counter() - start
    assert code == 0
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"
    env = results["environment"]
    assert ENV_KEYS <= set(env)
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", env["git_commit"])
    rows = results["results"]
    assert rows and all(ROW_KEYS <= set(r) for r in rows)
    assert {r["name"] for r in rows if r["kind"] == "op"} == set(bench_ops.OPS)
    assert {r["name"] for r in rows if r["kind"] == "method"} == set(bench_ops.METHODS)
    assert not [r for r in rows if r["status"] in ("FAIL", "error")]
    for row in rows:
        if row["status"] in ("ok", "reference"):
            assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        if row["status"] == "ok":  # cascading de-duplication rounds (VisPruner) share most picks, the rest nearly all
            cascade = "cascading rounds" in row["note"]
            least = bench_ops.CASCADE_AGREEMENT if cascade else 1 - bench_ops.INDEX_TOLERANCE
            assert row["agreement"] is not None and row["agreement"] >= least
    references = rows_of(results, impl="reference")
    assert references and all(r["status"] == "reference" for r in references)
    officials = rows_of(results, kind="op", name="graph_scores", impl="official")
    assert officials and all(r["vs_reference"] is not None for r in officials)
    if mrprune.HAS_EXTENSION:
        cpp = rows_of(results, kind="op", impl="cpp")
        assert {r["name"] for r in cpp} == set(bench_ops.OPS) and all(r["status"] == "ok" for r in cpp)
        # every C++ row is compared with the reference, and with the official path where the op has one
        assert all(r["vs_reference"] for r in cpp)
        assert all((r["vs_official"] is not None) == (r["name"] in bench_ops._OFFICIAL_OPS) for r in cpp)

    csv_files = list(tmp_path.glob("*.csv"))
    assert len(csv_files) == 1 and csv_files[0].stem.endswith("-quick")
    with open(csv_files[0]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert ROW_KEYS | {"device_name", "git_commit", "date", "torch"} <= set(table[0])
    pngs = list(tmp_path.glob("*.png"))
    try:
        import matplotlib  # noqa: F401

        assert len(pngs) == 1 and pngs[0].stat().st_size > 1000
    except ImportError:
        assert not pngs
    out = capsys.readouterr().out
    assert out.startswith("# mrprune bench on CPU") and "vs eager" in out and "graph_scores" in out


# --- the correctness gate -----------------------------------------------------------------------------------------


def _wrong_topk(scores, lengths, k, sort_indices=False):
    return reference.topk_indices(-scores, lengths, k, sort_indices)  # the k *smallest*


def _wrong_graph_scores(features, lengths, weights=None, threshold=0.5, temperature=0.03, iterations=1):
    return reference.graph_scores(features, lengths, weights, threshold, temperature, iterations) * 1.01


@pytest.mark.parametrize("op, wrong", [("topk_indices", _wrong_topk), ("graph_scores", _wrong_graph_scores)])
def test_wrong_implementation_is_caught(tmp_path, monkeypatch, op, wrong):
    monkeypatch.setitem(backends._registry, op, {**backends._registry[op], "cpp": wrong})
    code, results = bench(tmp_path, "--quick", "--device", "cpu", "--ops", op, "--methods", "g_prune")
    assert code == 1
    bad = rows_of(results, kind="op", name=op, impl="cpp")
    assert bad and all(r["status"] == "FAIL" and r["median_ms"] is None for r in bad)
    assert all(r["agreement"] < 0.9 for r in bad)
    assert {r["status"] for r in rows_of(results, kind="method", impl="reference")} == {"reference"}
    if op == "topk_indices":  # the method calls the op through the dispatcher: its cpp-backed rows fail too
        assert {r["status"] for r in rows_of(results, kind="method", impl="cpp")} == {"FAIL"}
    else:  # scaled scores keep the same top-k: the method's output is still right
        assert {r["status"] for r in rows_of(results, kind="method", impl="cpp")} == {"ok"}


def test_compare_float_and_index():
    scores = torch.rand(2, 50)
    assert bench_ops.compare(scores + 1e-7, scores, ("float",)).ok
    assert not bench_ops.compare(scores * 1.01, scores, ("float",)).ok
    assert not bench_ops.compare(scores[:, :49], scores, ("float",)).ok
    picks = torch.stack([torch.randperm(50)[:10] for _ in range(2)])
    assert bench_ops.compare(picks.flip(1), picks, ("index",)).ok  # order does not matter, the set does
    other = picks.clone()
    other[1, 0] = next(i for i in range(50) if i not in picks[1].tolist())
    check = bench_ops.compare(other, picks, ("index",))
    assert not check.ok and check.agreement == pytest.approx(0.9)  # fewer than 20 picks: no miss allowed
    repeated = picks.clone()
    repeated[0, 1] = repeated[0, 0]
    assert not bench_ops.compare(repeated, picks, ("index",)).ok
    many = torch.randperm(200)[None, :100]
    one_off = many.clone()
    one_off[0, 0] = next(i for i in range(200) if i not in many[0].tolist())
    assert bench_ops.compare(one_off, many, ("index",)).ok  # 1 of 100 may differ (a near-tie)
    assert not bench_ops.compare(torch.randperm(200)[None, :100], many, ("index",)).ok


# --- the vision-stage methods: their synthetic inputs, the official ports, the cascade check -----------------------


def test_token_sources():
    """Every token of the LLaVA-NeXT shape has its own (crop, patch): the base view is crop 0 in raster order, a
    high-resolution token its tile's crop and its place in the tile, a newline (-1, -1); a grid's crops are frames."""
    layout = SHAPES["llava_next"].layout
    crops, patches, count, per_crop = vision.token_sources(layout)
    assert (count, per_crop) == (5, 576)
    made = crops >= 0
    assert int((~made).sum()) == layout.rows and bool((patches[~made] == -1).all())
    assert torch.equal(crops[layout.newline_indices], torch.full((48,), -1))
    assert torch.equal(crops[:576], torch.zeros(576, dtype=torch.int64)) and torch.equal(
        patches[:576], torch.arange(576)
    )
    assert (crops[made] * per_crop + patches[made]).unique().numel() == int(made.sum()) == count * per_crop
    token = layout.highres_indices.view(48, 48)[30, 5]  # tile row 1, column 0 -> crop 3, patch (6, 5)
    assert (int(crops[token]), int(patches[token])) == (3, 6 * 24 + 5)
    crops, patches, count, per_crop = vision.token_sources(GridLayout(2, 3, 4))
    assert crops.tolist() == [0] * 12 + [1] * 12 and patches.tolist() == list(range(12)) * 2 and count == 2


def test_vision_inputs_agree_with_the_tokens():
    """The per-crop attention rows are distributions; each token's attention and features are its (crop, patch)
    entry of the per-crop arrays; newlines get no attention; a method receives only the keywords it reads."""
    features, lengths, layouts = SHAPES["llava_next_small"].features(2, 16)
    inputs = vision.vision_inputs(features, lengths, layouts)
    crops, patches = inputs.crops, inputs.patches
    made = crops >= 0
    rows = torch.arange(2)[:, None].expand_as(crops)
    for layer in vision.LAYERS:
        crop_rows = inputs.crop_attention[layer]
        assert torch.allclose(crop_rows.sum(-1), torch.ones(crop_rows.shape[:2]))
        token = inputs.attention[layer]
        assert torch.equal(token[made], crop_rows[rows[made], crops[made], patches[made]])
        assert bool((token[~made] == 0).all())
    assert torch.equal(inputs.crop_features[rows[made], crops[made], patches[made]], features[made])
    assert set(inputs.kwargs(SCOPE(budget=8))) == {
        "attention", "crops", "patches", "crop_attention", "attention_kind", "crop_features"
    }  # fmt: skip


@pytest.mark.parametrize("batch", [1, 2])
def test_official_ports_equal_official_mode(batch):
    """The official selections written out (mrprune.bench.vision) keep the tokens mrprune's official=True keeps."""
    features, lengths, layouts = SHAPES["llava_next_small"].features(batch, 16)
    inputs = vision.vision_inputs(features, lengths, layouts)
    for pruner, port in (
        (SCOPE(budget=30, layer=-2, official=True), lambda: vision.official_scope(inputs, lengths, 30, -2)),
        (VisPruner(budget=12, layer=-2, official=True), lambda: vision.official_vispruner(inputs, lengths, 12, -2)),
    ):
        with backends.use_backend("reference"):
            kept = pruner.select_batch(features, layouts, lengths, None, **inputs.kwargs(pruner))
        ported = port()
        for b in range(batch):
            assert torch.equal(kept[b], ported[b].sort().values), (pruner, b)


def test_cascade_check():
    """A "cascade" output passes with most picks shared and exactly as many distinct picks as the reference."""
    ref = [torch.arange(0, 16), torch.arange(100, 108)]
    assert bench_ops.compare([r.flip(0) for r in ref], ref, ("cascade",)).ok
    near = [torch.cat([ref[0][:-2], torch.tensor([50, 51])]), torch.cat([ref[1][:-1], torch.tensor([7])])]
    check = bench_ops.compare(near, ref, ("cascade",))
    assert check.ok and check.agreement == pytest.approx(7 / 8) and "cascading" in check.note
    assert not bench_ops.compare([ref[0], torch.arange(200, 208)], ref, ("cascade",)).ok  # nothing shared
    assert not bench_ops.compare([ref[0], torch.cat([ref[1][:-1], ref[1][:1]])], ref, ("cascade",)).ok  # repeat
    assert not bench_ops.compare([ref[0], ref[1][:-1]], ref, ("cascade",)).ok  # one pick short
    assert not bench_ops.compare([ref[0], torch.cat([ref[1][:5], torch.tensor([1, 2, 3])])], ref, ("cascade",)).ok


def _no_dedup(features, lengths, k, per_round=8):
    """A broken de-duplication: the first k tokens, no rounds."""
    out = torch.arange(k).expand(features.shape[0], k).clone()
    return out.masked_fill(out >= lengths[:, None], -1)


def test_broken_dedup_fails_vispruner(tmp_path, monkeypatch):
    monkeypatch.setitem(
        backends._registry, "bipartite_dedup", {**backends._registry["bipartite_dedup"], "cpp": _no_dedup}
    )
    code, results = bench(tmp_path, "--quick", "--device", "cpu", "--ops", "none", "--methods", "vispruner")
    assert code == 1
    assert {r["status"] for r in rows_of(results, kind="method", impl="reference")} == {"reference"}
    assert {r["status"] for r in rows_of(results, kind="method", impl="official")} == {"ok"}
    bad = rows_of(results, kind="method", impl="cpp")
    assert bad and all(r["status"] == "FAIL" and r["agreement"] < bench_ops.CASCADE_AGREEMENT for r in bad)


# --- the Triton interpreter ---------------------------------------------------------------------------------------


@pytest.fixture
def interpreted_triton(monkeypatch):
    """TRITON_INTERPRET=1 and a "triton" graph_scores (a stand-in when triton is not installed or not interpreting)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    impls = backends._registry["graph_scores"]
    if "triton" not in impls:
        monkeypatch.setitem(backends._registry, "graph_scores", {**impls, "triton": reference.graph_scores})


def test_interpreter_is_refused_by_default(tmp_path, interpreted_triton):
    code, results = bench(tmp_path, "--device", "cpu", "--shapes", "tiny", "--ops", "graph_scores",
                          "--methods", "none", "--repeat", "1", "--min-time", "0.001")  # fmt: skip
    assert code == 0
    triton_rows = rows_of(results, impl="triton")
    assert triton_rows and all(r["status"] == "refused" and r["median_ms"] is None for r in triton_rows)
    assert all("not a performance number" in r["note"] for r in triton_rows)
    assert results["environment"]["triton_interpret"] is True


def test_interpreter_is_labelled_when_allowed(tmp_path, interpreted_triton, capsys):
    code, results = bench(tmp_path, "--device", "cpu", "--shapes", "tiny", "--ops", "graph_scores", "--methods",
                          "none", "--repeat", "1", "--min-time", "0.001", "--allow-interpreter")  # fmt: skip
    assert code == 0
    triton_rows = rows_of(results, impl="triton")
    assert triton_rows and all(r["status"] == "ok" and r["median_ms"] > 0 for r in triton_rows)
    assert all(r["note"].startswith("interp (not a performance number)") for r in triton_rows)
    out = capsys.readouterr().out
    assert "triton*" in out and "not a performance number" in out


# --- pieces -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eager_greedy_loop_matches_reference(dtype):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(3, 40, 12, generator=generator, dtype=dtype)
    features[1, 5] = 0  # a zero token is never a pivot
    features[2, 10:20] = features[2, :10] * 2  # rank-deficient item: exhaustion fill by gate, then index
    lengths = torch.tensor([40, 33, 20])
    gate = torch.rand(3, 40, generator=generator, dtype=dtype)
    gate[0, :4] = 0
    seed = torch.tensor([-1, 7, 3])
    for k, g, s in [(25, gate, seed), (40, None, None), (12, gate, None)]:
        expected = reference.greedy_residual_select(features, lengths, k, g, s)
        actual = bench_ops.eager_greedy_loop(features, lengths, k, g, s)
        assert torch.equal(actual[0], expected[0])
        torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-6)


def test_chunked_oracle_matches_reference():
    features, lengths, _ = SHAPES["tiny"].features(2, 16)
    lengths[1] = 40
    for iterations in (1, 5):
        expected = reference.graph_scores(features, lengths, None, 0.5, 0.03, iterations)
        actual = bench_ops.chunked_graph_scores(features, lengths, None, 0.5, 0.03, iterations, block=24)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_cpu_timing_takes_repeat_measurements():
    timing = bench_ops.time_call(lambda: torch.ones(100).sum(), torch.device("cpu"), 1e-5, 0.01, 3)
    assert timing.measurements >= 3 and 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    slow = bench_ops.time_call(lambda: time.sleep(0.02), torch.device("cpu"), 0.02, 0.01, 2)
    assert slow.measurements == 2 and slow.median_ms >= 19


def test_slow_eager_calls_are_timed_once():
    """An eager (reference / official) call past SLOW_EAGER_S is timed by its checked first call alone, and says
    so; a kernel row as slow is still timed ``repeat`` times."""
    settings = bench_ops.Settings(
        device=torch.device("cpu"), dtype=torch.float32, impls=("reference",), min_time=0.01, repeat=3
    )
    calls = []
    slow = bench_ops.SLOW_EAGER_S + 1
    for impl, expected in (("reference", 1), ("official", 1), ("cpp", 3)):
        row = report.Row("method", "x", "case", "tiny", 1, 64, 32, "float32", "cpu", impl)
        bench_ops._time_into(row, lambda: calls.append(1), slow, settings)
        assert row.measurements == expected and ("timed once" in row.note) == (expected == 1)
        if expected == 1:  # the first call's time, no further call
            assert row.median_ms == pytest.approx(slow * 1e3) and not calls


def test_git_commit_and_environment():
    env = report.environment(torch.device("cpu"))
    assert env["device"] == "cpu" and env["cores"] >= 1
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", env["git_commit"])


# --- end to end ---------------------------------------------------------------------------------------------------


def test_e2e_7b_config_is_llava_next_7b_size():
    transformers = pytest.importorskip("transformers")
    from mrprune.bench import e2e

    config = e2e.model_config("7b")
    with torch.device("meta"):
        model = transformers.LlavaNextForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(7.57e9, rel=0.01)
    assert next(model.parameters()).dtype == torch.bfloat16
    layout = mrprune.LlavaNextLayout.from_image_size(e2e.IMAGE_SIZE, config.image_grid_pinpoints, 336, 14)
    assert layout.num_tokens == 2928


def test_e2e_cpu_config_is_clip_l_and_a_half_billion_llm():
    transformers = pytest.importorskip("transformers")
    from mrprune.bench import e2e

    config = e2e.model_config("cpu")
    with torch.device("meta"):
        model = transformers.LlavaNextForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.model.language_model.parameters()) == pytest.approx(0.494e9, rel=0.01)
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == pytest.approx(0.3035e9, rel=0.01)
    layout = mrprune.LlavaNextLayout.from_image_size(e2e.IMAGE_SIZE, config.image_grid_pinpoints, 336, 14)
    assert layout.num_tokens == 2928


def test_e2e_7b_refused_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    assert cli.main(["bench", "--e2e", "--model-size", "7b", "--device", "cpu", "--no-save"]) == 2


def test_e2e_on_a_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    try:
        from mrprune.integrations import patch  # noqa: F401
    except ImportError:
        pytest.skip("mrprune.patch is not available")
    code, results = bench(tmp_path, "--e2e", "--quick", "--device", "cpu", "--methods", "random,mr_pruner")
    assert code == 0
    rows = results["results"]
    assert [(r["name"], r["keep_ratio"]) for r in rows] == [("none", None), ("mr_pruner", 0.5), ("random", 0.5)]
    for row in rows:
        assert row["status"] == "ok" and row["prefill_ms"] > 0 and row["ttft_ms"] > 0 and row["decode_tok_s"] > 0
        assert row["tokens"] == 88 and row["shape"] == "llava_next_tiny"
    for row in rows[1:]:
        assert row["kept_tokens"] == 44 and row["prune_ms"] > 0 and row["prune_source"] == "handle.last"
        assert row["prefill_speedup"] > 0
    assert next(tmp_path.glob("e2e-*.csv"))


def test_e2e_only_methods_by_name(tmp_path):
    """``--e2e --methods tome`` runs ToMe end to end (the name check takes the e2e methods with ``--e2e``; ToMe is
    also a micro-benchmark row: its merges on synthetic keys)."""
    assert "tome" in bench_ops.METHODS
    pytest.importorskip("transformers")
    try:
        from mrprune.integrations import patch  # noqa: F401
    except ImportError:
        pytest.skip("mrprune.patch is not available")
    # the tiny model's one CLIP block merges at most half of a crop's 16 patches: 25 % pruned is within reach
    code, results = bench(tmp_path, "--e2e", "--quick", "--device", "cpu", "--methods", "tome", "--prune", "0.25")
    assert code == 0
    rows = results["results"]
    assert [(r["name"], r["status"]) for r in rows] == [("none", "ok"), ("tome", "ok")]
    assert 0 < rows[1]["kept_tokens"] < rows[1]["tokens"]


def _shuffled(metric):
    """Each token's metric row taken from another token (a fixed permutation): matches by the wrong similarity."""
    order = torch.randperm(metric.shape[1], generator=torch.Generator().manual_seed(0)).to(metric.device)
    return metric[:, order]


def _anti_bipartite_merge(x, metric, lengths, r, sizes=None, protect_first=True, spatial_order=False):
    """A broken ToMe merge: pairs matched on shuffled metric rows."""
    return reference.bipartite_merge(x, _shuffled(metric), lengths, r, sizes, protect_first, spatial_order)


def _anti_assign_merge(x, metric, lengths, targets, include_target=False):
    """A broken VisionZip merge: tokens assigned on shuffled metric rows."""
    return reference.assign_merge(x, _shuffled(metric), lengths, targets, include_target)


@pytest.mark.parametrize(
    "op, wrong, method",
    [("bipartite_merge", _anti_bipartite_merge, "tome"), ("assign_merge", _anti_assign_merge, "visionzip")],
)
def test_broken_merge_fails_the_merging_method(tmp_path, monkeypatch, op, wrong, method):
    """Merged results are checked by their representatives, every token's group and weight: a merge of the wrong
    pairs fails the method's cpp row (the reference row stays the oracle); the right one passes."""
    code, results = bench(tmp_path / "right", "--quick", "--device", "cpu", "--ops", "none", "--methods", method)
    assert code == 0 and {r["status"] for r in rows_of(results, kind="method", impl="cpp")} == {"ok"}
    monkeypatch.setitem(backends._registry, op, {**backends._registry[op], "cpp": wrong})
    code, results = bench(tmp_path / "wrong", "--quick", "--device", "cpu", "--ops", "none", "--methods", method)
    assert code == 1
    assert {r["status"] for r in rows_of(results, kind="method", impl="reference")} == {"reference"}
    bad = rows_of(results, kind="method", impl="cpp")
    assert bad and all(r["status"] == "FAIL" and r["median_ms"] is None for r in bad)


def test_merged_check():
    """compare()'s merged kind: equal results pass; one token moved to another group fails; a wrong weight fails."""
    from mrprune.methods import MergedTokens

    n = 40
    sources = torch.arange(n) // 2
    kept = torch.arange(0, n, 2)
    good = MergedTokens(torch.randn(n // 2, 4), kept, sources, torch.full((n,), 0.5))
    assert bench_ops.compare([good], [good], ("merged",)).ok
    moved = sources.clone()
    moved[1], moved[3] = 1, 0  # two tokens swap groups: 2 of 40 tokens, over the one allowed
    wrong = MergedTokens(good.tokens, kept, moved, good.weights)
    assert not bench_ops.compare([wrong], [good], ("merged",)).ok
    weights = good.weights.clone()
    weights[:8] = 1.0
    assert not bench_ops.compare([MergedTokens(good.tokens, kept, sources, weights)], [good], ("merged",)).ok
