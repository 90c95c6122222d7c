"""The committed protobuf modules must be exactly what `make proto` produces."""

from pathlib import Path

from serve.protogen import PROTO_ROOT, generate


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    generate(tmp_path)
    produced = sorted((tmp_path / "shardwire" / "v1").glob("*_pb2*.py*"))
    assert len(produced) == 6
    stale = [
        p.name
        for p in produced
        if p.read_bytes() != (PROTO_ROOT / "shardwire" / "v1" / p.name).read_bytes()
    ]
    assert stale == [], f"run `make proto`: stale generated modules {stale}"
