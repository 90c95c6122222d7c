"""serve.gateway.auth without a server: key matching, metadata parsing, key files."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest

from serve.gateway import auth
from serve.gateway.auth import (
    KeySet,
    bearer_token,
    check_token,
    cluster_secret,
    read_key_file,
    read_secret_file,
)

KEYS = ("key-alpha-0123456789", "key-beta-0123456789", "key-gamma-0123456789")


def test_keyset_accepts_every_key_and_nothing_near_one() -> None:
    """Pass: each configured key matches; a prefix, an extension, a one-character
    change, another case and the empty string do not."""
    keys = KeySet(KEYS)
    assert all(keys.matches(k) for k in KEYS)
    for near in (KEYS[0][:-1], KEYS[0] + "x", KEYS[1].replace("beta", "bexa"), KEYS[2].upper(), ""):
        assert not keys.matches(near), near


def test_keyset_compares_against_every_key_whichever_matches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pass: a check makes exactly one equal-length digest comparison per configured
    key, whether the first key, the last key or none matches (no early exit)."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = KeySet(KEYS)
    for presented in (KEYS[0], KEYS[-1], "wrong", "x" * 500):
        calls.clear()
        keys.matches(presented)
        assert len(calls) == len(KEYS), presented
        assert all(a == b == 32 for a, b in calls), "digests of one length: no length leak"


def test_bearer_token_and_cluster_secret_are_read_from_metadata() -> None:
    """Pass: `Bearer` (any case) gives the token; another scheme gives '' (present
    but invalid); no authorization entry gives None; the secret header is read."""
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("user-agent", "x"), ("authorization", "bearer  abc "))) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) == ""
    assert bearer_token((("user-agent", "x"),)) is None
    assert cluster_secret((("x-shardwire-cluster-secret", "s3"),)) == "s3"
    assert cluster_secret((("authorization", "Bearer s3"),)) is None


def test_key_file_skips_comments_and_names_bad_lines_not_keys(tmp_path: Path) -> None:
    """Pass: keys are read one per line without blanks and # comments; a key with a
    space fails naming its line number and not its text; an empty file fails."""
    path = tmp_path / "keys"
    path.write_text(f"# clients\n{KEYS[0]}\n\n  {KEYS[1]}  \n")
    assert read_key_file(str(path)) == KEYS[:2]
    path.write_text(f"{KEYS[0]}\nsecret with space\n")
    with pytest.raises(ValueError, match="line 2") as info:
        read_key_file(str(path))
    assert "secret with space" not in str(info.value)
    path.write_text("# none\n")
    with pytest.raises(ValueError, match="no API key"):
        read_key_file(str(path))


def test_tokens_must_travel_as_metadata(tmp_path: Path) -> None:
    """Pass: printable ASCII without spaces is accepted; empty, spaces and non-ASCII
    are refused; a secret file's trailing newline is dropped."""
    assert check_token("A-z_0.9~!", "key") == "A-z_0.9~!"
    for bad in ("", "a b", "tab\there", "schlüssel"):
        with pytest.raises(ValueError):
            check_token(bad, "key")
    path = tmp_path / "secret"
    path.write_text("s3cr3t-value\n")
    assert read_secret_file(str(path)) == "s3cr3t-value"
