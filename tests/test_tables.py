"""Real tables as they come: the odd cells, labels and files that each once gave a wrong model,
a misleading message or a traceback."""

import json

import numpy as np
import pytest
import torch

import train
from util import flags


def rows_csv(path, header: str, rows: list[str]):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def data_of(tmp_path, source, *extra, label="y"):
    return train.build_data(train.parse_config(flags(tmp_path, source, *extra, label=label)))


def test_balanced_class_weights_compose_with_label_smoothing_on_a_rare_class(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 2))
    y = (x[:, 0] > 1.75).astype(int)  # about 4% positive, learnable from one input
    source = rows_csv(tmp_path / "rare.csv", "a,b,y", [f"{a:.4f},{b:.4f},{'yes' if t else 'no'}" for (a, b), t in zip(x, y)])
    summary = train.main(flags(tmp_path, source, "--class-weight", "balanced", "--label-smoothing", "0.1",
                               label="y", epochs=15))
    report = summary["report"]
    assert report["acc"] > 0.9 and report["balanced_acc"] > 0.85  # not every row called the rare class
    objective = train.build_objective({"task": "classification", "classes": ["a", "b", "c"],
                                       "class_counts": [80, 15, 5]}, train.parse_config(["--class-weight", "balanced"]))
    out, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    weights = 100 / (3 * torch.tensor([80.0, 15.0, 5.0]))
    by_hand = torch.nn.functional.cross_entropy(out, target, label_smoothing=0.1, reduction="none") * weights[target]
    assert objective.loss(out, target).item() == pytest.approx(by_hand.mean().item())


def test_class_names_that_look_blank_are_classes_and_spaces_do_not_split_them(tmp_path):
    source = rows_csv(tmp_path / "labels.csv", "a,y", [f"{i},{['none', '-', 'NA', '?', 'yes', 'yes '][i % 6]}"
                                                        for i in range(60)] + ["99,"])
    data = data_of(tmp_path, source)
    assert data["meta"]["classes"] == ["-", "?", "NA", "none", "yes"]  # "yes " is "yes"; "" is no label
    assert sum(data["meta"]["class_counts"]) + train.split_rows(data["val"]) + train.split_rows(data["test"]) == 60


def test_numeric_category_codes_keep_their_exact_values(tmp_path):
    source = rows_csv(tmp_path / "codes.csv", "zip,a,y", [f"{1000001 + i % 2},{i},{'xy'[i % 2]}" for i in range(40)])
    data = data_of(tmp_path, source, "--categorical-columns", "zip")
    assert set(data["meta"]["preprocess"]["zip"]["categories"]) == {"1000001", "1000002"}
    assert train.category(1.0) == train.category("1") == "1" and train.category(2.5) == "2.5"


def test_rows_to_inputs_refuses_what_the_command_line_refuses(tmp_path):
    source = rows_csv(tmp_path / "t.csv", "width,height,y", [f"{i},{i % 5},{'ab'[i % 2]}" for i in range(40)])
    meta = data_of(tmp_path, source)["meta"]
    assert train.rows_to_inputs([{"width": 1, "height": 2, "y": "a"}], meta)[0].shape == (1, 2)
    with pytest.raises(ValueError, match="row 1 has no 'height'"):
        train.rows_to_inputs([{"width": 1, "hieght": 2}], meta)
    with pytest.raises(ValueError, match="column 'width' needs a finite number"):
        train.rows_to_inputs([{"width": "wide", "height": 2}], meta)


def test_a_predict_file_row_shorter_than_its_header_is_refused_not_misread(tmp_path, capsys):
    source = rows_csv(tmp_path / "t.csv", "width,height,y", [f"{i},{i % 5},{'ab'[i % 2]}" for i in range(40)])
    train.main(flags(tmp_path, source, label="y", epochs=2))
    rows = rows_csv(tmp_path / "rows.csv", "width,height,y", ["1,2,a", "3,4"])  # a row without its label
    with pytest.raises(SystemExit, match="--predict row 2 has 2 values, and the header 3"):
        train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", str(rows)])
    rows = rows_csv(tmp_path / "rows.csv", "y,height,width", ["a,2,1"])  # by name, in any order
    assert train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", str(rows)])["predictions"][0] \
        .startswith("1, 2 -> ")


def test_a_label_column_of_lists_is_one_line(tmp_path):
    source = tmp_path / "nested.jsonl"
    source.write_text("".join(json.dumps({"a": i, "y": {"k": i}}) + "\n" for i in range(12)))
    with pytest.raises(SystemExit, match="'y' holds lists or records, not one label a row"):
        data_of(tmp_path, source)


def test_numeric_class_codes_are_classes_when_the_task_says_so(tmp_path):
    source = rows_csv(tmp_path / "codes.csv", "a,y", [f"{i},{100 + i % 30}" for i in range(300)])
    assert data_of(tmp_path, source, "--task", "auto")["meta"]["task"] == "regression"
    data = data_of(tmp_path, source, "--task", "classification")
    assert data["meta"]["task"] == "classification" and data["meta"]["classes"] == list(range(100, 130))


def test_a_csv_whose_column_shows_its_type_after_10000_rows_loads(tmp_path):
    rows = [f"{i},{i % 7},{'ab'[i % 2]}" for i in range(10_050)] + ["5,2.5,a"]
    data = data_of(tmp_path, rows_csv(tmp_path / "late.csv", "a,b,y", rows))
    assert data["meta"]["preprocess"]["b"]["kind"] == "numeric"


def test_a_header_with_spaces_after_the_commas_names_its_columns(tmp_path):
    source = rows_csv(tmp_path / "spaced.csv", "age, income, churned", [f"{i}, {i * 10}, {'ny'[i % 2]}" for i in range(40)])
    data = data_of(tmp_path, source, label="churned")
    assert data["meta"]["features"] == ["age", "income"]


def test_numbers_with_thousands_separators_and_percent_signs_are_numbers(tmp_path):
    rows = [f'"{1000 + 37 * i:,}",{i % 90}%,{"ab"[i % 2]}' for i in range(60)]
    data = data_of(tmp_path, rows_csv(tmp_path / "formatted.csv", "income,share,y", rows))
    spec = data["meta"]["preprocess"]
    assert spec["income"]["kind"] == spec["share"]["kind"] == "numeric"
    assert train.parse_number("18,111") == 18111 and train.parse_number("19%") == 19 and train.parse_number("1,5") is None


def test_a_true_false_column_trains_and_predicts(tmp_path):
    source = rows_csv(tmp_path / "flags.csv", "member,a,y", [f"{['True', 'False'][i % 2]},{i},{'ab'[i % 3 == 0]}"
                                                             for i in range(60)])
    train.main(flags(tmp_path, source, label="y", epochs=2))
    lines = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", "True,3;False,4"])
    assert len(lines["predictions"]) == 2


def test_a_class_of_two_rows_trains_and_is_named(tmp_path, caplog):
    rows = [f"{i},{'ab'[i % 2]}" for i in range(40)] + ["100,rare", "101,rare"]
    data = data_of(tmp_path, rows_csv(tmp_path / "rare.csv", "a,y", rows))
    assert "class 'rare' has 2 row(s): too few for val and test, so all train" in caplog.text
    assert data["meta"]["class_counts"][data["meta"]["classes"].index("rare")] == 2


def test_id_columns_by_their_usual_names_are_left_out(tmp_path):
    names = "PassengerId,RowNumber,customerID,user_id,__index_level_0__,Unnamed: 0,paid,y"
    rows = [f"{i},{i},{i},{i},{i},{i},{i % 3},{'ab'[i % 2]}" for i in range(40)]
    data = data_of(tmp_path, rows_csv(tmp_path / "ids.csv", names, rows))
    assert data["meta"]["features"] == ["paid"]


def test_edits_of_a_local_csv_leave_no_copies_behind(tmp_path):
    source = rows_csv(tmp_path / "t.csv", "a,y", [f"{i},{'ab'[i % 2]}" for i in range(40)])
    for extra in range(3):
        source.write_text(source.read_text() + f"{100 + extra},a\n")
        data_of(tmp_path, source)
    cached = [p for p in (tmp_path / "datasets").rglob("*") if p.is_file()]
    assert [p.parent.name for p in cached] == ["prepared"]  # one prepared cache, no Arrow copies


def test_regression_predictions_keep_the_labels_scale(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 2))
    price = (1_750_000 + 300_000 * x[:, 0]).round()
    source = rows_csv(tmp_path / "prices.csv", "a,b,price", [f"{a:.4f},{b:.4f},{p:.0f}" for (a, b), p in zip(x, price)])
    train.main(flags(tmp_path, source, label="price", epochs=3))
    line = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", "0,0"])["predictions"][0]
    assert "e+" not in line and float(line.split("-> ")[1]) == pytest.approx(1_750_000, rel=0.3)
