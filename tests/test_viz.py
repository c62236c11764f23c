"""mrprune.viz: kept-token pictures (geometry, pixels of kept vs pruned cells, video panels, CLI, argument checks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mrprune
from mrprune import GridLayout, LlavaNextLayout
from mrprune.cli import main

Image = pytest.importorskip("PIL.Image", reason="mrprune.viz needs Pillow")
viz = pytest.importorskip("mrprune.viz")


def _cell(picture: Image.Image, panel: dict, row: int, col: int) -> np.ndarray:
    """Mean RGB of the interior of one cell of a panel (one pixel in from every edge)."""
    x0, x1 = panel["edges_x"][col], panel["edges_x"][col + 1]
    y0, y1 = panel["edges_y"][row], panel["edges_y"][row + 1]
    pixels = np.asarray(picture, dtype=np.float64)[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
    return pixels.reshape(-1, 3).mean(0)


def _panel(picture: Image.Image, name: str) -> dict:
    return next(p for p in picture.info["mrprune_panels"] if p["name"] == name)


def _white(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 255, dtype=np.uint8)


def test_kept_cells_clear_pruned_cells_dimmed():
    layout = GridLayout(1, 4, 4)
    kept = torch.tensor([0, 5, 10, 15, 3])  # the diagonal and the top-right corner
    picture = viz.overlay(_white(240, 240), kept, layout, panel_height=160)
    panel = _panel(picture, "grid")
    assert panel["box"][3] - panel["box"][1] == 160 and panel["box"][2] - panel["box"][0] == 160
    for row in range(4):
        for col in range(4):
            mean = _cell(picture, panel, row, col)
            if row * 4 + col in kept.tolist():
                assert mean.min() > 250, (row, col, mean)  # the image itself (white)
            else:
                assert mean.max() < 130, (row, col, mean)  # dimmed and hatched


def test_boolean_mask_equals_indices():
    layout = GridLayout(1, 3, 5)
    mask = torch.zeros(15, dtype=torch.bool)
    mask[[1, 7, 8]] = True
    image = np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8)
    a = viz.overlay(image, mask, layout, panel_height=90)
    b = viz.overlay(image, [1, 7, 8], layout, panel_height=90)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_llava_next_unpadded_geometry_non_square():
    height, width = 400, 600  # scikit-image's coffee: 2 x 2 canvas, high-res grid unpadded to 32 x 48
    layout = LlavaNextLayout.from_image_size((height, width))
    assert (layout.rows, layout.cols) == (32, 48)
    boxes = viz.token_boxes(layout, (height, width))
    # the base view is the whole image squashed to 24 x 24 cells (no padding)
    base = boxes[layout.base_indices]
    assert torch.equal(base[:, 0], torch.zeros(576, dtype=torch.float64))
    assert torch.allclose(base[0, 1:], torch.tensor([0.0, 0.0, 600 / 24, 400 / 24], dtype=torch.float64))
    assert torch.allclose(base[-1, 1:], torch.tensor([600 - 600 / 24, 400 - 400 / 24, 600, 400], dtype=torch.float64))
    # the unpadded grid covers the image exactly, row-major, skipping the newline token after each row
    high = boxes[layout.highres_indices]
    assert torch.equal(high[:, 0], torch.ones(32 * 48, dtype=torch.float64))
    token = layout.num_base + 5 * (48 + 1) + 40  # row 5, column 40
    assert torch.allclose(
        boxes[token, 1:], torch.tensor([40 * 12.5, 5 * 12.5, 41 * 12.5, 6 * 12.5], dtype=torch.float64)
    )
    assert torch.allclose(high[:, 3].max(), torch.tensor(600.0, dtype=torch.float64))
    assert torch.allclose(high[:, 4].max(), torch.tensor(400.0, dtype=torch.float64))
    newline = boxes[layout.newline_indices]
    assert (newline[:, 0] == -1).all() and newline[:, 1:].isnan().all()

    # drawn: both panels keep the image's aspect ratio; only the kept high-res cell (and the newlines) are clear
    kept = torch.cat([torch.tensor([token]), layout.newline_indices])
    picture = viz.overlay(_white(height, width), kept, layout, panel_height=192)
    base_panel, high_panel = _panel(picture, "base"), _panel(picture, "high-res")
    for panel in (base_panel, high_panel):
        x0, y0, x1, y1 = panel["box"]
        assert (y1 - y0, x1 - x0) == (192, 288)
    assert base_panel["box"][2] <= high_panel["box"][0]  # side by side
    assert _cell(picture, high_panel, 5, 40).min() > 250
    for row, col in [(5, 39), (5, 41), (4, 40), (6, 40), (0, 0), (31, 47)]:
        assert _cell(picture, high_panel, row, col).max() < 130
    assert _cell(picture, base_panel, 12, 12).max() < 130
    # base cells are not square on a non-square image: 12 x 8 display pixels
    assert np.diff(base_panel["edges_x"]).mean() == pytest.approx(12) and np.diff(base_panel["edges_y"]).mean() == 8
    # the newline strip: one light cell per high-res row
    sx0, sy0, sx1, sy1 = high_panel["strip"]
    strip = np.asarray(picture, dtype=np.float64)[sy0:sy1, sx0:sx1]
    assert sx0 > high_panel["box"][2] and strip.mean() > 200
    assert np.array_equal(high_panel["newlines"], layout.newline_indices.numpy())


def test_standin_features_follow_the_geometry():
    """A red rectangle in a grey non-square image: exactly the high-res cells inside it measure red."""
    height, width = 400, 600
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    image[100:200, 300:450] = (255, 0, 0)
    layout = LlavaNextLayout.from_image_size((height, width))
    view = viz._views(layout, None)[0][1]
    stats = viz._cell_statistics(viz._to_pil(image), view).reshape(32, 48, -1)
    red = stats[..., 0] - stats[..., 1]  # mean R - mean G of each cell
    inside = np.zeros((32, 48), dtype=bool)
    inside[8:16, 24:36] = True  # 12.5 px cells: rows 100 / 12.5 .. 200 / 12.5, cols 300 / 12.5 .. 450 / 12.5
    assert red[inside].min() > 0.9
    assert np.abs(red[~inside & ~np.pad(inside, 1)[1:-1, 2:] & ~np.pad(inside, 1)[1:-1, :-2]]).max() < 0.6
    assert red[2, 2] == pytest.approx(0, abs=1e-6)


def test_standin_features_properties():
    image = np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    image[:, :48] = (30, 60, 200)  # a flat left half
    layout = GridLayout(1, 6, 8)
    features = viz.standin_features(image, layout, dim=64)
    assert features.shape == (48, 64) and features.dtype == torch.float32
    assert torch.equal(features, viz.standin_features(image, layout, dim=64))
    assert not torch.equal(features, viz.standin_features(image, layout, dim=64, seed=1))
    unit = torch.nn.functional.normalize(features, dim=1)
    flat = [r * 8 + c for r in range(6) for c in range(3)]
    assert (unit[flat] @ unit[flat].T).min() > 0.95  # identical flat patches: near-identical features
    assert (unit[flat] @ unit[[5, 6, 7]].T).max() < 0.9  # flat blue vs noisy patches
    next_layout = LlavaNextLayout(4, 6)
    next_features = viz.standin_features(image, next_layout, dim=32)
    lines = next_features[next_layout.newline_indices]
    assert torch.allclose(lines, lines[:1].expand_as(lines), atol=0.05)  # one vector (+ small noise)


def test_video_frames_in_a_row():
    layout = GridLayout(3, 2, 3)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [np.tile(np.array(c, dtype=np.uint8), (40, 60, 1)) for c in colours]
    kept = torch.arange(6, 12)  # all of frame 1
    picture = viz.overlay(frames, kept, layout, panel_height=80)
    panels = picture.info["mrprune_panels"]
    assert [p["name"] for p in panels] == ["frame 0", "frame 1", "frame 2"]
    assert panels[0]["box"][2] <= panels[1]["box"][0] and panels[1]["box"][2] <= panels[2]["box"][0]
    assert len({p["box"][1] for p in panels}) == 1  # one row
    assert np.array_equal(panels[1]["indices"], np.arange(6, 12).reshape(2, 3))
    for row in range(2):
        for col in range(3):
            assert np.allclose(_cell(picture, panels[1], row, col), (0, 255, 0), atol=2)
            assert _cell(picture, panels[0], row, col)[0] < 120  # red, dimmed
            assert _cell(picture, panels[2], row, col)[2] < 120  # blue, dimmed
    boxes = viz.token_boxes(layout, (40, 60))
    assert boxes[:, 0].tolist() == [0.0] * 6 + [1.0] * 6 + [2.0] * 6
    with pytest.raises(ValueError, match="3 frames but 2 images"):
        viz.overlay(frames[:2], kept, layout)
    same = viz.overlay(frames[0], kept, layout, panel_height=80)  # one image repeated over the frames
    assert len(same.info["mrprune_panels"]) == 3


def test_fits_crop_and_pad():
    layout = GridLayout(1, 24, 24)
    crop = viz.token_boxes(layout, (400, 600), fit="crop")
    assert crop[:, 1].min() == 100 and crop[:, 3].max() == 500 and crop[:, 2].min() == 0 and crop[:, 4].max() == 400
    pad = viz.token_boxes(layout, (400, 600), fit="pad")
    assert pad[:, 1].min() == 0 and pad[:, 3].max() == 600 and pad[:, 2].min() == -100 and pad[:, 4].max() == 500
    picture = viz.overlay(_white(400, 600), torch.arange(576), layout, fit="crop", panel_height=120)
    panel = _panel(picture, "grid")
    x0, y0, x1, y1 = panel["box"]
    assert (x1 - x0, y1 - y0) == (180, 120)
    outside = np.asarray(picture, dtype=np.float64)[y0 + 10 : y1 - 10, x0 + 2 : x0 + 25]  # left of the crop
    assert outside.max() < 200 and _cell(picture, panel, 12, 12).min() > 250
    padded = viz.overlay(_white(400, 600), torch.arange(576), layout, fit="pad", panel_height=120)
    box = _panel(padded, "grid")["box"]
    assert box[2] - box[0] == box[3] - box[1] == 120


def test_scores_heat_map():
    layout = GridLayout(1, 2, 2)
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0])
    picture = viz.overlay(_white(100, 100), torch.arange(4), layout, scores, panel_height=100)
    panel = _panel(picture, "grid")
    low, high = _cell(picture, panel, 0, 0), _cell(picture, panel, 1, 1)
    assert high[1] > low[1] + 100 and low[2] > high[2] + 20  # viridis: purple (low) -> yellow (high)
    plain = viz.overlay(_white(100, 100), torch.arange(4), layout, panel_height=100)
    assert not np.array_equal(np.asarray(plain), np.asarray(picture))


def test_method_scores():
    layout = LlavaNextLayout(4, 6, base_side=4)
    features = viz.standin_features(np.random.default_rng(2).integers(0, 255, (48, 72, 3)), layout, dim=32)
    pruner = mrprune.MRPruner(keep_ratio=0.3)
    kept = pruner.select(features, layout)
    scores, label = viz.method_scores(pruner, features, layout, kept)
    assert scores.shape == (layout.num_tokens,) and "transfer" in label
    assert scores[layout.newline_indices].isnan().all() and scores[layout.highres_indices].isfinite().all()
    # the kept high-resolution tokens are the top-scored ones
    high = layout.highres_indices
    kept_high = [i for i in kept.tolist() if i in set(high.tolist())]
    assert set(kept_high) == set(high[scores[high].argsort(descending=True)[: len(kept_high)]].tolist())
    norms, norm_label = viz.method_scores(mrprune.DivPrune(0.5), features, layout, kept)
    assert norm_label == "token norm" and torch.allclose(norms[:16], features[:16].norm(dim=1))


def test_bad_arguments_raise():
    layout = GridLayout(1, 2, 2)
    image = _white(20, 20)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        viz.overlay(image, [0, 4], layout)
    with pytest.raises(ValueError, match="repeat"):
        viz.overlay(image, [1, 1], layout)
    with pytest.raises(ValueError, match="integers"):
        viz.overlay(image, torch.tensor([0.0, 1.0]), layout)
    with pytest.raises(ValueError, match="1-D"):
        viz.overlay(image, torch.tensor([[0, 1]]), layout)
    with pytest.raises(ValueError, match="4 entries"):
        viz.overlay(image, torch.ones(3, dtype=torch.bool), layout)
    with pytest.raises(ValueError, match="scores"):
        viz.overlay(image, [0], layout, scores=torch.ones(5))
    with pytest.raises(ValueError, match="fit"):
        viz.overlay(image, [0], layout, fit="zoom")
    with pytest.raises(TypeError, match="layout"):
        viz.overlay(image, [0], (2, 2))
    with pytest.raises(ValueError, match="panel_height"):
        viz.overlay(image, [0], layout, panel_height=4)
    with pytest.raises(ValueError, match="image"):
        viz.overlay(np.zeros((2, 2, 2, 2)), [0], layout)
    with pytest.raises(ValueError, match="image_size"):
        viz.token_boxes(layout, (0, 10))
    with pytest.raises(ValueError, match="dim"):
        viz.standin_features(image, layout, dim=3)


def _png(tmp_path, height: int = 120, width: int = 180) -> str:
    path = tmp_path / "input.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_cli_writes_png(tmp_path):
    out = tmp_path / "out.png"
    argv = ["viz", "--image", _png(tmp_path), "--method", "random_50", "--layout", "llava_next"]
    assert main([*argv, "--out", str(out), "--panel-height", "96"]) == 0
    written = Image.open(out)
    layout = LlavaNextLayout.from_image_size((120, 180))
    features = viz.standin_features(Image.open(_png(tmp_path)), layout)
    kept = mrprune.preset("random_50").select(features, layout)
    expected = viz.overlay(Image.open(_png(tmp_path)), kept, layout, panel_height=96, title="t", note="n")
    assert written.size[1] == expected.size[1]  # three text lines (title, kept count, stand-in note) + panels
    right = expected.info["mrprune_panels"][-1]["strip"][2]
    assert written.size[0] >= right + viz.MARGIN  # the long title may widen the picture
    x0, y0, _, y1 = expected.info["mrprune_panels"][0]["box"]
    assert np.array_equal(np.asarray(written)[y0:y1, x0:right], np.asarray(expected)[y0:y1, x0:right])
    small = tmp_path / "small.png"
    assert main([*argv, "--out", str(small), "--panel-height", "96", "--colors", "64"]) == 0
    assert Image.open(small).mode == "P" and Image.open(small).size == written.size


def test_cli_layouts_scores_and_features(tmp_path):
    image = _png(tmp_path)
    out = str(tmp_path / "out.png")
    assert (
        main(["viz", "--image", image, "--method", "mr_pruner_70", "--out", out, "--scores", "--panel-height", "64"])
        == 0
    )
    assert main(["viz", "--image", image, "--method", "divprune", "--layout", "llava15", "--out", out]) == 0
    assert (
        main(["viz", "--image", image, "--method", "g_prune", "--layout", "qwen", "--frames", "3", "--out", out]) == 0
    )
    video = Image.open(out)
    assert video.size[0] > 3 * video.size[1] // 2  # three frame panels side by side
    features = tmp_path / "features.pt"
    torch.save(torch.randn(576, 16), features)
    argv = ["viz", "--image", image, "--method", "resprune_64", "--layout", "llava15", "--out", out]
    assert main([*argv, "--features", str(features)]) == 0
    torch.save({"features": torch.randn(100, 16)}, features)
    assert main([*argv, "--features", str(features)]) == 2  # wrong token count for the layout


def test_cli_bad_arguments(tmp_path):
    out = str(tmp_path / "out.png")
    assert main(["viz", "--image", str(tmp_path / "missing.png"), "--out", out]) == 2
    assert main(["viz", "--image", _png(tmp_path), "--layout", "llava15", "--frames", "2", "--out", out]) == 2
    with pytest.raises(SystemExit):
        main(["viz", "--image", _png(tmp_path), "--method", "no_such_method", "--out", out])
    with pytest.raises(SystemExit):
        main(["viz", "--image", _png(tmp_path), "--layout", "llava99", "--out", out])
    with pytest.raises(SystemExit):
        main(["viz", "--image", _png(tmp_path)])  # --out is required
    assert not (tmp_path / "out.png").exists()


def test_cli_sample_image(tmp_path):
    skimage_data = pytest.importorskip("skimage.data", reason="sample images ship with scikit-image")
    assert all(callable(getattr(skimage_data, name, None)) for name in viz.SAMPLE_IMAGES)
    out = tmp_path / "astronaut.png"
    assert main(["viz", "--image", "astronaut", "--method", "g_prune", "--out", str(out), "--panel-height", "64"]) == 0
    assert Image.open(out).size[1] == 64 + viz.MARGIN + 22 + 18 + 18 + 4 + viz.HEADER + viz.LEGEND


def test_single_crop_llava_next_draws_base_and_newline():
    layout = LlavaNextLayout(0, 0, base_side=6)  # base view + one trailing newline token
    boxes = viz.token_boxes(layout, (30, 60))
    assert boxes.shape == (37, 5) and boxes[36, 0] == -1 and boxes[:36, 0].eq(0).all()
    for kept, light in (([0, 36], True), ([0], False)):
        picture = viz.overlay(_white(30, 60), kept, layout, panel_height=48)
        (panel,) = picture.info["mrprune_panels"]
        x0, y0, x1, y1 = panel["strip"]
        strip = np.asarray(picture, dtype=np.float64)[y0:y1, x0:x1]
        assert (strip.mean() > 200) == light
        assert _cell(picture, panel, 0, 0).min() > 250 and _cell(picture, panel, 0, 1).max() < 130


def _one_preset_per_method():
    seen = {}
    for name, (cls, _) in sorted(mrprune.PRESETS.items()):
        seen.setdefault(cls.__name__, name)
    return sorted(seen.values())


@pytest.mark.parametrize("method", _one_preset_per_method())
def test_every_method_draws(tmp_path, method, caplog):
    """Every method with a preset draws on LLaVA-NeXT (crops from the image size) and on a Qwen2.5-VL video (ToMe
    merges within the stand-in tower's windows there); the vision-stage ones rank by a stand-in attention and draw
    it as their scores; methods that read model signals besides their tokens get stand-ins, and the picture says
    which are synthetic."""
    image = _png(tmp_path)
    out = str(tmp_path / "out.png")
    pruner = mrprune.preset(method)
    for layout in (["--layout", "llava_next"], ["--layout", "qwen", "--frames", "2"]):
        argv = ["viz", "--image", image, "--method", method, *layout, "--out", out, "--scores", "--panel-height", "48"]
        assert main(argv) == 0, (method, layout)
    layout = LlavaNextLayout.from_image_size((300, 500))
    features = viz.standin_features(np.full((300, 500, 3), 128, dtype=np.uint8), layout, dim=32)
    extra = viz.standin_signals(pruner, features, layout, (300, 500))
    model_signals = {mrprune.Need.VISION_ATTENTION, mrprune.Need.VISION_MERGE}
    assert bool(extra) == (bool(pruner.needs & model_signals) or pruner.stage is mrprune.Stage.LLM)
    result = viz.standin_select(pruner, features, layout, (300, 500))
    kept = mrprune.methods.kept_indices(result)
    assert 0 < kept.numel() < layout.num_tokens, method  # every method prunes or merges something here
    if mrprune.Need.VISION_ATTENTION in pruner.needs:  # one stand-in attention distribution per crop; newlines in none
        crops, attention = extra["crops"], next(iter(extra["attention"].values()))
        assert crops.max() >= 2 and bool((attention[crops < 0] == 0).all())
        for crop in crops[crops >= 0].unique().tolist():
            torch.testing.assert_close(attention[crops == crop].sum(), torch.tensor(1.0))


def test_trim_and_cdpruner_draw_with_standin_clip(tmp_path):
    """TRIM (no preset: it needs the user's CLIP model) draws with stand-in CLIP embeddings, on LLaVA-NeXT and a Qwen
    video; TRIM and CDPruner get the stand-in image and question embeddings, the other vision-stage methods none."""
    image, out = _png(tmp_path), str(tmp_path / "out.png")
    for layout in (["--layout", "llava_next"], ["--layout", "qwen", "--frames", "2"]):
        argv = ["viz", "--image", image, "--method", "trim", *layout, "--out", out, "--scores", "--panel-height", "48"]
        assert main(argv) == 0, layout
    layout = LlavaNextLayout.from_image_size((300, 500))
    features = viz.standin_features(np.full((300, 500, 3), 128, dtype=np.uint8), layout, dim=32)
    for pruner in (viz.STANDIN_METHODS["trim"](), mrprune.preset("cdpruner_128")):
        extra = viz.standin_signals(pruner, features, layout, (300, 500))
        assert extra["clip_image"].shape == (layout.num_tokens, 32) and extra["clip_text"][0].shape == (1, 32)
        kept = pruner.select(features, layout, **extra)
        assert 0 < kept.numel() < layout.num_tokens
    assert "clip_image" not in viz.standin_signals(mrprune.preset("scope_128"), features, layout, (300, 500))


def _corner(picture: Image.Image, panel: dict, row: int, col: int) -> np.ndarray:
    """Mean RGB of a 3 x 3 patch near a cell's top-left corner (away from a representative's mark)."""
    x0, y0 = panel["edges_x"][col] + 2, panel["edges_y"][row] + 2
    return np.asarray(picture, dtype=np.float64)[y0 : y0 + 3, x0 : x0 + 3].reshape(-1, 3).mean(0)


def _centre(picture: Image.Image, panel: dict, row: int, col: int) -> np.ndarray:
    x = (panel["edges_x"][col] + panel["edges_x"][col + 1]) // 2
    y = (panel["edges_y"][row] + panel["edges_y"][row + 1]) // 2
    return np.asarray(picture, dtype=np.float64)[y, x]


def test_merged_groups_coloured_and_representatives_marked():
    from mrprune.methods.results import MergedTokens

    layout = GridLayout(1, 4, 4)
    # group 0: tokens 0, 1, 4, 5 (representative 0); group 1: 2, 3 (representative 3); 10 kept alone; rest dropped
    sources = torch.full((16,), -1)
    sources[[0, 1, 4, 5]], sources[[2, 3]], sources[10] = 0, 1, 2
    merged = MergedTokens(torch.zeros(3, 2), torch.tensor([0, 3, 10]), sources, (sources >= 0).float())
    picture = viz.overlay(_white(240, 240), merged, layout, panel_height=160)
    panel = _panel(picture, "grid")
    assert np.array_equal(picture.info["mrprune_groups"], sources.numpy())
    first = [_corner(picture, panel, t // 4, t % 4) for t in (0, 1, 4, 5)]
    second = [_corner(picture, panel, t // 4, t % 4) for t in (2, 3)]
    for group in (first, second):
        assert all(np.abs(c - group[0]).max() < 1 for c in group)  # one colour per group
        assert group[0].max() - group[0].min() > 60  # a saturated tint, not white or grey
    assert np.abs(first[0] - second[0]).max() > 30  # two groups, two colours
    assert _cell(picture, panel, 2, 2).min() > 250  # a token kept as itself stays clear
    for t in (6, 7, 8, 9, 11, 12, 13, 14, 15):
        assert _cell(picture, panel, t // 4, t % 4).max() < 130, t  # merged nowhere: dimmed
    for t in (0, 3):
        assert _centre(picture, panel, t // 4, t % 4).min() > 250  # representatives marked white
    for t in (1, 2, 4, 5):
        assert _centre(picture, panel, t // 4, t % 4).min() < 250  # the other members are not
    with pytest.raises(ValueError, match="map 9 input tokens"):
        viz.overlay(_white(60, 60), merged, GridLayout(1, 3, 3), panel_height=48)


def test_standin_signals_run_every_stage_and_merge_block():
    """The stand-ins run what each method does: PDrop's three pruning layers (its final count, nested in the first
    layer's keep), SparseVLM's merged groups mapped back to the image's tokens (each representative in its own group,
    each group's weights summing to 1), ToMe's schedule over the stand-in tower (at most its budget, every group
    inside one crop)."""
    layout = LlavaNextLayout.from_image_size((300, 500))
    image = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    features = viz.standin_features(image, layout, dim=32)
    n = layout.num_tokens

    pdrop = mrprune.preset("pdrop")
    kept = viz.standin_select(pdrop, features, layout, (300, 500))
    assert kept.numel() == pdrop.count(2, n, n)
    first = pdrop.select(features, layout, **viz.standin_signals(pdrop, features, layout, (300, 500)))
    assert first.numel() == pdrop.count(0, n, n) and bool(torch.isin(kept, first).all())

    merged = viz.standin_select(mrprune.preset("sparsevlm_128"), features, layout, (300, 500))
    assert isinstance(merged, mrprune.methods.MergedTokens) and merged.sources.shape == (n,)
    k = merged.kept.numel()
    torch.testing.assert_close(merged.sources[merged.kept], torch.arange(k))
    totals = torch.zeros(k).index_add_(0, merged.sources[merged.sources >= 0], merged.weights[merged.sources >= 0])
    torch.testing.assert_close(totals, torch.ones(k))
    assert int((merged.sizes > 1).sum()) > 0  # something was recycled

    tome = mrprune.preset("tome_128")
    groups = viz.standin_merge_groups(tome, features, layout, (300, 500))
    crops = viz._standin_crops(layout, (300, 500))[:, 0]
    assert bool(((groups < 0) == (crops < 0)).all())
    ids = groups[groups >= 0].unique()
    assert ids.numel() + int((groups < 0).sum()) <= 128
    for group in ids.tolist():
        assert crops[groups == group].unique().numel() == 1


def test_standin_tower_merges_qwen_tokens_within_windows():
    """On a Qwen2.5-VL grid the stand-in tower merges within 4 x 4-token windows of each frame (partial windows at
    the edges): no group spans two windows, the budget is met, and the windows' tokens do merge."""
    layout = GridLayout(2, 6, 9)
    image = np.random.default_rng(0).integers(0, 256, (84, 126, 3), dtype=np.uint8)
    features = viz.standin_features(image, layout, dim=32)
    groups = viz.standin_merge_groups(mrprune.ToMe(budget=30), features, layout, window=viz.QWEN_WINDOW)
    frame, y, x = torch.meshgrid(torch.arange(2), torch.arange(6), torch.arange(9), indexing="ij")
    windows = (frame * 100 + (y // 4) * 10 + x // 4).flatten()
    assert groups.unique().numel() == 30 and bool((groups >= 0).all())
    for group in groups.unique().tolist():
        assert windows[groups == group].unique().numel() == 1
    result = viz.standin_select(mrprune.ToMe(budget=30), features, layout, window=viz.QWEN_WINDOW)
    assert isinstance(result, mrprune.methods.MergedTokens) and result.kept.numel() == 30
