"""core.views against hand-built cases and slow reference loops (never against itself)."""
from __future__ import annotations

import io
import itertools
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from core import db, views
from core.configs import ConfigError
from core.leaderboard import Entry
from core.methods import Method
from core.metrics import QueryScores
from core.models import ModelError
from tests.images import header_only_png

PUNCTUATION = "\\`*_{}[]()<>#+-.!|~$:&"


# --- Markdown and Plotly escapes ---------------------------------------------------------------------

def unescape(markdown: str) -> str:
    """What a CommonMark reader shows: a backslash before ASCII punctuation is dropped (slow loop)."""
    out, i = [], 0
    while i < len(markdown):
        if markdown[i] == "\\" and i + 1 < len(markdown) and markdown[i + 1] in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~":
            out.append(markdown[i + 1])
            i += 2
        else:
            out.append(markdown[i])
            i += 1
    return "".join(out)


def unescaped_specials(markdown: str) -> list[str]:
    """Markdown characters in `markdown` that are not escaped (slow scan)."""
    found, i = [], 0
    while i < len(markdown):
        if markdown[i] == "\\":
            i += 2
            continue
        if markdown[i] in PUNCTUATION:
            found.append(markdown[i])
        i += 1
    return found


def test_md_turns_a_link_into_text():
    assert views.md("[x](http://evil)") == r"\[x\]\(http\://evil\)"
    assert views.md("# title") == r"\# title"
    assert views.md(":red[boom]") == r"\:red\[boom\]"
    assert views.md("a  \n\n   - b") == "a  \n\\- b"  # each line flattened, a list marker escaped


def test_md_round_trips_every_string_and_leaves_nothing_active():
    rng = random.Random(0)
    alphabet = PUNCTUATION + "ab 19é/\"'@%=^;,?"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        out = views.md(text)
        assert unescaped_specials(out) == [], (text, out)
        assert unescape(out) == " ".join(text.split()), (text, out)


def test_plot_text_escapes_html():
    assert views.plot_text('<a href="x">y</a> & b') == "&lt;a href=&quot;x&quot;&gt;y&lt;/a&gt; &amp; b"
    assert views.plot_text("lite0(3)+lite2(1)") == "lite0(3)+lite2(1)"


def test_shorten_and_first_line():
    assert views.shorten("abc") == "abc"
    long = "x" * 20_000
    assert views.shorten(long).startswith("x" * 80) and "20,000 characters" in views.shorten(long)
    assert len(views.shorten(long)) < 120
    assert views.first_line("\n first \nsecond") == "first"
    assert views.first_line(None) == "" and views.first_line("  ") == ""


# --- dataset sources ----------------------------------------------------------------------------------

def test_data_roots_default_to_the_workspace(tmp_path):
    assert views.data_roots(None, tmp_path) == (tmp_path.resolve(),)
    assert views.data_roots("  ", tmp_path) == (tmp_path.resolve(),)
    a, b = tmp_path / "a", tmp_path / "b"
    assert views.data_roots(f"{a}{os.pathsep}{b}{os.pathsep}", tmp_path) == (a.resolve(), b.resolve())


def test_allowed_sources(tmp_path):
    root = (tmp_path / "data").resolve()
    (root / "set").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    roots = (root,)
    for fine in ("demo", "DEMO-small", str(root / "set"), str(root / "set" / "manifest.csv"), str(root),
                 str(root / "new-folder")):
        assert views.check_allowed_source(fine, roots, []) == fine
    assert views.check_allowed_source(str(outside), roots, [str(outside)]) == str(outside)  # registered
    for refused in (str(outside), "/usr/share/icons", str(root / "set" / ".." / ".." / "outside"),
                    str(root / "escape"), str(root / "escape" / "x.csv"), "relative/path", "~nosuchuser/x"):
        with pytest.raises(ConfigError, match="does not open"):
            views.check_allowed_source(refused, roots, ["demo"])
    for invalid in ("", "  ", "x" * 20_000, "a\x00b"):
        with pytest.raises(ConfigError, match="the dataset must be"):
            views.check_allowed_source(invalid, roots, [])


def test_source_stamp_follows_the_mtime(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    os.utime(manifest, ns=(1_000_000_000, 1_000_000_000))
    assert views.source_stamp(str(manifest)) == 1_000_000_000
    os.utime(manifest, ns=(2_000_000_000, 2_000_000_000))
    assert views.source_stamp(str(manifest)) == 2_000_000_000
    assert views.source_stamp("demo") == 0 and views.source_stamp(str(tmp_path / "gone")) == -1


# --- URL values ---------------------------------------------------------------------------------------

def test_parse_id():
    assert views.parse_id("42", "run") == 42 and views.parse_id(" 0 ", "query") == 0
    assert views.parse_id(str(2**53 - 1), "run") == 2**53 - 1
    for bad, message in (("abc", "whole number"), ("-1", "whole number"), ("1e3", "whole number"),
                         ("٣", "whole number"), ("1" * 23, "between 0 and"), (str(2**53), "between 0 and"),
                         ("", "whole number")):
        with pytest.raises(ConfigError, match=message):
            views.parse_id(bad, "run")
    with pytest.raises(ConfigError, match="between 1 and"):
        views.parse_id("0", "run", lowest=1)
    with pytest.raises(ConfigError) as error:
        views.parse_id("9" * 20_000, "run")
    assert len(str(error.value)) < 200


def test_parse_ids_and_k_and_pick():
    assert views.parse_ids("3,7, 9,", "methods") == (3, 7, 9)
    with pytest.raises(ConfigError, match="methods must be a whole number"):
        views.parse_ids("3,x", "methods")
    assert views.parse_k("10", 100) == 10
    for bad, message in (("0", "between 1 and"), ("100000", "between 1 and"), ("500", "at most 100"),
                         ("abc", "whole number"), ("7" * 30, "from 1 to 100")):
        with pytest.raises(ConfigError, match=message):
            views.parse_k(bad, 100)
    assert views.pick("10", [5, 10], "k") == 10
    with pytest.raises(ConfigError, match="k must be one of 5, 10"):
        views.pick("11", [5, 10], "k")


def test_default_k():
    assert views.default_k([]) is None
    assert views.default_k([5, 50, 100]) == 50
    assert views.default_k([5, 10]) == 10


# --- uploads --------------------------------------------------------------------------------------------

def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_open_upload_reads_png_and_jpeg_as_rgb():
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    for fmt in ("PNG", "JPEG"):
        image = views.open_upload(encoded(grey, fmt))
        assert image.mode == "RGB" and image.size == (8, 8)
    pixels = np.asarray(views.open_upload(encoded(grey, "PNG")))
    assert (pixels[..., 0] == np.arange(64).reshape(8, 8)).all()


def test_open_upload_refuses_too_many_pixels_before_decoding(monkeypatch):
    from PIL import ImageFile
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ConfigError, match="8,000 x 6,000 pixels"):
        views.open_upload(header_only_png(8000, 6000))
    with pytest.raises(ConfigError, match="megapixels"):
        views.open_upload(header_only_png(100_000, 100_000))  # beyond PIL's own bomb limit
    assert decoded == []
    with pytest.raises(ConfigError, match="at most 1 megapixels"):
        views.open_upload(header_only_png(1001, 1000), max_pixels=1_000_000)


def test_open_upload_refuses_big_files_and_other_formats():
    small = Image.new("RGB", (4, 4))
    with pytest.raises(ConfigError, match="at most 0 MB"):
        views.open_upload(encoded(small, "PNG"), max_bytes=10)
    for data in (b"not an image", encoded(small, "GIF"), encoded(small, "BMP"), header_only_png(4, 4)):
        with pytest.raises(ConfigError, match="not an image this app can read"):
            views.open_upload(data)


# --- data & models ----------------------------------------------------------------------------------

def test_extraction_config_merges_ticked_and_typed_names():
    config = views.extraction_config("demo", ["random:test_vit"], " random:test_vit , random:test_efficientnet,")
    assert config.models == ("random:test_vit", "random:test_efficientnet") and config.force is False
    assert views.extraction_config("demo", ["random:test_vit"], "", force=True).force is True
    with pytest.raises(ModelError, match="no_such_model"):
        views.extraction_config("demo", [], "no_such_model")
    with pytest.raises(ConfigError, match="at least one model"):
        views.extraction_config("demo", [], " , ")


def test_cached_rows_measure_the_file(tmp_path):
    path = tmp_path / "e.npy"
    path.write_bytes(b"\0" * (3 * 2**20))
    row = views.cached_rows([SimpleNamespace(model_name="m", n=3, dim=4, dtype="float32", path=str(path))])[0]
    assert row["MB"] == 3.0 and row["model"] == "m"
    gone = views.cached_rows([SimpleNamespace(model_name="m", n=3, dim=4, dtype="float32", path=str(tmp_path / "x"))])
    assert math.isnan(gone[0]["MB"])


# --- methods --------------------------------------------------------------------------------------------

def entry(result_id: int, method: Method, score: float, k: int = 50, selected_on: str = "none",
          run_kind: str = "evaluate") -> Entry:
    return Entry(result_id, result_id, run_kind, method, {"map@k": score, "k": k}, selected_on)


def test_method_options_order_and_defaults():
    a, b = Method.single("a"), Method.single("b")
    concat = Method.concat(["a", "b"], [1, 2])
    head = Method.head(["a", "b"], "/heads/run-9", "mlp head")
    entries = [entry(1, a, 0.50), entry(2, b, 0.60), entry(3, concat, 0.70, selected_on="eval", run_kind="promote"),
               entry(4, head, 0.65, selected_on="validation", run_kind="train_head"), entry(5, a, 0.55, k=10)]
    options = views.method_options(entries, ["a", "b", "c"])
    assert list(options) == ["b", "a", "c", "a(1)+b(2) [concat, oracle]", "mlp head [head]"]
    assert options["b"] == (b, 2) and options["c"] == (Method.single("c"), None)
    assert options["mlp head [head]"].result_id == 4
    assert views.default_methods(options) == ["b", "a(1)+b(2) [concat, oracle]"]
    assert views.default_methods(options, [4, 1, 4, 99]) == ["mlp head [head]", "a"]
    only_singles = views.method_options([], ["x", "y", "z"])
    assert list(only_singles) == ["x", "y", "z"] and views.default_methods(only_singles) == ["x", "y"]
    assert views.single_and_fused([head, a, concat]) == (1, 0)
    assert views.single_and_fused([a, b]) == (0, None)


def scores(values: list[float], n_relevant: list[int]) -> QueryScores:
    v = np.array(values, dtype=float)
    return QueryScores(5, v, v, v, v, np.array(n_relevant))


def test_changed_and_hardest_rows_against_a_loop():
    rng = np.random.default_rng(0)
    n = 40
    single = scores(rng.random(n).round(2).tolist(), [3] * (n - 2) + [0, 0])
    ensemble = scores(rng.random(n).round(2).tolist(), [3] * (n - 2) + [0, 0])
    rows, labels, names = np.arange(n) * 2 + 1, rng.integers(0, 3, n), ["cat", "dog", "fox"]
    for improved in (True, False):
        got = views.changed_rows(ensemble, single, rows, labels, names, 5, improved)
        expected = []
        for p in range(n - 2):  # the two queries without relevant items never appear
            change = ensemble.ap_at_k[p] - single.ap_at_k[p]
            if (change > 0) if improved else (change < 0):
                expected.append((-abs(change), p))
        expected = [p for _, p in sorted(expected)][:50]
        assert [r["id"] for r in got] == [int(rows[p]) for p in expected]
        for r, p in zip(got, expected):
            assert r["class"] == names[labels[p]] and r["change"] == pytest.approx(ensemble.ap_at_k[p] - single.ap_at_k[p])
            assert r["AP@5 single"] == single.ap_at_k[p] and r["AP@5 ensemble"] == ensemble.ap_at_k[p]
    hardest = views.hardest_rows(single, rows, labels, names, 5, "m")
    expected = sorted(range(n - 2), key=lambda p: (single.ap_at_k[p], p))[:50]
    assert [r["id"] for r in hardest] == [int(rows[p]) for p in expected]
    assert [r["AP@5 (m)"] for r in hardest] == [single.ap_at_k[p] for p in expected]


def test_points_by_class():
    labels = np.array([2, 0, 2, 2, 0])
    assert [(c, p.tolist()) for c, p in views.points_by_class(labels, 4)] == [(0, [1, 4]), (2, [0, 2, 3])]


# --- tables -------------------------------------------------------------------------------------------

def test_ranked_puts_nan_last_and_keeps_ties_in_order():
    table = [{"m": "a", "s": 0.5}, {"m": "b", "s": float("nan")}, {"m": "c", "s": 0.7}, {"m": "d", "s": 0.5}]
    assert [r["m"] for r in views.ranked(table, "s")] == ["c", "a", "d", "b"]
    assert [r["m"] for r in views.ranked(table, "s", 2)] == ["c", "a"]


def test_interval_text():
    stats = {"ci_low": -0.0123, "ci_high": 0.04, "p_value": 0.0312, "wins": 7, "losses": 3, "verdict": "better"}
    assert views.interval_text(stats) == "95 % CI -0.0123 to +0.0400, p = 0.031; 7 queries better, 3 worse: better"
    assert views.interval_text(None) == "no per-query scores kept: no interval"


def test_relative_gain():
    assert views.relative_gain(0.05, 0.5) == pytest.approx(10.0)
    assert math.isnan(views.relative_gain(0.05, 0.0)) and math.isnan(views.relative_gain(0.05, float("nan")))


@pytest.mark.parametrize("weights, n_models", [((0, 1, 2), 2), ((1, 2), 3), ((0, 0.5, 1, 3), 4), ((0,), 1)])
def test_grid_size_counts_the_product_without_the_zero_vector(weights, n_models):
    expected = sum(1 for v in itertools.product(weights, repeat=n_models) if any(v))
    assert views.grid_size(weights, n_models) == expected


def test_distinct_rows_and_pages():
    table = [{"rank": 1, "same as": ""}, {"rank": 2, "same as": "1, 1"}, {"rank": 3, "same as": ""}]
    assert [r["rank"] for r in views.distinct_rows(table)] == [1, 2]
    assert views.page_count(0, 50) == 1 and views.page_count(50, 50) == 1 and views.page_count(51, 50) == 2
    assert views.page_of(list(range(7)), 2, 3) == [3, 4, 5] and views.page_of(list(range(7)), 3, 3) == [6]


def test_heatmap_takes_the_best_over_the_other_weights():
    rng = np.random.default_rng(1)
    table = [{"w:a": a, "w:b": b, "w:c": c, "map@k": float(rng.random())}
             for a, b, c in itertools.product([0, 1, 3], repeat=3) if a or b or c]
    table[4]["map@k"] = float("nan")
    grid = views.heatmap(table, "w:a", "w:b", "map@k")
    assert grid.rows == [0, 1, 3] and grid.columns == [0, 1, 3]
    for i, a in enumerate(grid.rows):
        for j, b in enumerate(grid.columns):
            found = [r["map@k"] for r in table if r["w:a"] == a and r["w:b"] == b and r["map@k"] == r["map@k"]]
            if found:
                assert grid.z[i][j] == max(found)
            else:
                assert math.isnan(grid.z[i][j])
    two = views.heatmap([{"x": 1, "y": 0, "s": 0.25}, {"x": 0, "y": 1, "s": 0.5}], "x", "y", "s")
    assert two.labels() == [["", "0.5000"], ["0.2500", ""]]


def test_best_by_weight_takes_the_best_over_the_other_weights():
    rng = np.random.default_rng(2)
    table = [{"w:a": a, "w:b": b, "w:c": c, "map@k": float(rng.random())}
             for a, b, c in itertools.product([0, 1, 3], repeat=3) if a or b or c]
    table[2]["map@k"] = float("nan")
    profiles = views.best_by_weight(table, ["a", "b", "c"], "map@k")
    assert list(profiles) == ["a", "b", "c"]
    for model, points in profiles.items():
        assert [w for w, _ in points] == [0, 1, 3]
        for weight, best in points:
            assert best == max(r["map@k"] for r in table if r[f"w:{model}"] == weight and r["map@k"] == r["map@k"])


def test_result_rows_and_run_comparison():
    run = SimpleNamespace(id=7, duration_s=1.5)
    head = Method.head(["a", "b"], "/h", "mlp head")
    rrf = Method.fused("rank", ["a", "b"], rule="rrf")
    greedy = Method.concat(["a", "b"], [3, 1])
    rows = views.result_rows([(run, [Entry(3, 7, "train_head", head, {"map@k": 0.4, "k": 5}, "validation"),
                                     Entry(4, 7, "fuse", rrf, {"map@k": 0.5, "k": 5}),
                                     Entry(5, 7, "select_weights", greedy, {"map@k": 0.6, "k": 5}, "train",
                                           extra={"path": {"greedy": [], "refined": []}}),
                                     Entry(6, 7, "sweep", greedy, {"map@k": 0.7, "k": 5}, "eval")])])
    assert rows[0] == {"run_id": 7, "method": "mlp head", "type": "head", "models": "a + b", "weights": "",
                       "map@k": 0.4, "map@k_hits": rows[0]["map@k_hits"], "map@r": rows[0]["map@r"], "p@1": rows[0]["p@1"],
                       "k": 5, "chosen on": "validation", "one embedding per image": True, "greedy path": False,
                       "duration_s": 1.5, "result_id": 3}
    assert math.isnan(rows[0]["p@1"])
    assert [(r["type"], r["one embedding per image"], r["greedy path"], r["chosen on"]) for r in rows[1:]] == [
        ("rank", False, False, "none"), ("concat", True, True, "train"), ("concat", True, False, "oracle (tuned on eval)")]
    assert rows[2]["weights"] == "3, 1"
    a = [{"method": "x", "map@k": 0.5}, {"method": "y", "map@k": 0.25}, {"method": "x", "map@k": 0.1}]
    b = [{"method": "y", "map@k": 0.5}, {"method": "z", "map@k": 0.75}]
    assert views.run_comparison(1, a, 2, b) == [
        {"method": "x", "run 1 map@k": 0.5, "run 2 map@k": None, "difference": None},
        {"method": "y", "run 1 map@k": 0.25, "run 2 map@k": 0.5, "difference": 0.25},
        {"method": "z", "run 1 map@k": None, "run 2 map@k": 0.75, "difference": None},
    ]


def test_run_listing_counts_results_and_pages(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    db.init_db(engine)
    sizes = [0, 3, 1, 5]
    with db.begin_immediate(engine) as session:
        dataset = db.record_dataset(session, name="d", source="demo", fingerprint="f", n_images=1, n_classes=1)
        for i, n in enumerate(sizes):
            run = db.start_run(session, kind="sweep" if i % 2 else "evaluate", title=f"run {i}",
                               dataset_id=dataset.id if i else None)
            db.finish_run(session, run.id, [{"method": Method.single(f"m{j}"), "metrics": {"map@k": 0.1}}
                                            for j in range(n)])
        db.fail_run(session, db.start_run(session, kind="evaluate", title="broken").id, "boom\nTraceback")
    listing = views.run_listing(engine, None, 10, 0)
    with db.read_session(engine) as session:
        expected = {r.id: (len(r.results), r.dataset.name if r.dataset else "") for r in db.list_runs(session, limit=10)}
    assert {r["id"]: (r["results"], r["dataset"]) for r in listing} == expected
    assert [r["id"] for r in listing] == sorted(expected, reverse=True)  # newest first
    assert listing[0]["error"] == "boom" and listing[0]["status"] == "failed"
    assert [r["id"] for r in views.run_listing(engine, None, 2, 2)] == [r["id"] for r in listing[2:4]]
    assert {r["kind"] for r in views.run_listing(engine, "sweep", 10, 0)} == {"sweep"}


def test_curve_points_in_epoch_order(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    db.init_db(engine)
    with db.begin_immediate(engine) as session:
        run = db.start_run(session, kind="train_head", title="h")
        for epoch in (1, 2, 3):
            db.add_curve_point(session, run.id, epoch, {"epoch": epoch, "loss": 1.0 / epoch})
    assert views.curve_points(engine, run.id) == [{"epoch": e, "loss": 1.0 / e} for e in (1, 2, 3)]
    assert views.curve_points(engine, run.id + 1) == []


# --- every fusion method in the explorer ----------------------------------------------------------------

def test_method_options_for_a_map_leave_out_methods_without_embeddings():
    a, b = Method.single("a"), Method.single("b")
    entries = [entry(1, a, 0.5), entry(2, b, 0.6), entry(3, Method.fused("rank", ["a", "b"], rule="rrf"), 0.7),
               entry(4, Method.fused("qe", ["a", "b"], n=2, alpha=3.0), 0.65),
               entry(5, Method.fused("dba", ["a", "b"], n=2, alpha=3.0), 0.62)]
    every = views.method_options(entries, ["a", "b"])
    assert [o.method.kind for o in every.values()] == ["single", "single", "rank", "qe", "dba"]
    mapped = views.method_options(entries, ["a", "b"], embedding_only=True)
    assert [o.method.kind for o in mapped.values()] == ["single", "single", "dba"]


def test_list_k_uses_the_stored_k():
    assert views.list_k([50, None, 50], 10) == 50
    assert views.list_k([None, None], 10) == 10 and views.list_k([], 7) == 7
    with pytest.raises(ConfigError, match=r"different k \(10, 50\)"):
        views.list_k([50, 10], 10)


def brute_top(x: np.ndarray, position: int, k: int) -> tuple[list[int], list[float]]:
    """float64 cosine of one row against the others, ranked by (-similarity, index): a slow loop."""
    x = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    pairs = sorted((-float(x[position] @ x[j]), j) for j in range(len(x)) if j != position)
    return [j for _, j in pairs[:k]], [-s for s, _ in pairs[:k]]


def ap_at_k(hits: list[bool], n_relevant: int, k: int) -> float:
    """map@k of one query by hand: sum of P@i at each hit within k, over min(k, R)."""
    found, total = 0, 0.0
    for i, hit in enumerate(hits[:k], start=1):
        if hit:
            found += 1
            total += found / i
    return total / min(k, n_relevant) if n_relevant else float("nan")


def test_query_top_of_an_embedding_method_against_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 30)
    method = Method.single("a")
    for position in (0, 7, 29):
        top = views.query_top(method, labels, position, 5, embeddings=x / np.linalg.norm(x, axis=1, keepdims=True))
        ids, sims = brute_top(x, position, 5)
        assert top.positions.tolist() == ids
        assert np.allclose(top.similarities, sims, atol=1e-5)
        n_relevant = int((labels == labels[position]).sum()) - 1
        assert top.ap == pytest.approx(ap_at_k([labels[j] == labels[position] for j in ids], n_relevant, 5))


def test_query_top_of_a_ranking_method_reads_its_ranking():
    labels = np.array([0, 0, 1, 1, 0, 2])
    ranking = np.array([[4, 2, 1, 3, 5], [0, 2, 4, 3, 5], [3, 0, 1, 4, 5], [2, 1, 0, 4, 5], [1, 0, 2, 3, 5],
                        [0, 1, 2, 3, 4]])
    rrf = Method.fused("rank", ["a", "b"], rule="rrf")
    top = views.query_top(rrf, labels, 0, 3, ranking=ranking)
    assert top.positions.tolist() == [4, 2, 1] and top.similarities is None
    assert top.ap == pytest.approx((1 / 1 + 2 / 3) / 2)  # hits at ranks 1 and 3, R = 2
    assert views.query_top(rrf, labels, 2, 2, ranking=ranking).ap == pytest.approx(1.0)  # R = 1, hit at rank 1
    assert math.isnan(views.query_top(rrf, labels, 5, 3, ranking=ranking).ap)  # alone in its class
    with pytest.raises(ValueError, match="pass its ranking"):
        views.query_top(rrf, labels, 0, 3, embeddings=np.eye(6, dtype=np.float32))


def test_which_methods_embed_and_export():
    expected = {"single": (True, True), "concat": (True, True), "head": (True, True), "rank": (False, False),
                "qe": (False, False), "dba": (True, False)}
    rows = views.method_kind_rows()
    assert {r["kind"]: (r["one embedding per image"], r["exportable"]) for r in rows} == expected
    assert all(bool(r["why not exportable"]) != r["exportable"] for r in rows)
    assert views.why_not_exportable(Method.concat(["a", "b"], [1, 2])) is None
    reason = views.why_not_exportable(Method.fused("dba", ["a"], n=2, alpha=3.0))
    assert "dba over a" in reason and "depends on the gallery" in reason


def test_chosen_on_says_oracle_for_eval():
    table = [{"method": "x", "chosen on": c} for c in ("none", "train", "validation", "eval")]
    assert [r["chosen on"] for r in views.labelled_board(table)] == ["none", "train", "validation",
                                                                     "oracle (tuned on eval)"]


def test_selection_path_counts_refinement_on_from_the_greedy_steps():
    path = {"greedy": [{"step": 1, "weights": [1, 0], "map@k": 0.5}, {"step": 2, "weights": [1, 1], "map@k": 0.6},
                       {"step": 3, "weights": [2, 1], "map@k": 0.58}],
            "refined": [{"step": 0, "weights": [1, 1], "map@k": 0.6}, {"step": 1, "weights": [1, 1.5], "map@k": 0.61}]}
    assert views.selection_path(path) == [
        {"phase": "greedy", "step": 1, "map@k": 0.5, "weights": "1, 0"},
        {"phase": "greedy", "step": 2, "map@k": 0.6, "weights": "1, 1"},
        {"phase": "greedy", "step": 3, "map@k": 0.58, "weights": "2, 1"},
        {"phase": "refined", "step": 3, "map@k": 0.6, "weights": "1, 1"},
        {"phase": "refined", "step": 4, "map@k": 0.61, "weights": "1, 1.5"},
    ]
    assert views.selection_path(None) == [] and views.selection_path({"greedy": []}) == []


# --- complementarity ------------------------------------------------------------------------------------

SUMMARY = {"models": ["a", "b", "c"], "k": 10, "n_queries": 90, "n_excluded": 2, "cka_rows": 92,
           "map@k": [0.5, 0.6, 0.4], "best_single": 0.6, "oracle_all": 0.75,
           "overlap@k": [[1, 0.3, 0.2], [0.3, 1, 0.5], [0.2, 0.5, 1]],
           "jaccard@k": [[1, 0.2, 0.1], [0.2, 1, 0.3], [0.1, 0.3, 1]],
           "cka": [[1, 0.8, None], [0.8, 1, 0.7], [None, 0.7, 1]],
           "ap_pearson": [[1, 0.4, 0.1], [0.4, 1, 0.2], [0.1, 0.2, 1]],
           "ap_spearman": [[1, 0.35, 0.15], [0.35, 1, 0.25], [0.15, 0.25, 1]],
           "oracle_pair": [[0.5, 0.7, 0.55], [0.7, 0.6, 0.7], [0.55, 0.7, 0.4]]}


def test_pair_matrices_keep_every_measure_and_blank_the_undefined():
    matrices = views.pair_matrices(SUMMARY)
    assert [m.key for m in matrices] == ["overlap@k", "jaccard@k", "cka", "ap_pearson", "ap_spearman", "oracle_pair"]
    cka = matrices[2]
    assert cka.models == ["a", "b", "c"] and math.isnan(cka.z[0][2]) and cka.z[1][2] == 0.7
    assert matrices[3].zmin == -1.0 and matrices[0].zmin == 0.0 and matrices[5].zmin is None
    assert [m.key for m in views.pair_matrices({k: v for k, v in SUMMARY.items() if k != "cka"})] == [
        "overlap@k", "jaccard@k", "ap_pearson", "ap_spearman", "oracle_pair"]


def test_complementarity_rows_name_each_models_best_partner():
    # b's pair oracle is 0.7 with both a and c: the first (a) is named
    assert views.complementarity_rows(SUMMARY) == [
        {"model": "a", "map@k": 0.5, "best partner": "b", "pair oracle": 0.7},
        {"model": "b", "map@k": 0.6, "best partner": "a", "pair oracle": 0.7},
        {"model": "c", "map@k": 0.4, "best partner": "b", "pair oracle": 0.7}]


def test_oracle_text_states_the_ceiling():
    text = views.oracle_text(SUMMARY)
    assert "map@10 0.7500" in text and "0.6000" in text and "+0.1500" in text and "+25.0%" in text
    assert "Upper bound" in text and "90 queries" in text


# --- cost ---------------------------------------------------------------------------------------------------

def test_cost_rows_say_not_measured_and_mark_the_front():
    a, b, c = Method.single("a"), Method.single("b"), Method.single("c")
    ab = Method.concat(["a", "b"], [1, 1])
    ac = Method.concat(["a", "c"], [1, 1])
    gone = Method.single("gone")  # embeddings not in this workspace: no cost at all
    entries = [entry(1, a, 0.5), entry(2, b, 0.6), entry(3, c, 0.55), entry(4, ab, 0.7, selected_on="eval"),
               entry(5, ac, 0.65), entry(6, gone, 0.9)]
    costs = {"a": (0.001, 100), "b": (0.004, 300), "c": (None, 50)}
    front = [entries[0], entries[1], entries[3]]
    rows = views.cost_rows(entries, costs, "seconds_per_image", front)
    by_id = {r["result_id"]: r for r in rows}
    assert by_id[1]["ms per image"] == "1.00" and by_id[1]["cost"] == pytest.approx(1.0) and by_id[1]["dims"] == 100
    assert by_id[4]["ms per image"] == "5.00" and by_id[4]["cost"] == pytest.approx(5.0) and by_id[4]["dims"] == 400
    assert by_id[4]["chosen on"] == "oracle (tuned on eval)"
    for unmeasured in (3, 5):  # c's time was never measured: never shown as 0
        assert by_id[unmeasured]["ms per image"] == views.NOT_MEASURED and by_id[unmeasured]["cost"] is None
    assert by_id[5]["dims"] == 150
    assert by_id[6]["dims"] is None and by_id[6]["cost"] is None and by_id[6]["ms per image"] == views.NOT_MEASURED
    assert [r["result_id"] for r in rows if r["pareto"]] == [1, 2, 4]
    dims = views.cost_rows(entries, costs, "dims", [])
    assert [r["cost"] for r in dims] == [100, 300, 50, 400, 150, None]


def test_default_budget_is_what_the_best_single_model_costs():
    a, b = Method.single("a"), Method.single("b")
    entries = [entry(1, a, 0.5), entry(2, b, 0.6)]
    costs = {"a": (0.001, 100), "b": (0.004, 300)}
    assert views.default_budget(entries, costs, "seconds_per_image") == pytest.approx(4.0)  # ms
    assert views.default_budget(entries, costs, "dims") == 300
    unmeasured_best = {"a": (0.001, 100), "b": (None, 300)}  # then: the dearest measured method
    assert views.default_budget(entries + [entry(3, Method.concat(["a", "c"], [1, 1]), 0.4)],
                                {**unmeasured_best, "c": (0.002, 10)}, "seconds_per_image") == pytest.approx(3.0)
    assert views.default_budget(entries, {"b": (None, 300)}, "seconds_per_image") is None
    assert views.default_budget([], costs, "dims") is None


# --- the Start page ----------------------------------------------------------------------------------------

def test_dataset_facts_read_the_newest_row_of_a_source(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    db.init_db(engine)
    with db.begin_immediate(engine) as session:
        db.record_dataset(session, name="old", source="/data/set", fingerprint="f1", n_images=10, n_classes=2)
    with db.begin_immediate(engine) as session:
        db.record_dataset(session, name="new", source="/data/set", fingerprint="f2", n_images=12, n_classes=3)
        db.record_dataset(session, name="demo", source="demo", fingerprint="f3", n_images=4000, n_classes=10)
    assert views.dataset_facts(engine, "/data/set") == views.DatasetFacts("new", "f2", 12, 3)
    assert views.dataset_facts(engine, "demo") == views.DatasetFacts("demo", "f3", 4000, 10)
    assert views.dataset_facts(engine, "/elsewhere") is None


def test_queries_scored_counts_excluded_queries_too():
    a = Method.single("a")
    assert views.queries_scored([]) == 0
    entries = [Entry(1, 1, "evaluate", a, {"map@k": 0.5, "k": 5, "n_queries": 98, "n_excluded": 2}),
               Entry(2, 2, "evaluate", a, {"map@k": 0.5, "k": 5})]
    assert views.queries_scored(entries) == 100


def test_active_demo_jobs_are_the_demos_kinds_on_its_dataset():
    from core import configs
    job = lambda i, kind, dataset: SimpleNamespace(id=i, kind=kind, params={"dataset": dataset})  # noqa: E731
    active = [job(1, "extract", "demo"), job(2, "sweep", "demo"), job(3, "extract", "/data/set"),
              job(4, "complementarity", "demo"), SimpleNamespace(id=5, kind="extract", params=None)]
    assert [j.id for j in views.active_demo_jobs(active, configs.demo_jobs())] == [1, 2]
    assert views.active_demo_jobs([], configs.demo_jobs()) == []


def test_zip_folder_unpacks_to_the_folder(tmp_path):
    import zipfile
    folder = tmp_path / "result-3"
    (folder / "head").mkdir(parents=True)
    (folder / "manifest.json").write_text('{"format": "x"}')
    (folder / "head" / "head.safetensors").write_bytes(b"\x00\x01" * 100)
    with zipfile.ZipFile(io.BytesIO(views.zip_folder(folder))) as archive:
        assert sorted(archive.namelist()) == ["result-3/head/head.safetensors", "result-3/manifest.json"]
        assert archive.read("result-3/head/head.safetensors") == b"\x00\x01" * 100


# --- the explorer's lists at 50,000 queries -----------------------------------------------------------------

def test_query_lists_at_fifty_thousand_queries_against_a_loop():
    """Stored per-query scores of 50,000 queries (synthetic, with ties and excluded queries): the fixed /
    broke / hardest lists equal a plain Python loop over every query."""
    n = 50_000
    rng = np.random.default_rng(50)
    relevant = rng.integers(0, 40, n)
    relevant[rng.choice(n, 500, replace=False)] = 0
    single_ap = np.where(relevant > 0, rng.integers(0, 21, n) / 20, np.nan)  # coarse values: many ties
    ensemble_ap = np.where(relevant > 0, rng.integers(0, 21, n) / 20, np.nan)
    single = QueryScores(50, single_ap, single_ap, single_ap, single_ap, relevant)
    ensemble = QueryScores(50, ensemble_ap, ensemble_ap, ensemble_ap, ensemble_ap, relevant)
    rows, labels = np.arange(n) * 3, rng.integers(0, 100, n)
    names = [f"class {c}" for c in range(100)]
    for improved in (True, False):
        got = views.changed_rows(ensemble, single, rows, labels, names, 50, improved)
        changes = []
        for p in range(n):
            if relevant[p] == 0:
                continue
            change = float(ensemble_ap[p]) - float(single_ap[p])
            if (change > 0) if improved else (change < 0):
                changes.append((-abs(change), p))
        expected = [p for _, p in sorted(changes)][:50]
        assert [r["id"] for r in got] == [3 * p for p in expected]
        assert [r["class"] for r in got] == [names[labels[p]] for p in expected]
    hardest = views.hardest_rows(ensemble, rows, labels, names, 50, "e")
    expected = sorted((p for p in range(n) if relevant[p] > 0), key=lambda p: (float(ensemble_ap[p]), p))[:50]
    assert [r["id"] for r in hardest] == [3 * p for p in expected]
