"""The dataset caches: read back while valid, rebuilt whenever anything they depend on changes."""

import os
from dataclasses import dataclass, replace

import pytest
import torch

import train
from util import blobs_csv, flags


def config(root, source, *extra):
    return train.parse_config(flags(root, source, *extra))


def rows_in(data) -> int:
    return sum(train.split_rows(data[s]) for s in ("train", "val", "test"))


def test_a_warm_run_reads_the_prepared_cache_without_loading_the_table(tmp_path, monkeypatch):
    cfg = config(tmp_path, blobs_csv(tmp_path / "blobs.csv"))
    cold = train.build_data(cfg)
    monkeypatch.setattr(train, "load_table", lambda cfg: pytest.fail("a warm run read the table again"))
    warm = train.build_data(cfg)
    for split in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(cold[split], warm[split]))
    assert train.digest(cold["meta"]) == train.digest(warm["meta"])


def test_the_cache_follows_the_sources_content(tmp_path):
    source = tmp_path / "t.csv"
    source.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{'xyz'[i % 3]}\n" for i in range(30)))
    cfg = config(tmp_path, source, "--label-column", "y")
    assert rows_in(train.build_data(cfg)) == 30
    before = train.build_data(cfg)["meta"]["fingerprint"]
    source.write_text(source.read_text() + "".join(f"{i},{i % 3},{'xyz'[i % 3]}\n" for i in range(30, 45)))
    after = train.build_data(cfg)
    assert rows_in(after) == 45 and after["meta"]["fingerprint"] != before
    for cached in (tmp_path / "datasets" / "prepared").glob("t.csv-*.pt"):
        cached.write_bytes(b"not a cache")  # a damaged cache is rebuilt, not trusted
    assert rows_in(train.build_data(cfg)) == 45


def test_an_edit_that_keeps_the_files_size_and_time_is_seen(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    cfg = config(tmp_path, source)
    before = train.build_data(cfg)["meta"]["fingerprint"]
    stat = source.stat()
    source.write_text(source.read_text().replace("\nsmall,", "\nlarge,", 1))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size and train.build_data(cfg)["meta"]["fingerprint"] != before


def test_a_setting_you_add_to_the_table_pipeline_is_part_of_the_caches_key(tmp_path, monkeypatch):
    @dataclass
    class Config(train.TrainingConfig):
        drop_depth: bool = False  # a field a user adds, and reads in read_columns

    real = train.read_columns

    def read_columns(cfg):
        columns = real(cfg)
        if cfg.drop_depth:
            columns["features"].pop("depth")
        return columns

    monkeypatch.setattr(train, "read_columns", read_columns)
    cfg = Config(**vars(config(tmp_path, blobs_csv(tmp_path / "blobs.csv"))))
    assert train.build_data(cfg)["meta"]["features"] == ["width", "height", "depth"]
    assert train.build_data(replace(cfg, drop_depth=True))["meta"]["features"] == ["width", "height"]
    assert train.build_data(cfg)["meta"]["features"] == ["width", "height", "depth"]
