from ledger.jobs import _shard_names


def test_shard_names_are_file_names_unless_two_shards_share_one() -> None:
    names = _shard_names(["/a/x.jsonl", "/b/x.jsonl", "/c/y.parquet"])
    assert names["/c/y.parquet"] == "y.parquet"
    assert names["/a/x.jsonl"] != names["/b/x.jsonl"]
    assert all(names[p].startswith("x.jsonl@") for p in ("/a/x.jsonl", "/b/x.jsonl"))
    assert len(set(names.values())) == 3
    assert _shard_names(["/b/x.jsonl", "/a/x.jsonl"])["/a/x.jsonl"] == names["/a/x.jsonl"]
