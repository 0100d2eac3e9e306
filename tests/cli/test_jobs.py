from ledger.jobs import _shard_names


def test_shard_names_are_file_names_unless_two_shards_share_one() -> None:
    names = _shard_names(["/a/x.jsonl", "/b/x.jsonl", "/c/y.parquet"])
    assert names["/c/y.parquet"] == "y.parquet"
    assert names["/a/x.jsonl"] != names["/b/x.jsonl"]
    assert all(names[p].startswith("x.jsonl@") for p in ("/a/x.jsonl", "/b/x.jsonl"))
    assert len(set(names.values())) == 3
    assert _shard_names(["/b/x.jsonl", "/a/x.jsonl"])["/a/x.jsonl"] == names["/a/x.jsonl"]


def test_verification_with_nothing_left_to_compare_is_not_ok() -> None:
    from ledger.jobs import Verification

    checks = {"run manifest id": True}
    assert Verification("r", checks, sampled=3, agreeing=3, max_credit_difference=0.0).ok
    assert not Verification("r", checks, sampled=3, agreeing=2, max_credit_difference=1.0).ok
    assert not Verification("r", checks, sampled=0, agreeing=0, max_credit_difference=0.0).ok
    assert not Verification("r", {"x": False}, 3, 3, 0.0).ok
