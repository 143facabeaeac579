"""Labels are mapped to contiguous classes (never used as indices), unusable label columns are refused,
empty texts are dropped with a count, and unreadable data files are reported with file, line and
cause."""
from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from debora.train import TrainConfig, train
from debora.train.data import load_text
from debora.train.labels import LabelMap
from test_train_tiny import make_dataset, one_thread, tiny_config  # noqa: F401  (autouse fixture)


# -- LabelMap ------------------------------------------------------------------------------------
def test_sparse_integer_labels_are_two_classes():
    lm = LabelMap.fit([3, 1000000, 3, 1000000], "d")
    assert lm.num_classes == 2 and lm.names == ("3", "1000000")
    assert lm.encode([1000000, 3]).tolist() == [1, 0]


def test_equal_values_of_different_spelling_are_one_class():
    lm = LabelMap.fit([1, "1", 1.0, True, 0, "0", False, 0.0], "d")
    assert lm.names == ("0", "1") and lm.encode([True, "0", 1.0]).tolist() == [1, 0, 1]


@pytest.mark.parametrize("values, match", [
    ([1] * 10, "every row \\(10\\) has the label 1: a single class"),
    (["pos", "pos"], "a single class"),
    (["pos", 0, 1, 0, 1, 1], "mixes numbers \\(0, 1\\) and text \\('pos'\\)"),
    (["pos", "0", "1", "0", "1", "1"], "mixes numbers"),
    ([0.5, 1.5, 0.5, 1.5], "regression target"),
    ([0, 1, None, 1], "1 of 4 rows have no label \\(rows 3"),
    ([0, 1, float("nan"), 1], "have no label"),
    ([0, 1, "", 1], "have no label"),
    ([f"a review number {i}" for i in range(20)], "20 distinct labels in 20 rows .* ID or a text column"),
    (list(range(10)), "looks like an ID"),
    ([[1], [2]], "must be integers or text"),
])
def test_unusable_label_columns_are_refused(values, match):
    with pytest.raises(ValueError, match=match):
        LabelMap.fit(values, "reviews.csv", "stars")


def test_many_classes_need_the_flag():
    values = list(range(10)) * 1
    assert LabelMap.fit(values, "d", allow_many_classes=True).num_classes == 10
    assert LabelMap.fit(list(range(5)) * 2, "d").num_classes == 5        # half the rows: fine


def test_unknown_eval_labels_are_refused():
    lm = LabelMap.fit(["neg", "pos"], "d")
    with pytest.raises(ValueError, match="not among the training classes \\['neg', 'pos'\\] \\(e.g. 'neutral'"):
        lm.encode(["pos", "neutral"], "d")


@given(st.lists(st.integers(-10**9, 10**9), min_size=2, max_size=8, unique=True), st.data())
def test_mapping_is_contiguous_order_preserving_and_invertible(classes, data):
    rows = data.draw(st.lists(st.sampled_from(classes), min_size=2 * len(classes), max_size=60))
    rows += classes                                     # every class present
    lm = LabelMap.fit(rows, "d")
    y = lm.encode(rows)
    assert sorted(set(y.tolist())) == list(range(len(classes)))
    assert [int(lm.names[i]) for i in y] == rows
    order = np.argsort(rows, kind="stable")
    assert np.all(np.diff(y[order]) >= 0)


# -- through the data loader ----------------------------------------------------------------------------
def _csv(path, rows, header=("sentence", "sentiment")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _cfg(path, **kw):
    return TrainConfig(dataset=str(path), text_column="sentence", label_column="sentiment", **kw)


def test_loader_maps_sparse_labels_and_keeps_names(tmp_path):
    p = _csv(tmp_path / "d.csv", [(f"text {i}", 3 if i % 2 else 1000000) for i in range(20)])
    raw = load_text(_cfg(p))
    assert raw.label_names == ["3", "1000000"] and set(raw.labels.tolist()) == {0, 1}


def test_loader_swapped_columns_and_single_class(tmp_path):
    p = _csv(tmp_path / "d.csv", [(f"text {i}", "pos" if i % 2 else "neg") for i in range(40)])
    with pytest.raises(ValueError, match="label column 'sentence': 40 distinct labels in 40 rows"):
        load_text(TrainConfig(dataset=p, text_column="sentiment", label_column="sentence"))
    p1 = _csv(tmp_path / "ones.csv", [(f"text {i}", 1) for i in range(20)])
    with pytest.raises(ValueError, match="a single class"):
        load_text(_cfg(p1))


def test_empty_texts_are_dropped_with_a_count(tmp_path):
    rows = [(f"text {i}" if i % 4 else "", i % 2) for i in range(20)] + [("   ", 1)]
    p = _csv(tmp_path / "d.csv", rows)
    with pytest.warns(UserWarning, match="dropped 6 of 21 rows with an empty or missing text"):
        raw = load_text(_cfg(p))
    assert len(raw) == 15 and raw.dropped_empty == 6 and all(t.strip() for t in raw.texts)
    p = _csv(tmp_path / "e.csv", [("", i % 2) for i in range(10)])
    with pytest.raises(ValueError, match="every text in column 'sentence' is empty or missing"):
        load_text(_cfg(p))
    p = tmp_path / "n.jsonl"
    p.write_text("\n".join(json.dumps({"sentence": None, "sentiment": i % 2}) for i in range(9)))
    with pytest.raises(ValueError, match="every text .* is empty or missing"):
        load_text(_cfg(p))


def test_missing_label_rows_are_numbered_as_in_the_file(tmp_path):
    rows = [("", 0), ("text a", 1), ("text b", ""), ("text c", 0), ("text d", 1)] * 2
    p = _csv(tmp_path / "d.csv", rows)
    with pytest.warns(UserWarning, match="dropped 2"), \
            pytest.raises(ValueError, match="2 of 8 rows have no label \\(rows 3, 8,"):
        load_text(_cfg(p))


def test_hub_class_labels_keep_their_names_and_unlabelled_rows_are_dropped():
    import datasets
    from debora.train.data import _from_table
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    cfg = TrainConfig(text_column="sentence", label_column="label")
    train_t = datasets.Dataset.from_dict({"sentence": ["a", "b", "", "d"], "label": [1, 0, 1, 1]}, features=feats)
    with pytest.warns(UserWarning, match="dropped 1 of 4"):
        raw = _from_table(train_t, cfg, "glue")
    assert raw.label_names == ["negative", "positive"] and raw.labels.tolist() == [1, 0, 1]
    test_t = datasets.Dataset.from_dict({"sentence": ["x", "y"], "label": [-1, -1]}, features=feats)
    assert len(_from_table(test_t, cfg, "glue", label_map=raw.label_map)) == 0     # GLUE test split


def test_training_reports_classes_and_drops(tmp_path):
    data = tmp_path / "d.csv"
    rows = list(csv.reader(open(make_dataset(str(tmp_path / "base.csv"), n=80))))
    rows[3][0] = ""
    _csv(data, rows[1:])
    with pytest.warns(UserWarning, match="dropped 1 of 80"):
        res = train(tiny_config(tmp_path, dataset=str(data), max_iterations=1))
    assert res.summary["labels"] == {"neg": 32, "pos": 31} or sum(res.summary["labels"].values()) == 63
    assert set(res.summary["labels"]) == {"neg", "pos"} and res.summary["dropped_empty_texts"] == 1
    assert res.model.config.id2label == {0: "neg", 1: "pos"}
    saved = json.load(open(f"{res.output_dir}/labels.json"))
    assert saved["names"] == ["neg", "pos"] and saved["train_counts"] == res.summary["labels"]
    assert saved["dropped_empty_texts"] == 1


# -- unreadable files ------------------------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    (b"", "is empty: it needs a header row"),
    (b"\n\n", "is empty"),
    (b"sentence,sentiment\n", "has a header \\['sentence', 'sentiment'\\] but no data rows"),
    (b"sentence,sentiment\ngood,1\nbad,0,extra\n", "line 3: 3 fields, but the header"),
    (b"sentence,sentiment\ngood,1\nbad \xff\xfe movie,0\n", "line 3: not valid UTF-8"),
])
def test_bad_csv_files_name_file_line_and_cause(tmp_path, content, match):
    p = tmp_path / "d.csv"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=f"dataset file '{p}'.*{match}"):
        load_text(_cfg(p))


def test_jsonl_broken_at_row_50(tmp_path):
    lines = [json.dumps({"sentence": f"t{i}", "sentiment": i % 2}) for i in range(100)]
    lines[49] = lines[49][:-5]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=f"dataset file .{p}., line 50: invalid JSON \\(Unterminated string "
                                         "starting at, column 21\\)"):
        load_text(_cfg(p))
    lines[49] = "[1, 2]"
    p.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="line 50: a list, not a JSON object"):
        load_text(_cfg(p))


def test_json_array_and_gz(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"sentence": "a", "sentiment": 0},\n {"sentence": "b", "sentiment": 1}, oops]')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_text(_cfg(p))
    p.write_text("[]")
    with pytest.raises(ValueError, match="empty list"):
        load_text(_cfg(p))
    g = tmp_path / "d.csv.gz"
    with gzip.open(g, "wb") as fh:
        fh.write(b"sentence,sentiment\n\xc3\x28bad,1\n")
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        load_text(_cfg(g))
    g.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot be read"):
        load_text(_cfg(g))


# -- fuzz: any CSV either loads into usable data or is refused naming the file ------------------------
cells = st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8),
                  st.sampled_from(["", "pos", "neg", "0", "1", "1.5", "nan", "3", "1000000", "a,b", '"q"']),
                  st.integers(-3, 3).map(str))


labels_col = st.one_of(st.sampled_from(["pos", "neg"]), st.sampled_from(["0", "1", "2"]), cells)


@given(header=st.sampled_from([["sentence", "sentiment"], ["sentiment", "sentence"], ["sentence"],
                               ["sentence", "sentiment", "extra"]]), data=st.data(),
       ragged=st.booleans(), junk=st.one_of(st.none(), st.none(), st.binary(min_size=1, max_size=6)))
def test_fuzz_csv_loads_usable_data_or_is_refused_naming_the_file(tmp_path_factory, header, data, ragged,
                                                                  junk):
    import io
    row = st.fixed_dictionaries({h: labels_col if h == "sentiment" else cells for h in header}).map(
        lambda r: [r[h] for h in header])
    if ragged:      # rows of any width
        row = st.lists(cells, min_size=1, max_size=3)
    rows = data.draw(st.lists(row, max_size=30), label="rows")
    path = tmp_path_factory.mktemp("csvfuzz") / "d.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8") + (junk or b"")
    path.write_bytes(data)
    try:
        raw = load_text(_cfg(path))
    except ValueError as err:
        assert str(path) in str(err) and "\n" not in str(err), str(err)
        return
    k = len(raw.label_names)
    assert k >= 2 and len(raw) >= 2 and k <= max(2, len(raw) // 2)
    assert sorted(set(raw.labels.tolist())) == list(range(k))
    assert all(t.strip() for t in raw.texts)
