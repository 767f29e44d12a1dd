"""One dataset loader (trl_qrpo.loading) for the training script and the pre-computation commands."""

import pytest
from datasets import Dataset, DatasetDict

from trl_qrpo.loading import DatasetLoadError, load_dataset_by_name, load_split, with_test_split

ROWS = {"prompt": ["a", "b", "c", "d"], "reward": [0.1, 0.2, 0.3, 0.4]}


@pytest.fixture
def saved(tmp_path):
    data = Dataset.from_dict(ROWS)
    data.save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dict"))
    data.to_json(str(tmp_path / "rows.jsonl"), lines=True)
    data.to_json(str(tmp_path / "rows.json.gz"), lines=True, compression="gzip")
    data.to_parquet(str(tmp_path / "rows.parquet"))
    data.to_csv(str(tmp_path / "rows.csv"), index=False)
    return tmp_path


@pytest.mark.parametrize("name", ["single", "dict", "rows.jsonl", "rows.json.gz", "rows.parquet", "rows.csv"])
def test_every_local_form_loads_the_same_rows(saved, name):
    split = load_split(str(saved / name))
    assert split["prompt"] == ROWS["prompt"] and split["reward"] == pytest.approx(ROWS["reward"])
    # The training script reads the same through the same function, as a DatasetDict.
    assert load_dataset_by_name(str(saved / name))["train"]["prompt"] == ROWS["prompt"]


def test_a_single_dataset_is_any_requested_split(saved):
    assert len(load_split(str(saved / "single"), split="my_split")) == 4
    assert len(load_split(str(saved / "dict"), split="test")) == 1
    with pytest.raises(ValueError, match="no split 'validation'.*'train', 'test'"):
        load_split(str(saved / "dict"), split="validation")


@pytest.mark.parametrize("name", ["./does_not_exist_dir", "does_not_exist_dir/", "missing.jsonl"])
def test_a_missing_local_path_is_reported_as_missing(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetLoadError, match="does not exist") as error:
        load_split(name)
    assert str(tmp_path) in str(error.value) and "Hub" not in str(error.value).split("Check")[0]


def test_a_bare_name_says_what_it_looked_for(tmp_path, monkeypatch):
    """'does_not_exist_dir' may be a Hub id: the error names the local path it tried as well as the Hub."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetLoadError) as error:
        load_split("does_not_exist_dir")
    message = str(error.value)
    assert str(tmp_path / "does_not_exist_dir") in message and "there is none" in message and "Hub" in message


def test_a_folder_that_is_not_a_dataset_is_refused(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    with pytest.raises(DatasetLoadError, match="neither a `save_to_disk` folder"):
        load_split(str(tmp_path / "stuff"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty folder"):
        load_split(str(tmp_path / "empty"))


def test_test_split_size_carves_a_test_split(saved):
    dataset = load_dataset_by_name(str(saved / "single"))
    split = with_test_split(dataset, "train", "test", 0.25, seed=0)
    assert len(split["train"]) == 3 and len(split["test"]) == 1
    assert sorted(list(split["train"]["prompt"]) + list(split["test"]["prompt"])) == ROWS["prompt"]
    assert with_test_split(dataset, "train", "test", None, seed=0) is dataset
    with pytest.raises(ValueError, match="already has a 'test' split"):
        with_test_split(load_dataset_by_name(str(saved / "dict")), "train", "test", 0.25, seed=0)


@pytest.mark.parametrize(
    "lines, where",
    [
        (['{"prompt": "a", "reward": 1.0}', '{"prompt": "b", "reward": 2.0', '{"prompt": "c", "reward": 3.0}'], 2),
        (['{"prompt": "a"}', "[1, 2]"], 2),
    ],
)
def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, lines, where):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLoadError) as error:
        load_dataset_by_name(str(path))
    message = str(error.value)
    assert str(path) in message and f"line {where}" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1
