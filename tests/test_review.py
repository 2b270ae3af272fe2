"""Review report (mirrorinf.review): plots and markdown for image and tabular data."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from review_helpers import review_inputs

from mirrorinf.review import (
    PLOTS,
    ReviewInputs,
    image_scale,
    image_shape,
    plot_leaks,
    plot_mislabels,
    plot_query_influence,
    review_tables,
    write_report,
)


@pytest.mark.parametrize(("n_features", "n_leaks"), [(64, 2), (5, 1), (7, 0)])
def test_write_report_images_and_tabular(tmp_path: Path, n_features: int, n_leaks: int) -> None:
    inp = review_inputs(n_features, n_leaks)
    files = write_report(tmp_path, inp)
    assert {f"plots/{p}" for p in PLOTS} | {"report.md", "checks/gx_result.md"} == set(files)
    for name in PLOTS:
        path = tmp_path / "plots" / name
        assert path.stat().st_size < 500_000
        ink = _ink(path)
        assert ink > 0.01, f"{name} is (nearly) blank: {ink:.3%} of its pixels drawn"
    report = (tmp_path / "report.md").read_text()
    assert "Gate: **FAILED**" in report and "mislabel_fraction" in report
    assert f"Suspected leaks: {n_leaks}**" in report
    assert "tables/top_k_per_query.json" in report
    assert ("First features" in report) == (
        image_shape(n_features) is None and inp.tables.counts["n_flagged_mislabel"] > 0
    )
    assert "| leaks | pass |" in (tmp_path / "checks" / "gx_result.md").read_text()


def test_report_names_the_loss_after_fit_rule(tmp_path: Path) -> None:
    """With the losses after the validation fit, the report states that rule and its
    threshold; the group-influence plots draw no threshold line on the wrong scale."""
    rng = np.random.default_rng(3)
    after = rng.exponential(size=60)
    after[:4] = 50.0
    losses = {"loss_after_fit": after, "calib_loss_after_fit": rng.exponential(size=200)}
    inp = review_inputs(7, **losses)
    assert inp.tables.counts["harmful_by_loss_after_fit"] == 1
    write_report(tmp_path, inp)
    report = (tmp_path / "report.md").read_text()
    thr = inp.tables.counts["harmful_threshold"]
    assert f"loss after the fit on it above {thr:.3g}" in report
    for name in ("group_influence.png", "top_harmful.png"):
        assert _ink(tmp_path / "plots" / name) > 0.01


def _ink(path: Path) -> float:
    """Fraction of a PNG's pixels that are not white (decoded, not just a header check)."""
    img = mpimg.imread(path)
    return float((img[..., :3] < 0.95).any(axis=-1).mean())


def test_plots_follow_their_data(tmp_path: Path) -> None:
    """The leak gallery has one row per leak (none: a short placeholder); the mislabel gallery
    grows with the number flagged; image rows are drawn as grey images, tabular ones in colour."""
    heights = []
    for n_leaks in (0, 1, 3):
        out = tmp_path / f"leaks{n_leaks}"
        write_report(out, review_inputs(64, n_leaks))
        heights.append(mpimg.imread(out / "plots" / "leaks.png").shape[0])
    assert heights[0] < heights[1] < heights[2], heights

    def gallery_height(inp: ReviewInputs, out: Path) -> int:
        write_report(out, inp)
        return mpimg.imread(out / "plots" / "mislabels.png").shape[0]

    few, many = review_inputs(64), review_inputs(64)
    few.tables.train["flag_mislabel"] = few.tables.train.index < 3  # one gallery row of 8
    many.tables.train["flag_mislabel"] = True  # more than the gallery holds: two rows
    assert gallery_height(few, tmp_path / "few") < gallery_height(many, tmp_path / "many")

    def grey_fraction(n_features: int, out: Path) -> float:
        write_report(out, review_inputs(n_features))
        img = mpimg.imread(out / "plots" / "mislabels.png")[..., :3]
        drawn = (img < 0.95).any(axis=-1)
        grey = (np.ptp(img, axis=-1) < 0.02) & drawn
        return float(grey.sum() / max(1, drawn.sum()))

    assert grey_fraction(64, tmp_path / "img") > 0.9 > grey_fraction(5, tmp_path / "tab")


def test_review_tables_carry_predictions() -> None:
    inp = review_inputs(64)
    tables = review_tables(inp)
    flagged = tables["flagged_train"]
    assert "predicted" in flagged and len(flagged) == int(
        (inp.tables.train["flag_mislabel"] | inp.tables.train["flag_harmful"]).sum()
    )
    assert len(tables["top_k_per_query"]) == len(inp.tables.queries)


def test_image_shape() -> None:
    assert image_shape(64) == (8, 8) and image_shape(784) == (28, 28)
    assert image_shape(5) is None and image_shape(9) is None  # 3x3 is too small to read


def test_rgb_images_drawn_in_colour_with_class_names(tmp_path: Path) -> None:
    """[n, 3, H, W] inputs (an image folder, normalised with a mean/std) are drawn as colour
    images, the normalisation undone; the flagged table names each label's class."""
    base = review_inputs(3 * 8 * 8)
    n = len(base.train_x)
    green = np.zeros((n, 3, 8, 8))
    green[:, 1] = np.random.default_rng(0).uniform(0.8, 1.0, size=(n, 8, 8))
    normalised = (green - 0.5) / 0.2  # what data.image.mean / std give the model
    flat = normalised.reshape(n, -1)
    inp = ReviewInputs(
        **{**base.__dict__, "train_x": flat, "query_x": flat[:6]},
    )
    inp.x_shape, inp.class_names = (3, 8, 8), ["cat", "dog", "eel"]
    write_report(tmp_path, inp)
    img = mpimg.imread(tmp_path / "plots" / "mislabels.png")[..., :3]
    pure_green = (img[..., 1] > 0.6) & (img[..., 0] < 0.3) & (img[..., 2] < 0.3)
    assert pure_green.mean() > 0.05, f"only {pure_green.mean():.3%} green pixels"
    flagged = review_tables(inp)["flagged_train"]
    names = dict(zip(flagged["label"].astype(int), flagged["class"], strict=False))
    assert names and all(["cat", "dog", "eel"][k] == v for k, v in names.items())


def test_configured_normalisation_is_undone_for_display() -> None:
    """With data.image mean/std given, the review shows the decoded pixels exactly; per-channel
    min-max (the fallback) would stretch dull images to full contrast."""
    base = review_inputs(3 * 8 * 8)
    n = len(base.train_x)
    pixels = np.random.default_rng(1).uniform(0.3, 0.5, size=(n, 3, 8, 8))  # dull colours
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    flat = ((pixels - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]).reshape(n, -1)
    inp = ReviewInputs(**{**base.__dict__, "train_x": flat, "query_x": flat[:6]})
    shown = {}
    for norm in ((mean, std), None):
        inp.image_norm = norm
        low, span = image_scale(inp, (3, 8, 8))
        shown[norm is None] = (flat - low) / span
    np.testing.assert_allclose(shown[False], pixels.reshape(n, -1), atol=1e-12)
    assert shown[True].min() == pytest.approx(0.0) and shown[True].max() == pytest.approx(1.0)
    inp.image_norm = (None, std)  # std only: the mean is 0
    low, span = image_scale(inp, (3, 8, 8))
    np.testing.assert_allclose(low, 0.0)
    np.testing.assert_allclose(span, np.repeat(1 / np.array(std), 64))


def test_galleries_are_mosaics_with_each_thumbnail_at_its_tile(tmp_path: Path) -> None:
    """Each gallery is one mosaic: every example drawn appears pixel for pixel (the data.image
    mean/std undone, at an integer zoom) in the box its plot reports, one box per example
    shown, in the gallery's order."""
    base = review_inputs(3 * 8 * 8, n_leaks=2)
    n = len(base.train_x)
    pixels = np.random.default_rng(2).uniform(size=(n, 3, 8, 8))  # every thumbnail distinct
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    flat = ((pixels - mean[:, None, None]) / std[:, None, None]).reshape(n, -1)
    inp = ReviewInputs(**{**base.__dict__, "train_x": flat, "query_x": flat[:6]})
    inp.x_shape, inp.image_norm = (3, 8, 8), (mean.tolist(), std.tolist())
    inp.scale = image_scale(inp, (3, 8, 8))
    train, queries = inp.tables.train, inp.tables.queries
    flagged = train[train["flag_mislabel"]].sort_values("self_influence", ascending=False)
    shown = queries[queries["query_id"].isin(inp.query_ids[: inp.n_queries_shown])]
    per_kind = shown.groupby(["query_id", "kind"]).size().clip(upper=4)
    expected = {
        "mislabels": (plot_mislabels, len(flagged.head(inp.n_gallery))),
        "leaks": (plot_leaks, 2 * len(inp.tables.leaks)),
        "query": (plot_query_influence, inp.n_queries_shown + int(per_kind.sum())),
    }
    for name, (plot, count) in expected.items():
        path = tmp_path / f"{name}.png"
        placed = plot(inp, (3, 8, 8), path)
        assert len(placed) == count, name
        png = mpimg.imread(path)[..., :3]
        for split, pos, (top, left, bottom, right) in placed:
            zoom = (bottom - top) // 8
            assert zoom >= 1 and (bottom - top, right - left) == (8 * zoom, 8 * zoom)
            want = pixels[pos].transpose(1, 2, 0).repeat(zoom, 0).repeat(zoom, 1)
            got = png[top:bottom, left:right]
            assert np.abs(got - want).max() <= 1 / 255 + 1e-6, (name, split, pos)
    placed = plot_mislabels(inp, (3, 8, 8), tmp_path / "m.png")
    assert [pos for _, pos, _ in placed] == flagged.index[: inp.n_gallery].tolist()


HOSTILE = "7\n\n# Gate: PASSED\ngate:    PASSED \x1b[32mOK\x1b[0m [x](http://evil) `"
ESCAPED = "7\\n\\n# Gate: PASSED\\ngate:    PASSED \\x1b[32mOK\\x1b[0m [x](http://evil) `"


def test_hostile_ids_cannot_add_lines_markup_or_terminal_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training ids are data: an id with newlines wrote a fake '# Gate: PASSED' heading into
    report.md and a fake 'gate: PASSED' line (and terminal escape codes) into the CLI's
    summary. Shown ids are one line, control characters escaped, markdown markup escaped."""
    from types import SimpleNamespace

    from mirrorinf.cli import _print_summary

    inp = review_inputs(7)
    assert inp.tables.counts["n_flagged_mislabel"] > 0
    hostile = {old: f"{HOSTILE}{old}" for old in inp.tables.train["id"]}
    inp.tables.train["id"] = inp.tables.train["id"].map(hostile)
    for table in (inp.tables.queries, inp.tables.leaks):
        table["train_id"] = table["train_id"].map(hostile)
    write_report(tmp_path, inp)
    report = (tmp_path / "report.md").read_text()
    assert "\x1b" not in report and "[x](http://evil)" not in report
    assert not [line for line in report.splitlines() if line.startswith(("# Gate: P", "gate:"))]
    assert "7\\\\n\\\\n\\# Gate: PASSED" in report  # the id is still there, shown escaped
    summary = {
        "counts": {"n_flagged_mislabel": 1, "n_train": 60, "n_leaks": 1, "n_query": 6},
        "top_mislabels": [{"id": HOSTILE, "label": 1, "self_influence": 0.3}],
        "leaks": [{"query_id": HOSTILE, "train_id": HOSTILE, "cosine": 1.0}],
    }
    result = SimpleNamespace(
        summary=summary, model={"name": "m", "version": 1, "uri": "models:/m/1"},
        verdict="failed", reasons=[], run_id="r", cache_hit=False, stage_seconds={},
    )  # fmt: skip
    _print_summary(result, 1.0, False)
    out = capsys.readouterr().out
    assert "\x1b" not in out, out
    assert [ln for ln in out.splitlines() if "PASSED" in ln] == [
        f"  id {ESCAPED}  label 1  self-influence 0.3",
        f"  query {ESCAPED} <- train {ESCAPED}  cosine 1",
    ], out


def test_token_text_stays_one_code_span() -> None:
    """Decoded token text is shown in a code span that the text cannot close or break."""
    from mirrorinf.text import markdown_code

    assert markdown_code("plain words") == "`plain words`"
    assert markdown_code("a ` b\n# Gate: PASSED") == "``a ` b\\n# Gate: PASSED``"
    assert markdown_code("`x``") == "``` `x`` ```"


def test_ids_with_dollar_signs_are_drawn_as_text(tmp_path: Path) -> None:
    """An id like '$\\undefined{$' is text: matplotlib would parse it as mathtext and fail."""
    inp = review_inputs(7)
    bad = {old: f"$\\undefined{{{old}$" for old in inp.tables.train["id"]}
    inp.tables.train["id"] = inp.tables.train["id"].map(bad)
    for table in (inp.tables.queries, inp.tables.leaks):
        table["train_id"] = table["train_id"].map(bad)
    files = write_report(tmp_path, inp)
    assert "plots/top_harmful.png" in files and "plots/mislabels.png" in files
