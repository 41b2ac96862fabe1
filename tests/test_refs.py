import pytest

from modelfs.errors import UsageError
from modelfs.format.refs import parse_model, parse_registry


def test_registry_and_model_refs():
    r = parse_registry("s3://models/team/registry/")
    assert (r.bucket, r.prefix) == ("models", "team/registry")
    assert r.key("chunks", "ab") == "team/registry/chunks/ab"
    m = parse_model("s3://models/registry/llama-3-8b@prod")
    assert (m.registry.prefix, m.name, m.selector, m.is_version) == ("registry", "llama-3-8b", "prod", False)
    assert parse_model("s3://models/registry/llama").selector == "latest"
    v = parse_model("s3://models/llama@0123456789abcdef0123")
    assert v.is_version and v.registry.prefix == ""


@pytest.mark.parametrize("bad", [
    "models/registry", "s3://", "s3://Bad_Bucket/x", "s3://models/../x@prod",
    "s3://models/reg/na\x00me@prod", "s3://models/reg/@prod", "s3://models/reg/x@a/b",
    "s3://models/reg/x@bad tag", "s3://models/reg@x/name@prod", "s3://models/reg/.hidden@x",
    "s3://models/reg/x@versions",
])
def test_malformed_refs_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_model(bad)
